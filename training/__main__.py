"""`python -m training {train,evaluate,export} TASK [options]`; `python -m training train TASK --help`."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

TASKS = ("detector", "quality", "segmenter", "severity")
STEPS = ("train", "evaluate", "export")
# train: fit on every CV fold and on all data, save checkpoint + held-out predictions + metrics.json;
# evaluate: the report (JSON, Markdown, PNGs) from those; export: ONNX + manifest + model card.
STEP_FUNCTIONS = {"train": "main", "evaluate": "report", "export": "export"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("task", choices=TASKS)
    known, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"training.tasks.{known.task}")
    step = getattr(module, STEP_FUNCTIONS[known.step])
    task_parser = module.get_args_parser() if known.step == "train" else module.get_step_parser(known.step)
    task_parser.prog = f"python -m training {known.step} {known.task}"
    args = task_parser.parse_args(rest)
    if known.step == "train":
        args.command = command_line(argv)  # saved with the checkpoint; export copies it into the manifest
    step(args)


def command_line(argv: list[str]) -> str:
    """The exact command that ran (as typed at a shell, whoever called `main`)."""
    return " ".join(shlex.quote(a) for a in ["python", "-m", "training", *argv])


if __name__ == "__main__":
    main()
