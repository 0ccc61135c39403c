"""The not-sharp operating points' bound compared offline on a quality run's saved features.

For each bound (`--focus-bound pooled`, the default: the sensitivity holds over the inner folds' served
crops pooled; `each-transform`: under each suite transform of them), every outer fold's focus
strength and thresholds are chosen nested exactly as the quality task does and applied to that fold's
held-out served crops. Printed per bound and operating point: not-sharp sensitivity / specificity as taken
and per suite transform (pooled over the outer folds, and the per-fold range as taken), and how often a
clean photo's not-sharp flag holds under every transform. A comparison for the report, not a selection.

    python -m training.focus_bounds --run-dir runs/quality
"""

from __future__ import annotations

import numpy as np

from training.stage_variants import _split, flag_held, load_saved_features, saved_pools
from training.tasks.quality import FOCUS_BOUNDS, choose, fit_heads, get_args_parser, predict

POINTS = ("not_sharp", "not_sharp_balanced")


def flags_by_bound(
    saved: dict[str, np.ndarray], bound: str, extra: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Per served crop and operating point: called not sharp by its outer fold's nested head and threshold
    (`extra`: more of the quality task's arguments)."""
    served = _split(saved, "served")[0]
    pools = saved_pools(saved)
    # One stage candidate keeps the refits quick: the stage head does not touch the focus figures.
    one_stage_head = ("--stage-c", "0.001", "--stage-weighting", "none", "--stage-synthetic", "with")
    args = get_args_parser().parse_args(
        ["--output-dir", "unused", *one_stage_head, "--focus-bound", bound, *extra]
    )
    folds = sorted(set(saved["real_fold"].tolist()))
    called = {point: np.zeros(len(saved["served_fold"]), bool) for point in POINTS}
    for fold in folds:
        choice = choose(pools, {fold}, [k for k in folds if k != fold], args)
        heads = fit_heads(*pools.training({fold}), choice.strengths)
        rows = saved["served_fold"] == fold
        p_sharp = predict(heads, {k: v[rows].astype(np.float32) for k, v in served.items()})["p_sharp"]
        for point in POINTS:
            called[point][rows] = 1 - p_sharp >= choice.thresholds[point]
    return called


def describe(saved: dict[str, np.ndarray], called: np.ndarray) -> str:
    sharp, transform = saved["served.sharp"], saved["served_transform"]
    blurred, kept = sharp == 0, sharp == 1

    def rates(rows: np.ndarray) -> str:
        return f"{100 * called[rows & blurred].mean():.1f} / {100 * (~called[rows & kept]).mean():.1f}"

    as_taken = transform == "as_taken"
    per_fold = [
        (called[r & blurred].mean(), (~called[r & kept]).mean())
        for fold in np.unique(saved["served_fold"])
        for r in [as_taken & (saved["served_fold"] == fold)]
    ]
    folds = ", ".join(f"{100 * s:.0f}/{100 * p:.0f}" for s, p in per_fold)
    suite = ", ".join(
        f"{name} {rates(transform == name)}" for name in np.unique(transform) if name != "as_taken"
    )
    held, photos = flag_held(saved, called)
    return (
        f"sensitivity / specificity % as taken {rates(as_taken)} (folds {folds}); {suite}; clean photos' "
        f"flag unchanged under every transform {100 * held:.1f} % of {photos}"
    )


def main(argv: list[str] | None = None) -> None:
    saved = load_saved_features(argv, __doc__)
    for bound in FOCUS_BOUNDS:
        for point, called in flags_by_bound(saved, bound).items():
            print(f"{bound}, {point}: {describe(saved, called)}", flush=True)


if __name__ == "__main__":
    main()
