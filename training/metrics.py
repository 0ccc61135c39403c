"""Evaluation metrics every model's `evaluate` step shares. Pure functions on numpy arrays.

Conventions (one copy, so every report means the same thing):

* **Positive class.** Binary functions take `y_true` with 1 = the positive class, the one the model is meant
  to catch ("not sharp" for the quality gate, "CIN2+" for severity, "cervix present" for the detector), and
  a `score` where higher means more positive. Sensitivity = recall of class 1; specificity = recall of
  class 0.
* **Decision rule.** A sample is called positive when `score >= threshold` (`apply_threshold`). Thresholds
  returned by `threshold_for_sensitivity` and `youden_threshold` are observed score values under that rule;
  the service must use `>=` too.
* **Undefined is None, never 0.** A ratio whose denominator is zero (precision with no positive calls,
  specificity with no negatives, ROC-AUC with one class) is `None`, so a report cannot show a made-up number.
  Outputs are plain Python `int`/`float`/`None`/`list`/`dict`, ready for JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

ArrayLike = Sequence[float] | np.ndarray


def _num(x: float | np.floating | None) -> float | None:
    """A plain float, or None for None/NaN."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def _binary_inputs(y_true: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise ValueError(f"y_true and score must be 1-D and the same length, got {y.shape} and {s.shape}")
    if len(y) == 0:
        raise ValueError("no samples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must be 0/1 (1 = positive class), got values {sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(s).all():
        raise ValueError("score contains NaN or infinity")
    return y.astype(bool), s


def apply_threshold(score: ArrayLike, threshold: float) -> np.ndarray:
    """The decision rule every binary metric here uses: positive where `score >= threshold`."""
    return np.asarray(score, dtype=np.float64) >= threshold


def roc_auc(y_true: ArrayLike, score: ArrayLike) -> float | None:
    """ROC-AUC as the Mann-Whitney statistic (ties count one half), None with one class only.

    Equals scikit-learn's `roc_auc_score` but is much cheaper, which matters inside `bootstrap_ci`.
    """
    y, s = _binary_inputs(y_true, score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct score value, then the rank-sum of the positives.
    mean_rank = np.cumsum(counts) - (counts - 1) / 2
    rank_sum = float(mean_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_metrics(
    y_true: ArrayLike, score: ArrayLike, threshold: float, *, positive_class: str | None = None
) -> dict[str, Any]:
    """Threshold metrics at `threshold` (rule `score >= threshold`) plus threshold-free ROC-AUC and PR-AUC.

    `positive_class` only names class 1 in the output (e.g. "CIN2+"). PR-AUC is average precision (step-wise,
    no trapezoidal interpolation). `confusion_matrix` is `[[tn, fp], [fn, tp]]` (rows true 0/1, columns
    predicted 0/1). F1 = 2tp / (2tp + fp + fn); balanced accuracy = (sensitivity + specificity) / 2, None when
    either is undefined.
    """
    y, s = _binary_inputs(y_true, score)
    pred = apply_threshold(s, threshold)
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    n_pos, n_neg = tp + fn, tn + fp
    sensitivity = _ratio(tp, n_pos)
    specificity = _ratio(tn, n_neg)
    out: dict[str, Any] = {}
    if positive_class is not None:
        out["positive_class"] = positive_class
    out |= {
        "n": len(y),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "threshold": float(threshold),
        "accuracy": (tp + tn) / len(y),
        "precision": _ratio(tp, tp + fp),
        "recall": sensitivity,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": None
        if sensitivity is None or specificity is None
        else (sensitivity + specificity) / 2,
        "roc_auc": roc_auc(y, s),
        "pr_auc": _num(average_precision_score(y, s)) if n_pos > 0 else None,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }
    return out


def threshold_for_sensitivity(y_true: ArrayLike, score: ArrayLike, target: float = 0.98) -> float:
    """The highest threshold t whose sensitivity (rule `score >= t`) is at least `target`.

    With P positives, sensitivity >= target needs k = ceil(target * P) of them called positive, and the
    largest such t is the k-th highest positive score; any higher t loses that positive. Ties are safe: every
    positive scoring exactly t is called positive, so the achieved sensitivity can exceed `target`, never fall
    short. The result is an observed score value. Because t = the lowest positive score always gives
    sensitivity 1, a target in (0, 1] is always attainable when there is a positive, so a "fall back to the
    minimum score" case never arises; with no positives sensitivity is undefined and this raises ValueError.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    y, s = _binary_inputs(y_true, score)
    pos = np.sort(s[y])[::-1]
    n_pos = len(pos)
    if n_pos == 0:
        raise ValueError("no positives: sensitivity is undefined")
    # Smallest k with k / n_pos >= target, tested the way binary_metrics computes sensitivity (no float slop).
    k = max(1, math.ceil(target * n_pos) - 1)
    while k < n_pos and k / n_pos < target:
        k += 1
    return float(pos[k - 1])


def youden_threshold(y_true: ArrayLike, score: ArrayLike) -> float:
    """The observed score t maximising Youden's J = sensitivity + specificity - 1 (rule `score >= t`).

    Ties in J go to the highest threshold (fewest positive calls). Needs both classes.
    """
    y, s = _binary_inputs(y_true, score)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("Youden's J needs both classes")
    thresholds, inverse = np.unique(s, return_inverse=True)  # ascending
    pos_at = np.bincount(inverse, weights=y, minlength=len(thresholds))
    neg_at = np.bincount(inverse, weights=~y, minlength=len(thresholds))
    # Called positive at thresholds[j]: every sample scoring >= thresholds[j] (reverse cumulative sums).
    tpr = np.cumsum(pos_at[::-1])[::-1] / n_pos
    fpr = np.cumsum(neg_at[::-1])[::-1] / n_neg
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())[-1]  # highest threshold among the maximisers
    return float(thresholds[best])


def multiclass_metrics(
    y_true: Sequence[int | str] | np.ndarray, y_pred_proba: np.ndarray, labels: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, balanced accuracy, one-vs-rest macro ROC-AUC and per-class precision/recall/F1.

    `y_true` holds class indices into `labels` or the label strings themselves; `y_pred_proba` is
    (n, len(labels)) with columns in `labels` order; the prediction is the argmax. `confusion_matrix[i][j]`
    counts true `labels[i]` predicted `labels[j]`. Per-class values are None when undefined (precision of a
    class never predicted, recall of a class absent from `y_true`); macro-F1 and balanced accuracy average
    only the defined ones (a class absent from both truth and predictions has no F1). `roc_auc_ovr`
    (one-vs-rest, macro) is None unless every class occurs in `y_true`.
    """
    proba = np.asarray(y_pred_proba, dtype=np.float64)
    k = len(labels)
    if proba.ndim != 2 or proba.shape[1] != k:
        raise ValueError(f"y_pred_proba must be (n, {k}), got {proba.shape}")
    index = {label: i for i, label in enumerate(labels)}
    y = np.asarray([index[v] if isinstance(v, str) else int(v) for v in y_true], dtype=np.int64)
    if len(y) != len(proba) or len(y) == 0:
        raise ValueError(f"{len(y)} labels for {len(proba)} predictions")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"class indices must be in [0, {k})")
    pred = proba.argmax(axis=1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class: dict[str, dict[str, Any]] = {}
    for i, label in enumerate(labels):
        tp, support, predicted = int(cm[i, i]), int(cm[i].sum()), int(cm[:, i].sum())
        per_class[label] = {
            "precision": _ratio(tp, predicted),
            "recall": _ratio(tp, support),
            "f1": _ratio(2 * tp, support + predicted),
            "support": support,
        }
    f1s = [c["f1"] for c in per_class.values() if c["f1"] is not None]
    recalls = [c["recall"] for c in per_class.values() if c["recall"] is not None]
    auc = None
    if np.bincount(y, minlength=k).min() > 0:
        if k == 2:
            auc = _num(roc_auc_score(y, proba[:, 1]))
        else:
            auc = _num(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(k))))
    return {
        "n": len(y),
        "labels": list(labels),
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(np.mean(f1s)),
        "balanced_accuracy": float(np.mean(recalls)),
        "roc_auc_ovr": auc,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def _mask_counts(
    pred_masks_prob: Sequence[np.ndarray] | np.ndarray,
    true_masks: Sequence[np.ndarray] | np.ndarray,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image |pred & true|, |pred|, |true| with pred = `prob >= threshold` and truth = non-zero."""
    if len(pred_masks_prob) != len(true_masks):
        raise ValueError(f"{len(pred_masks_prob)} predicted masks for {len(true_masks)} true masks")
    if len(true_masks) == 0:
        raise ValueError("no masks")
    counts = np.zeros((3, len(true_masks)), dtype=np.int64)
    for i, (p, t) in enumerate(zip(pred_masks_prob, true_masks, strict=True)):
        p, t = np.asarray(p) >= threshold, np.asarray(t).astype(bool)
        if p.shape != t.shape:
            raise ValueError(f"mask {i}: predicted shape {p.shape} != true shape {t.shape}")
        counts[:, i] = np.sum(p & t), p.sum(), t.sum()
    return counts[0], counts[1], counts[2]


def mask_scores(
    pred_masks_prob: Sequence[np.ndarray] | np.ndarray,
    true_masks: Sequence[np.ndarray] | np.ndarray,
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image IoU and Dice, as two float arrays (what `mask_metrics` averages; handy for `bootstrap_ci`).

    Prediction = `prob >= threshold`; truth = non-zero. An image where both masks are empty scores 1.0 for
    both (the model correctly found no lesion); empty vs non-empty scores 0.0.
    """
    return _iou_dice(*_mask_counts(pred_masks_prob, true_masks, threshold))


def _iou_dice(inter: np.ndarray, p_sum: np.ndarray, t_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    union = p_sum + t_sum - inter
    both_empty = union == 0
    iou = np.where(both_empty, 1.0, inter / np.maximum(union, 1))
    dice = np.where(both_empty, 1.0, 2 * inter / np.maximum(p_sum + t_sum, 1))
    return iou, dice


def mask_metrics(
    pred_masks_prob: Sequence[np.ndarray] | np.ndarray,
    true_masks: Sequence[np.ndarray] | np.ndarray,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Segmentation metrics over images (masks may differ in size between images, not within a pair).

    * `mean_iou`, `mean_dice`: per-image scores averaged; empty-vs-empty counts as 1.0 (see `mask_scores`).
    * `mean_iou_lesion`, `mean_dice_lesion`: the same over images whose true mask is non-empty only, so a set
      of mostly lesion-free images cannot flatter the number (None when there are none).
    * `pooled_iou`, `pooled_dice`: dataset level, every pixel of every image in one confusion count (1.0 when
      all masks are empty); large masks weigh more.
    * `n_false_alarm_images` (empty truth, non-empty prediction) and `n_missed_images` (the reverse).
    """
    inter, p_sum, t_sum = _mask_counts(pred_masks_prob, true_masks, threshold)
    iou, dice = _iou_dice(inter, p_sum, t_sum)
    lesion = t_sum > 0
    union = int(p_sum.sum() + t_sum.sum() - inter.sum())
    return {
        "n": len(iou),
        "threshold": float(threshold),
        "n_lesion_images": int(lesion.sum()),
        "mean_iou": float(iou.mean()),
        "mean_dice": float(dice.mean()),
        "mean_iou_lesion": float(iou[lesion].mean()) if lesion.any() else None,
        "mean_dice_lesion": float(dice[lesion].mean()) if lesion.any() else None,
        "pooled_iou": 1.0 if union == 0 else int(inter.sum()) / union,
        "pooled_dice": 1.0 if union == 0 else 2 * int(inter.sum()) / int(p_sum.sum() + t_sum.sum()),
        "n_false_alarm_images": int(np.sum(~lesion & (p_sum > 0))),
        "n_missed_images": int(np.sum(lesion & (p_sum == 0))),
    }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (N, 4) with every box in `b` (M, 4), boxes (x0, y0, x1, y1): an (N, M) array.

    A single box may be given as shape (4,). Boxes with zero area have IoU 0 with everything (no NaN).
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[-1] != 4 or b.shape[-1] != 4 or a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"boxes must be (N, 4), got {a.shape} and {b.shape}")
    if (
        (a[:, 2] < a[:, 0]).any()
        or (a[:, 3] < a[:, 1]).any()
        or (b[:, 2] < b[:, 0]).any()
        or (b[:, 3] < b[:, 1]).any()
    ):
        raise ValueError("boxes must satisfy x1 >= x0 and y1 >= y0")
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def calibration(y_true: ArrayLike, score: ArrayLike, bins: int = 10) -> dict[str, Any]:
    """Reliability table on `bins` equal-width bins of [0, 1], with ECE, MCE and the Brier score.

    Bin i holds scores in [i/bins, (i+1)/bins) (the last bin includes 1.0). Each bin reports `lower`, `upper`,
    `count`, `mean_predicted` and `observed_frequency` (None for empty bins). ECE = sum over bins of
    count/n * |observed_frequency - mean_predicted|; MCE is the largest such gap over non-empty bins.
    `score` must be a probability of class 1.
    """
    y, s = _binary_inputs(y_true, score)
    if bins < 1:
        raise ValueError("bins must be >= 1")
    if s.min() < 0 or s.max() > 1:
        raise ValueError("calibration needs probabilities in [0, 1]")
    idx = np.minimum((s * bins).astype(np.int64), bins - 1)
    rows: list[dict[str, Any]] = []
    ece, mce = 0.0, 0.0
    for i in range(bins):
        in_bin = idx == i
        count = int(in_bin.sum())
        row: dict[str, Any] = {"lower": i / bins, "upper": (i + 1) / bins, "count": count}
        if count:
            mean_pred, observed = float(s[in_bin].mean()), float(y[in_bin].mean())
            gap = abs(observed - mean_pred)
            ece += count / len(s) * gap
            mce = max(mce, gap)
            row |= {"mean_predicted": mean_pred, "observed_frequency": observed}
        else:
            row |= {"mean_predicted": None, "observed_frequency": None}
        rows.append(row)
    return {
        "n": len(s),
        "ece": ece,
        "mce": mce,
        "brier": float(np.mean((s - y) ** 2)),
        "bins": rows,
    }


def _flatten_numeric(d: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | None]:
    """Numeric and None leaves of nested dicts, keyed `outer.inner`; bools, strings and lists are left out."""
    out: dict[str, int | float | None] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= _flatten_numeric(value, f"{name}.")
        elif value is None:
            out[name] = None
        elif isinstance(value, bool | np.bool_):
            continue
        elif isinstance(value, int | np.integer):
            out[name] = int(value)  # counts stay ints, so reports can print them as counts
        elif isinstance(value, float | np.floating):
            out[name] = _num(value)
    return out


def mean_sd_over_folds(folds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Summarise per-fold metric dicts: each numeric key -> {"mean", "sd", "folds", "n_folds", "n_skipped"}.

    Nested dicts are flattened (`per_class.CIN2+.f1`); non-numeric values (labels, confusion matrices) are
    left out. `folds` lists every fold's value in fold order, None where a fold had None/NaN or lacked the
    key; those are skipped in mean and sd and counted in `n_skipped`. `sd` is the sample standard deviation
    (ddof=1), None with fewer than two values; `mean` is None when no fold has a value.
    """
    flat = [_flatten_numeric(f) for f in folds]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = [f.get(key) for f in flat]
        present = np.asarray([v for v in values if v is not None], dtype=np.float64)
        out[key] = {
            "mean": float(present.mean()) if len(present) else None,
            "sd": float(present.std(ddof=1)) if len(present) >= 2 else None,
            "folds": values,
            "n_folds": len(present),
            "n_skipped": len(values) - len(present),
        }
    return out


def bootstrap_ci(
    y_true: ArrayLike,
    score: ArrayLike,
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    n: int = 1000,
    seed: int = 0,
    groups: Sequence[Hashable] | np.ndarray | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Percentile bootstrap CI of `metric_fn(y_true, score)`.

    With `groups` (subject / case of each sample) whole groups are resampled with replacement and all their
    samples come along, since images of one case are not independent; otherwise samples are resampled.
    Resamples where the metric is undefined (None/NaN, e.g. ROC-AUC of a one-class resample) are dropped and
    counted in `n_failed`; if many fail, the interval is unreliable. Returns {"estimate", "low", "high",
    "level", "n_boot", "n_failed", "unit" ("group" or "sample"), "n_units"}; `low`/`high` are None if every
    resample failed.
    """
    y, s = np.asarray(y_true), np.asarray(score)
    if len(y) != len(s) or len(y) == 0:
        raise ValueError(f"y_true ({len(y)}) and score ({len(s)}) must be non-empty and the same length")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = np.asarray(groups)
        if len(g) != len(y):
            raise ValueError(f"{len(g)} groups for {len(y)} samples")
        _, group_of = np.unique(g, return_inverse=True)
        order = np.argsort(group_of, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(group_of))[:-1])
        n_units = len(members)
    else:
        members, n_units = None, len(y)
    values: list[float] = []
    for _ in range(n):
        if members is None:
            idx = rng.integers(0, n_units, n_units)
        else:
            idx = np.concatenate([members[j] for j in rng.integers(0, n_units, n_units)])
        value = _num(metric_fn(y[idx], s[idx]))
        if value is not None:
            values.append(value)
    alpha = 1 - level
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2]) if values else (None, None)
    return {
        "estimate": _num(metric_fn(y, s)),
        "low": _num(low),
        "high": _num(high),
        "level": level,
        "n_boot": n,
        "n_failed": n - len(values),
        "unit": "sample" if groups is None else "group",
        "n_units": n_units,
    }


def share_with_spread(hit: np.ndarray, folds: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """A held-out share (recall, rejection, sensitivity, flag rate) as the reports give it: pooled, per outer
    fold with their spread, and a 95 % interval resampling whole groups (cases, photo sources)."""
    hits, fold_of = np.asarray(hit, dtype=bool), np.asarray(folds)
    per_fold = [float(np.mean(hits[fold_of == f])) for f in np.unique(fold_of)]
    ci = bootstrap_ci(hits.astype(float), hits.astype(float), lambda y, _s: float(np.mean(y)), groups=groups)
    return {
        "pooled": float(hits.mean()),
        "n": int(hits.size),
        "folds": per_fold,
        "fold_sd": float(np.std(per_fold)),
        "ci95": {"low": ci["low"], "high": ci["high"], "unit": ci["unit"], "n_units": ci["n_units"]},
    }
