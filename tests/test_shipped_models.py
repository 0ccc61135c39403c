"""The four models in models/ keep the contract: each manifest verifies, says what training used, and the
ONNX model runs on the input its manifest describes. Behaviour is checked on held-out synthetic subjects
only (the real cases are all in the shipped models' training data)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from service.inference.manifest import Manifest, read_manifest
from service.inference.preprocess import crop, fit, normalize, prepare
from service.inference.runtime import ModelConfigurationError, load_models
from service.pipeline import measures
from service.pipeline.case_risk import CaseModel
from service.pipeline.rules import Rules
from service.settings import Settings
from training import presets
from training.data.synthetic import generate_scene, generate_subject
from training.export import ort_session
from training.sources import SYNTHETIC_SIZE
from training.tasks import common

MODELS = Path(__file__).resolve().parents[1] / "models"
TASKS = ("detector", "quality", "segmenter", "severity")


def manifest_of(task: str) -> Manifest:
    return read_manifest(MODELS / task)  # verifies model.onnx against its sha256


def held_out_synthetic_seeds(task: str, count: int) -> list[int]:
    """Seeds of synthetic test subjects of the task's split: never trained on."""
    args = argparse.Namespace(synthetic_subjects=None)
    _, split = common.synthetic_split(task, args)
    return sorted(split.test)[:count]


@pytest.mark.parametrize("task", TASKS)
def test_manifest_verifies_and_matches_the_training_presets(task: str) -> None:
    manifest = manifest_of(task)
    assert manifest.name == task
    assert manifest.input == presets.INPUT_SPECS[task], "training and serving must preprocess alike"
    if task == "severity":  # case level on real cases only: nothing is learned from synthetic pixels
        assert manifest.metrics["real_split"] == "real-gkf5-s0"
    else:
        assert manifest.metrics["synthetic_split"] == "synthetic-holdout-s0"
    assert f"train {task}" in manifest.command
    assert manifest.thresholds and all(0.0 <= t <= 1.0 for t in manifest.thresholds.values())
    export = manifest.extra["export"]
    parity = export["parity_max_abs_diff"]  # type: ignore[index]
    # Each task's export states its tolerance (the quality model's log-energy features need 5e-3 in logit
    # units, i.e. P(sharp) within 1.3e-3); none may be looser than that.
    assert set(parity) == {o.name for o in manifest.outputs}
    assert max(parity.values()) <= export["parity_atol"] <= 5e-3  # type: ignore[index]


@pytest.mark.parametrize("task", TASKS)
def test_model_runs_on_the_input_its_manifest_describes(task: str) -> None:
    manifest = manifest_of(task)
    session = ort_session(MODELS / task / "model.onnx", threads=1)
    image = generate_scene(3, SYNTHETIC_SIZE).image
    if len(manifest.input.channels) == 4:
        rgb, _ = fit(image, manifest.input)
        lesion = (rgb.mean(axis=2) > 110).astype(np.uint8) * 255  # with a border: every measure defined
        tensor = normalize(np.dstack([rgb, lesion]), manifest.input)
    else:
        tensor, _ = prepare(image, manifest.input)
    outputs = session.run(None, {manifest.input.name: tensor})
    for output, spec in zip(outputs, manifest.outputs, strict=True):
        assert output.shape == tuple(1 if d == "batch" else d for d in spec.shape)
        assert np.isfinite(output).all()


def test_models_fit_in_the_size_budget() -> None:
    total = sum((MODELS / task / "model.onnx").stat().st_size for task in TASKS)
    assert total < 40 * 2**20


def test_severity_names_the_segmenter_it_was_measured_with_and_a_case_model_the_service_reads() -> None:
    severity = manifest_of("severity")
    assert severity.extra["segmenter_sha256"] == manifest_of("segmenter").sha256
    model = CaseModel.from_extra(severity.extra)
    assert np.isfinite(model.weight).all() and np.isfinite(model.impute).all()
    # The shipped figures are the nested case-level ones, and they say the model is not shown to beat chance.
    measured = severity.metrics["measured"]
    assert measured["n_cases"] == 44  # type: ignore[index]
    assert measured["roc_auc_ci"]["low"] < 0.5  # type: ignore[index]


