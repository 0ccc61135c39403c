"""Exam-stage head variants compared offline on a quality run's saved features (`--save-features`).

Each variant restricts the stage head's candidates (class weighting, with or without synthetic crops) or
names the crops inner folds are scored on, is chosen and thresholded nested exactly as the quality task
does, and is scored on the outer folds' served crops: the share of each stage flagged not acetic (as taken,
and on the clean photos only), the range over the suite's transforms of acetic and saline crops flagged,
the ROC-AUC of P(acetic) against saline and against green-filter crops, and
how often a clean photo's flag holds under every suite transform. A comparison for the report, not a
selection: the task's own nested rule picks the variant.

    python -m training.stage_variants --run-dir runs/quality
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from training import device_suite
from training.tasks.quality import EXAM_STAGES, Pools, choose, fit_heads, get_args_parser, predict

UNWEIGHTED = ("--stage-weighting", "none")
ON_TRAINING_CROPS = ("--inner-crops", "training")
VARIANTS = {
    "with synthetic, unweighted, inner folds on training crops (3.2.0's rule)": [
        *UNWEIGHTED,
        "--stage-synthetic",
        "with",
        *ON_TRAINING_CROPS,
    ],
    "real only, unweighted, inner folds on training crops": [
        *UNWEIGHTED,
        "--stage-synthetic",
        "without",
        *ON_TRAINING_CROPS,
    ],
    "every candidate, inner folds on training crops (3.3.0's rule)": [*ON_TRAINING_CROPS],
    "every candidate, inner folds on served crops, acetic bound pooled over them": [
        "--inner-crops",
        "served",
        "--acetic-bound",
        "pooled",
    ],
    "every candidate, inner folds on served crops, acetic bound under each transform (3.4.0, the default)": [
        "--inner-crops",
        "served",
        "--acetic-bound",
        "each-transform",
    ],
}


def _split(saved: dict[str, np.ndarray], pool: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    prefix = f"{pool}."
    named = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    feats = {k: v for k, v in named.items() if k == "focus" or k.startswith("pooled_")}
    return feats, {k: v for k, v in named.items() if k not in feats}


def saved_pools(saved: dict[str, np.ndarray]) -> Pools:
    """The quality task's pools as `--save-features` wrote them."""
    return Pools(
        *_split(saved, "real"),
        saved["real_fold"],
        *_split(saved, "synthetic"),
        *_split(saved, "served"),
        saved["served_fold"],
        saved["served_transform"],
    )


def flagged_and_scores(saved: dict[str, np.ndarray], extra: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per served crop: flagged not acetic by its outer fold's nested head and threshold, and P(acetic)."""
    served = _split(saved, "served")[0]
    pools = saved_pools(saved)
    # The focus heads do not touch the stage figures: one strength keeps the refits quick.
    args = get_args_parser().parse_args(["--output-dir", "unused", "--focus-c", "30", *extra])
    folds = sorted(set(saved["real_fold"].tolist()))
    flagged = np.zeros(len(saved["served_fold"]), bool)
    p_acetic = np.zeros(len(flagged))
    for fold in folds:
        choice = choose(pools, {fold}, [k for k in folds if k != fold], args)
        heads = fit_heads(*pools.training({fold}), choice.strengths)
        rows = saved["served_fold"] == fold
        p = predict(heads, {k: v[rows].astype(np.float32) for k, v in served.items()})["p_stage"][:, 0]
        p_acetic[rows], flagged[rows] = p, p < choice.thresholds["not_acetic"]
    return flagged, p_acetic


def describe(saved: dict[str, np.ndarray], flagged: np.ndarray, p_acetic: np.ndarray) -> str:
    stage, transform, variant = saved["served.stage"], saved["served_transform"], saved["served_variant"]
    as_taken = transform == "as_taken"

    def shares(rows: np.ndarray) -> str:
        return " / ".join(f"{100 * flagged[rows & (stage == k)].mean():.1f}" for k in range(len(EXAM_STAGES)))

    aucs = []
    for other in ("saline", "green"):
        rows = as_taken & np.isin(stage, [0, EXAM_STAGES.index(other)])
        aucs.append(f"{roc_auc_score(stage[rows] == 0, p_acetic[rows]):.3f}")
    clean = variant == 0
    held, photos = flag_held(saved, flagged)

    def range_over_transforms(stage_name: str) -> str:
        rows = stage == EXAM_STAGES.index(stage_name)
        shares = [100 * flagged[rows & (transform == name)].mean() for name in np.unique(transform)]
        return f"{min(shares):.1f}-{max(shares):.1f} %"

    return (
        f"{'/'.join(EXAM_STAGES)} flagged as taken {shares(as_taken)} %, clean {shares(as_taken & clean)} %; "
        f"acetic flagged per transform {range_over_transforms('acetic')}, "
        f"saline {range_over_transforms('saline')}; "
        f"ROC-AUC acetic vs saline / green {' / '.join(aucs)}; flag unchanged under every transform "
        f"{100 * held:.1f} % of {photos} photos"
    )


def flag_held(saved: dict[str, np.ndarray], flag: np.ndarray) -> tuple[float, int]:
    """How often a clean photo's per-crop `flag` is the same under every suite transform as taken, and
    over how many photos (those served under every transform)."""
    clean, transform = saved["served_variant"] == 0, saved["served_transform"]
    by_transform = {
        str(name): dict(zip(saved["served_photo"][rows].tolist(), flag[rows].tolist(), strict=True))
        for name in np.unique(transform)
        for rows in [clean & (transform == name)]
    }
    photos = [p for p in by_transform["as_taken"] if all(p in d for d in by_transform.values())]
    held = device_suite.consistency({n: [d[p] for p in photos] for n, d in by_transform.items()})
    return held["all_transforms"], len(photos)


def load_saved_features(argv: list[str] | None, description: str | None) -> dict[str, np.ndarray]:
    """The `features.npz` of the run named by `--run-dir` (an offline comparison's one argument)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/quality"))
    run_dir = parser.parse_args(argv).run_dir
    return dict(np.load(run_dir / "features.npz", allow_pickle=False))


def main(argv: list[str] | None = None) -> None:
    saved = load_saved_features(argv, __doc__)
    for name, extra in VARIANTS.items():
        print(f"{name}: {describe(saved, *flagged_and_scores(saved, extra))}", flush=True)


if __name__ == "__main__":
    main()
