from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from training.metrics import (
    binary_metrics,
    bootstrap_ci,
    box_iou,
    calibration,
    mask_metrics,
    mask_scores,
    mean_sd_over_folds,
    multiclass_metrics,
    roc_auc,
    share_with_spread,
    threshold_for_sensitivity,
    youden_threshold,
)

# Six samples, threshold 0.5: predictions 1 1 0 1 0 0 -> tp 2, fn 1, fp 1, tn 2.
Y6 = [1, 1, 1, 0, 0, 0]
S6 = [0.9, 0.6, 0.3, 0.7, 0.2, 0.1]


def test_binary_metrics_hand_computed() -> None:
    m = binary_metrics(Y6, S6, 0.5, positive_class="CIN2+")
    assert m["positive_class"] == "CIN2+"
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert (m["n"], m["n_positive"], m["n_negative"], m["threshold"]) == (6, 3, 3, 0.5)
    for key in ("precision", "recall", "sensitivity", "specificity", "f1", "balanced_accuracy", "accuracy"):
        assert m[key] == pytest.approx(2 / 3), key
    # 7 of the 9 positive/negative pairs are ordered correctly (0.6 < 0.7 and 0.3 < 0.7 are not).
    assert m["roc_auc"] == pytest.approx(7 / 9)
    # Ranked: P N P P N N -> AP = (1/1 + 2/3 + 3/4) / 3.
    assert m["pr_auc"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_binary_metrics_match_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.clip(0.3 * y + rng.normal(0.35, 0.2, 200), 0, 1)
    m = binary_metrics(y, s, 0.5)
    pred = s >= 0.5
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, ~pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, s))


def test_binary_metrics_threshold_is_inclusive_and_undefined_is_none() -> None:
    assert binary_metrics(Y6, S6, 0.6)["confusion_matrix"] == [[2, 1], [1, 2]]  # 0.6 >= 0.6 is positive
    assert binary_metrics(Y6, S6, 0.61)["confusion_matrix"] == [[2, 1], [2, 1]]
    one_class = binary_metrics([0, 0, 0], [0.1, 0.2, 0.9], 0.5)
    assert one_class["sensitivity"] is None and one_class["roc_auc"] is None and one_class["pr_auc"] is None
    assert one_class["balanced_accuracy"] is None
    assert one_class["specificity"] == pytest.approx(2 / 3)
    assert binary_metrics([1, 0], [0.1, 0.2], 0.5)["precision"] is None  # nothing called positive
    with pytest.raises(ValueError, match="0/1"):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0, 1], [0.1, float("nan")], 0.5)


def _sensitivity(y: np.ndarray, s: np.ndarray, t: float) -> float:
    return float(np.mean(s[y == 1] >= t))


def test_threshold_for_sensitivity_hand_computed() -> None:
    y = [1, 1, 1, 1, 1, 0, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.1]
    assert threshold_for_sensitivity(y, s, 0.8) == 0.6  # 4 of 5 positives needed
    assert threshold_for_sensitivity(y, s, 0.81) == 0.5  # 5 of 5
    assert threshold_for_sensitivity(y, s, 0.2) == 0.9
    # 0.98 * 50 is 49.00000000000001 in floating point: 49 of 50 positives still meets 98 %.
    assert threshold_for_sensitivity([1] * 50, list(range(50, 0, -1)), 0.98) == 2
    with pytest.raises(ValueError, match="no positives"):
        threshold_for_sensitivity([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="target"):
        threshold_for_sensitivity(y, s, 0.0)


def test_threshold_for_sensitivity_is_the_highest_that_meets_target() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(5, 80))
        y = rng.integers(0, 2, n)
        y[0] = 1
        # Coarse scores give many ties.
        s = np.round(rng.random(n) * (5 if trial % 2 else 100)) / 100
        target = float(rng.choice([0.5, 0.9, 0.95, 0.98, 1.0, rng.random() * 0.99 + 0.01]))
        t = threshold_for_sensitivity(y, s, target)
        assert t in s
        assert _sensitivity(y, s, t) >= target
        higher = np.unique(s[s > t])
        if len(higher):
            assert _sensitivity(y, s, higher[0]) < target, "a higher threshold also met the target"
        if trial < 10:
            assert binary_metrics(y, s, t)["sensitivity"] >= target


def test_youden_threshold() -> None:
    # J is 0.5 at both 0.8 and 0.35: ties go to the higher threshold.
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.8
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = rng.normal(y * 1.0, 1.0)
    t = youden_threshold(y, s)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    assert tpr[thr == t][0] - fpr[thr == t][0] == pytest.approx(np.max(tpr - fpr))
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold([1, 1], [0.1, 0.2])