def test_quality_manifest_defines_what_its_exposure_thresholds_are_measured_over() -> None:
    recorded = manifest_of("quality").extra["exposure_measure"]
    assert isinstance(recorded, dict)
    assert tuple(recorded["tissue_semi_axes"]) == measures.TISSUE_SEMI_AXES
    assert recorded["saturated_level"] == measures.SATURATED_LEVEL


def test_a_quality_manifest_without_its_exposure_measure_is_refused() -> None:
    models = load_models(Settings())
    extra = {k: v for k, v in models.quality.manifest.extra.items() if k != "exposure_measure"}
    stale = dataclasses.replace(
        models.quality, manifest=models.quality.manifest.model_copy(update={"extra": extra})
    )
    with pytest.raises(ModelConfigurationError, match="re-export"):
        Rules.from_models(dataclasses.replace(models, quality=stale), Settings())


def test_detector_tells_held_out_synthetic_scenes_with_and_without_a_cervix() -> None:
    manifest = manifest_of("detector")
    session = ort_session(MODELS / "detector" / "model.onnx", threads=1)
    correct: dict[bool, list[bool]] = {True: [], False: []}  # by whether the scene has a cervix
    for seed in held_out_synthetic_seeds("detector", 30):
        scene = generate_scene(seed, SYNTHETIC_SIZE)
        tensor, _ = prepare(scene.image, manifest.input)
        names = [output.name for output in session.get_outputs()]
        out = dict(zip(names, session.run(None, {manifest.input.name: tensor}), strict=True))
        # The service's rule: the presence score at its threshold and a typical photo (2.2.0's distance).
        score = 1 / (1 + np.exp(-out["cervix_logit"][0, 0]))
        typical = out["cervix_distance"][0, 0] <= manifest.thresholds["cervix_distance"]
        called = score >= manifest.thresholds["cervix_present"] and typical
        correct[scene.labels.cervix_present].append(called == scene.labels.cervix_present)
    # Scored per group: 24 of the 30 scenes have a cervix, so "always present" alone would reach 0.8.
    assert len(correct[False]) >= 3
    assert np.mean(correct[True]) >= 0.8 and np.mean(correct[False]) >= 0.8


def test_segmenter_overlaps_held_out_synthetic_lesions() -> None:
    manifest = manifest_of("segmenter")
    session = ort_session(MODELS / "segmenter" / "model.onnx", threads=1)
    dice = []
    for seed in held_out_synthetic_seeds("segmenter", 20):
        photo = generate_subject(seed, SYNTHETIC_SIZE, ("acetic",))[0]
        mask = photo.labels.lesion_mask
        if not photo.labels.cervix_present or mask is None or not mask.any():
            continue
        region = presets.cervix_region(photo)
        tensor, _ = prepare(crop(photo.image, region), manifest.input)
        (logits,) = session.run(None, {manifest.input.name: tensor})
        truth = presets.segmentation_sample(photo, None).mask > 0
        predicted = 1 / (1 + np.exp(-logits[0, 0])) >= manifest.thresholds["lesion"]
        dice.append(2 * (predicted & truth).sum() / max(predicted.sum() + truth.sum(), 1))
    assert len(dice) >= 5
    assert np.median(dice) >= 0.3


def test_cervix_too_small_follows_the_quality_manifest_unless_set() -> None:
    models = load_models(Settings())
    assert Rules.from_models(models, Settings()).min_crop_px == models.quality.manifest.extra["min_cervix_px"]
    assert Rules.from_models(models, Settings(min_cervix_crop_px=300)).min_crop_px == 300
    extra = {k: v for k, v in models.quality.manifest.extra.items() if k != "min_cervix_px"}
    stale = dataclasses.replace(
        models.quality, manifest=models.quality.manifest.model_copy(update={"extra": extra})
    )
    with pytest.raises(ModelConfigurationError, match="min_cervix_px"):
        Rules.from_models(dataclasses.replace(models, quality=stale), Settings())
