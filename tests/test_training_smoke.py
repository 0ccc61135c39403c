"""Train -> evaluate -> export -> load, for every task, on tiny data: the whole offline path in minutes.

The numbers these tiny models reach mean nothing; what is checked is that every step runs, writes what
the next step reads, and that the exported model is one the service can load and run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.inference.manifest import read_manifest
from service.pipeline.case_risk import CASE_FEATURES, CaseModel
from training.__main__ import main as training_cli
from training.export import ort_session

TINY = ["--epochs", "1", "--pretrain-epochs", "1", "--batch-size", "4", "--workers", "0"]
# The detector and quality models fit heads on frozen features: no epochs, but views per photo to shrink.
TINY_HEADS = {
    "detector": ["--looks", "1", "--negative-looks", "1", "--surrounds", "3", "--no-suite"],
    # Inner folds on training crops, whatever the default: served ones need a detector for every fold, and
    # the tiny detector trains one (tests/test_quality_heads.py covers the served rule).
    "quality": ["--train-variants", "2", "--eval-variants", "1", "--no-suite", "--inner-crops", "training"],
    "severity": ["--inner-repeats", "1", "--threads", "1"],  # nothing trained end to end
    # The segmenter's decoder trains on cached frozen features: epochs, but no pretraining or workers.
    "segmenter": ["--epochs", "1", "--batch-size", "4", "--real-views", "1", "--no-detector"],
}
TINY_DATA = {
    "detector": ["--synthetic-subjects", "14", "--max-real", "40", "--folds", "0"],
    "quality": ["--synthetic-subjects", "8", "--max-real", "30", "--folds", "0"],
    "segmenter": ["--synthetic-subjects", "21", "--max-real", "12", "--folds", "0"],
    "severity": ["--max-cases", "16"],
}


def train_evaluate_export(task: str, tmp_path: Path, *extra: str) -> dict:
    """Run the three steps as `make models` does; return the training summary."""
    run_dir, models_dir = tmp_path / "runs" / task, tmp_path / "models"
    tiny = TINY_HEADS.get(task, TINY)
    training_cli(["train", task, "--output-dir", str(run_dir), *tiny, *TINY_DATA[task], *extra])
    summary = json.loads((run_dir / "metrics.json").read_text())
    if task != "severity":  # the only task without synthetic data
        assert summary["synthetic_split"] == "synthetic-holdout-s0"

    training_cli(["evaluate", task, "--run-dir", str(run_dir)])
    report = (run_dir / "report" / "report.md").read_text()
    assert "Held-out cases only" in report
    assert any(p.suffix == ".png" for p in (run_dir / "report").iterdir())

    # One-epoch models on a few images carry BatchNorm statistics from two batches: near-zero variances
    # amplify float rounding, so parity is looser here. The shipped models are held to 1e-4
    # (tests/test_shipped_models.py).
    export = ["export", task, "--run-dir", str(run_dir), "--models-dir", str(models_dir)]
    training_cli([*export, "--parity-atol", "1e-2"])
    manifest = read_manifest(models_dir / task)  # verifies the sha256 as the service does
    assert manifest.command.startswith("python") and f"train {task}" in manifest.command
    session = ort_session(models_dir / task / "model.onnx", threads=1)
    spec = manifest.input
    batch = np.zeros((2, len(spec.channels), spec.height, spec.width), np.float32)
    outputs = session.run(None, {spec.name: batch})
    assert [o.shape[0] for o in outputs] == [2] * len(manifest.outputs)
    return summary


@pytest.mark.slow
def test_detector_then_quality_on_the_crops_its_fold_models_take(tmp_path: Path) -> None:
    detector = train_evaluate_export("detector", tmp_path)
    assert detector["real_split"].startswith("real-gkf5-s0")
    assert (tmp_path / "runs" / "detector" / "fold_heads.npz").is_file()
    # The typicality gate is chosen nested beside the threshold and reaches the manifest as a threshold.
    assert len(detector["fold_max_distances"]) == 1
    thresholds = read_manifest(tmp_path / "models" / "detector").thresholds
    assert set(thresholds) == {"cervix_present", "cervix_distance"}
    assert set(detector["typicality_adds"]["as_taken"]) >= {"rejection_presence_alone", "rejection_both"}
    quality = train_evaluate_export(
        "quality", tmp_path, "--detector-run", str(tmp_path / "runs" / "detector")
    )
    assert quality["real_split"].startswith("real-gkf5-s0")
    assert set(quality["thresholds"]) == {"not_sharp", "not_sharp_balanced", "not_acetic"}
    choice = quality["strength_choice"]
    assert len(choice["fold_focus_c"]) == 1
    assert choice["shipped"]["focus_c"] in (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    # The refit check scores one model per outer fold run, and the refit, on the same synthetic test crops.
    assert len(quality["refit_check"]["fold_models"]) == 1
    assert set(quality["refit_check"]["refit"]) >= {"not_sharp_balanced_sensitivity", "median_score_sharp"}
    manifest = read_manifest(tmp_path / "models" / "quality")
    assert manifest.extra["head_strengths"]["focus_c"] == choice["shipped"]["focus_c"]  # type: ignore[index]
    # The stage view is chosen with its strength, and the exported graph is the chosen view's.
    assert len(choice["fold_stage_view"]) == 1
    view = choice["shipped"]["stage_view"]
    assert view in ("crop224", "crop112", "turns112")
    assert manifest.extra["head_strengths"]["stage_view"].startswith(f"{view}: ")  # type: ignore[index]
    # So are the stage head's class weighting and training pool, and the manifest records the shipped ones.
    assert len(choice["fold_stage_weighting"]) == 1
    weighting = choice["shipped"]["stage_weighting"]
    assert weighting in ("none", "balanced")
    assert manifest.extra["head_strengths"]["stage_weighting"] == weighting  # type: ignore[index]
    synthetic = choice["shipped"]["stage_synthetic"]
    assert len(choice["fold_stage_synthetic"]) == 1 and isinstance(synthetic, bool)
    assert manifest.extra["head_strengths"]["stage_synthetic_crops"] is synthetic  # type: ignore[index]
    assert manifest.extra["backbone"]["pretrained"].startswith("ImageNet")  # type: ignore[index]


@pytest.mark.slow
def test_segmenter_then_severity_on_its_lesion_maps(tmp_path: Path) -> None:
    segmenter = train_evaluate_export("segmenter", tmp_path)
    assert segmenter["real_split"].startswith("real-gkf5-s0")
    assert segmenter["variant"] in ("all_stages", "acetic_only")
    assert [c["fold"] for c in segmenter["fold_choices"]] == [0]
    assert 0.1 <= segmenter["threshold"] <= 0.9
    fold_model = read_manifest(tmp_path / "runs" / "segmenter" / "folds" / "fold0")  # its outer fold's model
    assert fold_model.extra["fold_model"]["fold"] == 0  # type: ignore[index]

    # Whole-frame crops: the detector's fold models take minutes (make models uses them). One segmenter for
    # every photo: this run has fold 0's model only (--segmenter-folds takes one per fold).
    severity = train_evaluate_export(
        "severity", tmp_path, "--segmenter-dir", str(tmp_path / "models" / "segmenter"), "--whole-frame",
        "--segmenter-folds", "none",
    )  # fmt: skip
    assert severity["real_split"] == "real-gkf5-s0"
    assert severity["measured"]["n_cases"] == 16 and severity["deep"]["n_cases"] == 16
    manifest = read_manifest(tmp_path / "models" / "severity")
    assert manifest.extra["segmenter_sha256"] == read_manifest(tmp_path / "models" / "segmenter").sha256
    assert CaseModel.from_extra(manifest.extra).weight.shape == (len(CASE_FEATURES),)
    assert set(manifest.thresholds) == {"cin2plus"}