def test_multiclass_metrics_hand_computed() -> None:
    labels = ["normal", "low grade", "CIN2+"]
    y = [0, 0, 1, 1, 2, 2]
    proba = np.array(
        [
            [0.8, 0.1, 0.1],  # normal -> normal
            [0.2, 0.7, 0.1],  # normal -> low grade
            [0.1, 0.8, 0.1],  # low grade -> low grade
            [0.1, 0.2, 0.7],  # low grade -> CIN2+
            [0.1, 0.1, 0.8],  # CIN2+ -> CIN2+
            [0.1, 0.1, 0.8],  # CIN2+ -> CIN2+
        ]
    )
    m = multiclass_metrics(y, proba, labels)
    assert m["labels"] == labels
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["normal"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert m["per_class"]["CIN2+"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["CIN2+"]["recall"] == 1.0
    assert m["macro_f1"] == pytest.approx(f1_score(y, proba.argmax(1), average="macro"))
    assert m["roc_auc_ovr"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))
    # String labels give the same result.
    assert multiclass_metrics([labels[i] for i in y], proba, labels) == m


def test_multiclass_metrics_absent_class() -> None:
    proba = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    m = multiclass_metrics([0, 1], proba, ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["macro_f1"] == 1.0  # over the classes that occur
    assert m["roc_auc_ovr"] is None


def test_mask_metrics_empty_disjoint_and_partial() -> None:
    empty = np.zeros((4, 4))
    left = np.zeros((4, 4))
    left[:, :2] = 1
    right = np.zeros((4, 4))
    right[:, 2:] = 1
    half = np.zeros((4, 4))
    half[:, 1:3] = 1  # overlaps `left` on 4 of 12 union pixels
    iou, dice = mask_scores([empty, left, left], [empty, right, half])
    assert iou.tolist() == pytest.approx([1.0, 0.0, 1 / 3])
    assert dice.tolist() == pytest.approx([1.0, 0.0, 0.5])

    # Probabilities are thresholded with >=; a large 255-valued truth mask of another size is fine.
    big_true = np.zeros((8, 6), dtype=np.uint8)
    big_true[:4] = 255
    big_prob = np.where(big_true > 0, 0.5, 0.49)
    m = mask_metrics([empty * 0.3, left * 0.9, left, big_prob], [empty, right, half, big_true])
    assert m["n"] == 4 and m["n_lesion_images"] == 3
    assert m["mean_iou"] == pytest.approx((1 + 0 + 1 / 3 + 1) / 4)
    assert m["mean_iou_lesion"] == pytest.approx((0 + 1 / 3 + 1) / 3)
    # Pooled: intersections 0 + 0 + 4 + 24, unions 0 + 16 + 12 + 24.
    assert m["pooled_iou"] == pytest.approx(28 / 52)
    assert m["pooled_dice"] == pytest.approx(2 * 28 / (8 + 8 + 8 + 8 + 24 + 24))
    assert (m["n_false_alarm_images"], m["n_missed_images"]) == (0, 0)

    all_empty = mask_metrics([empty, empty], [empty, empty])
    assert (
        all_empty["pooled_iou"] == 1.0
        and all_empty["mean_dice"] == 1.0
        and all_empty["mean_iou_lesion"] is None
    )
    alarms = mask_metrics([left, empty], [empty, right])
    assert (alarms["n_false_alarm_images"], alarms["n_missed_images"]) == (1, 1)
    with pytest.raises(ValueError, match="shape"):
        mask_metrics([np.zeros((2, 2))], [np.zeros((3, 3))])


def test_box_iou() -> None:
    a = np.array([[0, 0, 2, 2], [10, 10, 12, 12], [5, 5, 5, 9]])
    b = np.array([[0, 0, 2, 2], [1, 0, 3, 2]])
    iou = box_iou(a, b)
    assert iou.shape == (3, 2)
    assert iou[0].tolist() == pytest.approx([1.0, 1 / 3])  # overlap 2, union 6
    assert iou[1].tolist() == [0.0, 0.0]  # disjoint
    assert iou[2].tolist() == [0.0, 0.0]  # zero area, no NaN
    assert box_iou([0, 0, 4, 4], [2, 2, 6, 6]).shape == (1, 1)
    assert box_iou([0, 0, 4, 4], [2, 2, 6, 6])[0, 0] == pytest.approx(4 / 28)
    np.testing.assert_allclose(box_iou(b, a), iou.T)
    with pytest.raises(ValueError, match="x1 >= x0"):
        box_iou([2, 0, 0, 2], [0, 0, 1, 1])


def test_calibration_perfect_and_miscalibrated() -> None:
    # 20 samples per bin centre p with exactly p * 20 positives: perfectly calibrated.
    y, s = [], []
    for i in range(10):
        p = 0.05 + 0.1 * i
        positives = round(p * 20)
        y += [1] * positives + [0] * (20 - positives)
        s += [p] * 20
    c = calibration(y, s, bins=10)
    assert c["ece"] == pytest.approx(0.0, abs=1e-12) and c["mce"] == pytest.approx(0.0, abs=1e-12)
    assert [b["count"] for b in c["bins"]] == [20] * 10
    assert c["bins"][3]["observed_frequency"] == pytest.approx(0.35)

    bad = calibration([0, 0, 0, 1], [0.9, 0.9, 0.9, 1.0], bins=5)
    # Only the last bin is used (1.0 falls in it): mean predicted 0.925, observed 0.25.
    assert bad["ece"] == pytest.approx(0.675)
    assert bad["bins"][0]["mean_predicted"] is None and bad["bins"][4]["count"] == 4
    assert bad["brier"] == pytest.approx((3 * 0.81 + 0) / 4)
    with pytest.raises(ValueError, match="probabilities"):
        calibration([0, 1], [0.5, 1.5])


def test_mean_sd_over_folds() -> None:
    folds = [
        {"auc": 0.8, "sens": None, "per_class": {"a": {"f1": 0.5}}, "cm": [[1, 2], [3, 4]], "name": "f0"},
        {"auc": 0.9, "sens": 0.5, "per_class": {"a": {"f1": 0.7}}, "flag": True},
        {"auc": 1.0, "sens": 0.7, "per_class": {"a": {"f1": float("nan")}}},
    ]
    out = mean_sd_over_folds(folds)
    assert set(out) == {"auc", "sens", "per_class.a.f1"}
    assert out["auc"]["mean"] == pytest.approx(0.9)
    assert out["auc"]["sd"] == pytest.approx(0.1)  # sample sd of 0.8, 0.9, 1.0
    assert out["auc"]["folds"] == [0.8, 0.9, 1.0] and out["auc"]["n_skipped"] == 0
    assert out["sens"]["mean"] == pytest.approx(0.6)
    assert out["sens"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert out["sens"]["folds"] == [None, 0.5, 0.7]
    assert (out["sens"]["n_folds"], out["sens"]["n_skipped"]) == (2, 1)
    assert out["per_class.a.f1"]["n_skipped"] == 1
    one = mean_sd_over_folds([{"x": 1.0}, {"x": None}])
    assert one["x"]["mean"] == 1.0 and one["x"]["sd"] is None


def test_roc_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        s = np.round(rng.normal(y * 0.5, 1.0), 1)  # coarse: many ties
        assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert roc_auc([1, 1], [0.2, 0.3]) is None


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    return roc_auc(y, s)


def test_bootstrap_ci_contains_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    s = rng.normal(y * 1.0, 1.0)
    ci = bootstrap_ci(y, s, _auc, n=300, seed=1)
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert ci["estimate"] == pytest.approx(roc_auc_score(y, s))
    assert (ci["unit"], ci["n_units"], ci["n_boot"], ci["n_failed"]) == ("sample", 120, 300, 0)
    assert bootstrap_ci(y, s, _auc, n=300, seed=1) == ci


def test_bootstrap_ci_resamples_groups() -> None:
    # 12 cases, each photographed 10 times with identical results: really 12 observations, not 120.
    rng = np.random.default_rng(0)
    case_y = np.array([0, 1] * 6)
    case_s = rng.normal(case_y * 1.0, 1.0)
    y, s = np.repeat(case_y, 10), np.repeat(case_s, 10)
    groups = np.repeat([f"case{i}" for i in range(12)], 10)
    by_group = bootstrap_ci(y, s, _auc, n=400, seed=0, groups=groups)
    by_sample = bootstrap_ci(y, s, _auc, n=400, seed=0)
    assert (by_group["unit"], by_group["n_units"]) == ("group", 12)
    assert by_group["low"] <= by_group["estimate"] <= by_group["high"]
    # Pretending the 120 images are independent understates the uncertainty.
    assert by_group["high"] - by_group["low"] > 1.5 * (by_sample["high"] - by_sample["low"])

    # Tiny data: some resamples have one class and are counted, not silently scored.
    tiny = bootstrap_ci([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], _auc, n=200, seed=0, groups=["a", "b", "c", "d"])
    assert 0 < tiny["n_failed"] < 200


def test_a_share_is_reported_pooled_per_fold_and_with_a_group_interval() -> None:
    hit = np.array([1, 1, 0, 1, 0, 0, 1, 1], bool)
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    groups = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    share = share_with_spread(hit, folds, groups)
    assert (share["pooled"], share["n"], share["folds"]) == (0.625, 8, [0.75, 0.5])
    assert share["fold_sd"] == pytest.approx(0.125)
    assert share["ci95"]["unit"] == "group" and share["ci95"]["n_units"] == 4
    assert 0.0 <= share["ci95"]["low"] <= share["pooled"] <= share["ci95"]["high"] <= 1.0
