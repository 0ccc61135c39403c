"""The quality model's focus operating points compared on inner folds, from a run's saved features.

For each outer fold (and for the shipped fit, over all real folds), the focus strength is chosen as the
quality task chooses it, and the pooled inner-fold predictions give the specificity at each sensitivity
rule: `not_sharp_balanced` (95 %) and `not_sharp` (98 %). This is the nested evidence for which threshold
the service uses by default (`CERVIGATE_FOCUS_OPERATING_POINT`): the 98 % point, the issue's and the focus
paper's, while the inner folds keep specificity at or above the issue's 85 % at it in every outer fold.

    python -m training.focus_points --run-dir runs/quality
"""

from __future__ import annotations

import argparse

import numpy as np

from training.stage_variants import load_saved_features, saved_pools
from training.tasks.quality import (
    Pools,
    _fit_sharp,
    _stack,
    choose,
    get_args_parser,
    specificity_at_sensitivity,
)

# The specificity floor for the not-sharp gate (the focus paper's 98 % / 85 %).
MIN_SPECIFICITY = 0.85


def inner_specificities(
    pools: Pools, excluded: set[int], inner_folds: list[int], args: argparse.Namespace
) -> tuple[float, dict[str, float]]:
    """The focus C the inner folds choose, and their pooled specificity at each sensitivity rule."""
    c = choose(pools, excluded, inner_folds, args).strengths.focus
    scores, labels = [], []
    for inner in inner_folds:
        train_feats, train_labels = pools.training(excluded | {inner})
        feats, fold_labels = pools.fold(inner, args.inner_crops)
        scores.append(_fit_sharp(train_feats, train_labels, c).proba(feats["focus"])[:, 1])
        labels.append(fold_labels)
    p_sharp, pooled = np.concatenate(scores), _stack(labels)
    rules = {"not_sharp_balanced": args.balanced_sensitivity, "not_sharp": args.target_sensitivity}
    return c, {name: specificity_at_sensitivity(p_sharp, pooled, target) for name, target in rules.items()}


def main(argv: list[str] | None = None) -> None:
    saved = load_saved_features(argv, __doc__)
    pools = saved_pools(saved)
    # One stage candidate keeps the refits quick: the stage head does not touch the focus figures.
    args = get_args_parser().parse_args(
        ["--output-dir", "unused", "--stage-c", "0.0003", "--stage-weighting", "none"]
    )
    folds = sorted(set(saved["real_fold"].tolist()))
    fits = {f"outer fold {k}": ({k}, [j for j in folds if j != k]) for k in folds}
    fits["shipped fit (all folds)"] = (set(), folds)
    for name, (excluded, inner) in fits.items():
        c, specificity = inner_specificities(pools, excluded, inner, args)
        figures = ", ".join(f"{rule} {100 * value:.1f} %" for rule, value in specificity.items())
        meets = specificity["not_sharp"] >= MIN_SPECIFICITY
        print(
            f"{name}: focus C {c:g}; inner specificity {figures}; 98 % point over 85 %: {meets}", flush=True
        )


if __name__ == "__main__":
    main()
