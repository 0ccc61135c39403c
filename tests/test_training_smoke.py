"""Train -> evaluate -> export -> load, for every task, on tiny data: the whole offline path in minutes.

The numbers these tiny models reach mean nothing; what is checked is that every step runs, writes what
the next step reads, and that the exported model is one the service can load and run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.manifest import read_manifest
from training.__main__ import main as training_cli
from training.export import ort_session

TINY = [
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--synthetic-subjects",
    "14",
    "--max-real",
    "12",
]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detector"])
def test_train_evaluate_export_load(task: str, tmp_path: Path) -> None:
    run_dir, models_dir = tmp_path / "run", tmp_path / "models"
    training_cli(["train", task, "--output-dir", str(run_dir), "--folds", "0", *TINY])
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["real_split"].startswith("real-gkf5-s0")
    assert summary["synthetic_split"] == "synthetic-holdout-s0"

    training_cli(["evaluate", task, "--run-dir", str(run_dir)])
    report = (run_dir / "report" / "report.md").read_text()
    assert "Held-out cases only" in report
    assert any(p.suffix == ".png" for p in (run_dir / "report").iterdir())

    training_cli(["export", task, "--run-dir", str(run_dir), "--models-dir", str(models_dir)])
    manifest = read_manifest(models_dir / task)  # verifies the sha256 as the service does
    assert manifest.command.startswith("python") and "train" in manifest.command
    session = ort_session(models_dir / task / "model.onnx", threads=1)
    spec = manifest.input
    batch = np.zeros((2, len(spec.channels), spec.height, spec.width), np.float32)
    outputs = session.run(None, {spec.name: batch})
    assert [o.shape[0] for o in outputs] == [2] * len(manifest.outputs)
