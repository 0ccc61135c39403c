from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from training.metrics import (
    binary_metrics,
    bootstrap_ci,
    calibration,
    mean_sd_over_folds,
    multiclass_metrics,
    roc_auc,
)
from training.reports import (
    format_value,
    plot_calibration,
    plot_confusion,
    plot_examples,
    plot_metric_curve,
    plot_roc,
    write_report,
)


def _assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 32 and image.height >= 32
        image.verify()


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    s = 1 / (1 + np.exp(-rng.normal(2.0 * y - 1.0, 1.0)))
    return y, s


def test_format_value() -> None:
    folds = mean_sd_over_folds([{"auc": v} for v in (0.88, 0.91, 0.95, 0.90, 0.92)])["auc"]
    assert format_value(folds) == f"{np.mean([0.88, 0.91, 0.95, 0.90, 0.92]):.3f} ± 0.026 (5 folds)"
    partial = mean_sd_over_folds([{"x": 0.5}, {"x": None}, {"x": 0.7}])["x"]
    assert format_value(partial) == "0.600 ± 0.141 (2 of 3 folds)"
    assert format_value(mean_sd_over_folds([{"x": 0.5}])["x"]) == "0.500 (1 fold)"
    assert format_value(mean_sd_over_folds([{"x": None}])["x"]) == "n/a (0 of 1 folds)"
    assert format_value(mean_sd_over_folds([{"n": 16}, {"n": 17}])["n"]) == "16.5 ± 0.7 (2 folds)"
    assert format_value(mean_sd_over_folds([{"x": 1.0}, {"x": 1.0}])["x"]) == "1.000 ± 0.000 (2 folds)"
    ci = {"estimate": 0.85, "low": 0.79, "high": 0.9, "level": 0.95, "unit": "group"}
    assert format_value(ci) == "0.850 (95 % CI 0.790–0.900, resampling groups)"
    assert (format_value(None), format_value(7), format_value(0.12345), format_value("CIN2+")) == (
        "n/a",
        "7",
        "0.123",
        "CIN2+",
    )


def test_write_report_files_json_markdown_and_rerun(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    y, s = data
    threshold = 0.5
    point = binary_metrics(y, s, threshold, positive_class="CIN2+")
    folds = [binary_metrics(y[i::5], s[i::5], threshold) for i in range(5)]
    groups = np.arange(len(y)) // 2
    metrics = {
        **point,
        "roc_auc_ci": bootstrap_ci(y, s, roc_auc, n=100, seed=0, groups=groups),
        "cross_validation": mean_sd_over_folds(folds),
        "calibration": calibration(y, s, bins=5),
    }

    def custom(path: Path) -> Figure:
        fig = Figure()
        fig.add_subplot().plot([0, 1], [1, 0])
        return fig

    figures = {
        "roc": lambda p: plot_roc(y, s, threshold, p, "CIN2+ ROC"),
        "calibration": lambda p: plot_calibration(metrics["calibration"], p, "Calibration"),
        "custom": custom,
        "array": np.full((40, 60, 3), 200, dtype=np.uint8),
    }
    out = tmp_path / "severity"
    written = write_report(out, "Severity classifier", metrics, split="iarc-gkf5-s0", figures=figures)
    assert set(written) == {"json", "md", "roc", "calibration", "custom", "array"}
    for key in figures:
        assert written[key] == out / f"{key}.png"
        _assert_png(written[key])

    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "iarc-gkf5-s0" and report["name"] == "Severity classifier"
    assert report["metrics"] == json.loads(json.dumps(metrics))  # round-trips exactly
    assert report["figures"]["roc"] == "roc.png"

    md = (out / "report.md").read_text()
    assert "Held-out cases only: iarc-gkf5-s0" in md
    assert "| metric | value | split |" in md
    assert f"| sensitivity | {point['sensitivity']:.3f} | iarc-gkf5-s0 |" in md
    assert "| cross_validation.roc_auc | " in md and " ± " in md and "(5 folds) |" in md
    assert "95 % CI" in md and "resampling groups" in md
    assert "| true \\ predicted | not CIN2+ (0) | CIN2+ (1) |" in md  # names the positive class
    assert "![roc](roc.png)" in md
    assert "calibration.ece" in md and "calibration.bins" not in md

    # No timestamps: a rerun is byte-identical.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_report(out, "Severity classifier", metrics, split="iarc-gkf5-s0", figures=figures)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert before["report.json"] == after["report.json"] and before["report.md"] == after["report.md"]
    assert before["roc.png"] == after["roc.png"]


def test_write_report_nan_becomes_null_and_rejects_bad_input(tmp_path: Path) -> None:
    write_report(tmp_path, "x", {"a": float("nan"), "b": np.float32(0.5), "c": np.int64(3)}, split="s")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"] == {"a": None, "b": 0.5, "c": 3}
    assert "| a | n/a | s |" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="figure name"):
        write_report(tmp_path, "x", {}, split="s", figures={"../escape": np.zeros((4, 4, 3), np.uint8)})
    with pytest.raises(ValueError, match="neither wrote"):
        write_report(tmp_path, "x", {}, split="s", figures={"nothing": lambda p: None})


def test_multiclass_report_confusion_labels(tmp_path: Path) -> None:
    labels = ["normal", "low grade", "CIN2+"]
    proba = np.eye(3)[[0, 1, 2, 2, 1]]
    m = multiclass_metrics([0, 1, 2, 1, 1], proba, labels)
    write_report(tmp_path, "sev", m, split="synthetic-holdout-s0")
    md = (tmp_path / "report.md").read_text()
    assert "| true \\ predicted | normal | low grade | CIN2+ |" in md
    assert "| low grade | 0 | 2 | 1 |" in md
    assert "per_class.CIN2+.precision" in md


def test_plot_helpers(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = data
    assert plot_roc(y, s, 0.5, tmp_path / "roc.png", "ROC") == tmp_path / "roc.png"
    _assert_png(plot_confusion([[5, 1, 0], [2, 3, 1], [0, 0, 4]], ["a", "b", "c"], tmp_path / "cm.png", "CM"))
    _assert_png(plot_calibration(calibration(y, s), tmp_path / "cal.png", "Calibration"))
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in [(600, 800), (64, 48), (300, 300), (20, 500)]
    ]
    images.append(rng.integers(0, 256, (32, 32), dtype=np.uint8))  # grayscale is accepted too
    captions = ["p=0.91 CIN2+ (true CIN2+)", "p=0.10", "a very long caption " * 4, "", "grey"]
    _assert_png(plot_examples(images, captions, tmp_path / "nested" / "examples.png", cols=3))
    _assert_png(plot_examples([], [], tmp_path / "none.png"))
    _assert_png(
        plot_metric_curve(
            [0, 1, 2, 4],
            {"laplacian var": [1.0, 0.6, 0.3, 0.1], "tenengrad": [1.0, None, 0.5, 0.2]},
            tmp_path / "curve.png",
            "Focus vs blur",
            "blur sigma (px)",
            "normalised focus",
        )
    )
    with pytest.raises(ValueError, match="both classes"):
        plot_roc([1, 1], [0.2, 0.3], 0.5, tmp_path / "bad.png", "bad")
    with pytest.raises(ValueError, match="captions"):
        plot_examples(images, captions[:1], tmp_path / "bad.png")
