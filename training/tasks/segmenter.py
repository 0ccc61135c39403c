"""Lesion segmenter: cervix crop (after acetic acid) -> acetowhite lesion probability map.

No real photo here has a lesion mask (the atlas marks lesions with arrows and outlines, which are
removed, not traced), so masks come from synthetic subjects photographed at the acetic-acid stage:
train/val/test by subject (synthetic-holdout-s0). The binarisation threshold is chosen on the val
subjects and every figure is measured on the test subjects. Real atlas photos appear only as
qualitative examples, on request (`--atlas-examples`), never in models/.

    python -m training train segmenter --output-dir runs/segmenter
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from service.inference.manifest import OutputSpec
from service.inference.preprocess import crop, fit, prepare
from training import engine, metrics, presets, reports
from training import export as export_step
from training.data.adapters import iarc_atlas
from training.data.records import LabelledImage
from training.models import LesionSegmenter
from training.sources import synthetic_subjects
from training.tasks import common

TASK = "segmenter"
STAGE = "acetic"  # acetowhite lesions are what the acetic-acid photo shows
THRESHOLD_GRID = np.round(np.arange(0.2, 0.81, 0.05), 2)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    common.add_common_arguments(parser, epochs=10, batch_size=16, lr=3e-3)
    parser.add_argument("--dice-weight", type=float, default=1.0, help="soft Dice loss weight vs BCE")
    return parser


def loss_fn(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], dice_weight: float
) -> torch.Tensor:
    """BCE for calibrated pixels plus soft Dice, so small lesions are not drowned by the background."""
    logits = outputs["lesion_logits"][:, 0]
    target = batch["mask"].float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits)
    inter = (probability * target).sum((1, 2))
    soft_dice = (2 * inter + 1.0) / (probability.sum((1, 2)) + target.sum((1, 2)) + 1.0)
    return bce + dice_weight * (1.0 - soft_dice.mean())


def with_cervix(images: list[LabelledImage]) -> list[LabelledImage]:
    """Only photos that show a cervix are cropped and segmented (the service stops earlier otherwise)."""
    return [image for image in images if image.labels.cervix_present]


def predict(model: torch.nn.Module, images: list[LabelledImage], args: argparse.Namespace) -> dict:
    """Probability maps and true masks at model input size, on the deterministic eval crop."""
    dataset = engine.SampleDataset(
        images, lambda image, _rng: presets.segmentation_sample(image, None), args.seed
    )
    out = engine.predict(
        model, engine.loader(dataset, args.batch_size, shuffle=False, seed=args.seed, workers=0)
    )
    return {"probability": 1.0 / (1.0 + np.exp(-out["lesion_logits"][:, 0])), "mask": out["mask"]}


def best_threshold(out: dict[str, np.ndarray]) -> float:
    """The threshold with the highest mean Dice on lesion-bearing images (chosen on val subjects)."""
    dice = [
        metrics.mask_metrics(out["probability"], out["mask"], t)["mean_dice_lesion"] or 0.0
        for t in THRESHOLD_GRID
    ]
    return float(THRESHOLD_GRID[int(np.argmax(dice))])


def main(args: argparse.Namespace) -> dict[str, object]:
    common.configure_torch(args)
    count, split = common.synthetic_split(TASK, args)
    images = synthetic_subjects(0, count, (STAGE,))  # one photo per subject: index == subject seed

    def subjects(indices: tuple[int, ...]) -> list[LabelledImage]:
        return with_cervix(common.pick(images, indices))

    dataset = engine.SampleDataset(subjects(split.train), presets.segmentation_sample, args.seed)
    model = LesionSegmenter()
    engine.fit(model, dataset, partial(loss_fn, dice_weight=args.dice_weight), args, TASK)

    threshold = best_threshold(predict(model, subjects(split.val), args))
    test = predict(model, subjects(split.test), args)
    engine.save_checkpoint(args.output_dir / "model.pth", model, args, command=common.command_line(args))
    common.save_predictions(args.output_dir, synthetic_test=test)
    summary = {
        "real_split": "none: no real lesion masks are available",
        "synthetic_split": split.name,
        "threshold": threshold,
        "threshold_rule": "highest mean Dice over lesion-bearing val subjects, grid 0.20..0.80",
        "synthetic_test": metrics.mask_metrics(test["probability"], test["mask"], threshold),
        "synthetic_test_pixel_roc_auc": metrics.roc_auc(test["mask"].ravel(), test["probability"].ravel()),
    }
    engine.write_json(args.output_dir / "metrics.json", summary)
    return summary


def get_step_parser(step: str) -> argparse.ArgumentParser:
    parser = common.get_step_parser(step)
    if step == "evaluate":
        parser.add_argument("--atlas-examples", action="store_true",
                            help="also draw predictions on atlas photos (kept out of models/: the atlas is "
                                 "not redistributed)")  # fmt: skip
    return parser


_SPEC = presets.INPUT_SPECS[TASK]
OUTPUTS = (
    OutputSpec(
        name="lesion_logits",
        shape=("batch", 1, _SPEC.height, _SPEC.width),
        description="per-pixel logit of acetowhite lesion, aligned with the model input",
    ),
)


def report(args: argparse.Namespace) -> dict[str, Path]:
    run_dir: Path = args.run_dir
    summary = json.loads((run_dir / "metrics.json").read_text())
    model, checkpoint = common.load_final(run_dir, LesionSegmenter)
    figures: dict[str, reports.FigureSpec] = {
        "examples_synthetic_test": partial(_plot_synthetic_examples, model, checkpoint, summary["threshold"]),
    }
    if args.atlas_examples and args.atlas.is_dir():
        figures["examples_atlas_acetic"] = partial(
            _plot_atlas_examples, model, args.atlas, summary["threshold"]
        )
    return reports.write_report(
        run_dir / "report", "Lesion segmenter", summary, split=summary["synthetic_split"], figures=figures,
        notes=("Masks exist for synthetic subjects only: IoU and Dice are on held-out synthetic test "
               "subjects, the threshold on the val subjects. The atlas has no traced lesions, so no "
               "real-data IoU exists; `evaluate segmenter --atlas-examples` draws atlas examples.",),
    )  # fmt: skip


def _overlay(
    rgb: np.ndarray, probability: np.ndarray, threshold: float, truth: np.ndarray | None
) -> np.ndarray:
    """Predicted lesion tinted yellow; the true outline (where known) in green."""
    out = rgb.astype(np.float32)
    predicted = probability >= threshold
    out[predicted] = 0.55 * out[predicted] + 0.45 * np.array([255, 230, 0])
    if truth is not None:
        edge = truth.astype(bool) ^ np.roll(truth.astype(bool), 1, axis=0) | truth.astype(bool) ^ np.roll(
            truth.astype(bool), 1, axis=1
        )
        out[edge] = (0, 255, 0)
    return out.astype(np.uint8)


def _segment(model: LesionSegmenter, image: LabelledImage) -> tuple[np.ndarray, np.ndarray]:
    """(letterboxed RGB crop, probability map) on the eval path."""
    spec = presets.INPUT_SPECS[TASK]
    crop_rgb = crop(image.image, presets.cervix_region(image))
    tensor, _ = prepare(crop_rgb, spec)
    fitted, _ = fit(crop_rgb, spec)
    with torch.inference_mode():
        logits = model(torch.from_numpy(tensor))["lesion_logits"][0, 0].numpy()
    return fitted, 1.0 / (1.0 + np.exp(-logits))


def _plot_synthetic_examples(
    model: LesionSegmenter, checkpoint: dict[str, object], threshold: float, path: Path
) -> Path:
    args = argparse.Namespace(**checkpoint["args"])  # type: ignore[arg-type]
    _, split = common.synthetic_split(TASK, args)
    images = with_cervix([synthetic_subjects(seed, 1, (STAGE,))[0] for seed in list(split.test)[:14]])[:12]
    drawn, captions = [], []
    for image in images:
        fitted, probability = _segment(model, image)
        truth = presets.segmentation_sample(image, None).mask
        drawn.append(_overlay(fitted, probability, threshold, truth))
        score = metrics.mask_metrics([probability], [truth], threshold)
        captions.append(f"Dice {score['mean_dice']:.2f} ({image.labels.severity.name.lower()})")  # type: ignore[union-attr]
    return reports.plot_examples(drawn, captions, path)


def _plot_atlas_examples(model: LesionSegmenter, atlas: Path, threshold: float, path: Path) -> Path:
    records = [r for r in iarc_atlas(atlas) if r.labels.exam_stage == STAGE][::7][:12]
    drawn, captions = [], []
    for record in records:
        image = record.load()
        fitted, probability = _segment(model, image)
        drawn.append(_overlay(fitted, probability, threshold, None))
        captions.append(f"{record.subject} ({record.labels.severity.name.lower()})")  # type: ignore[union-attr]
    return reports.plot_examples(drawn, captions, path)


def export(args: argparse.Namespace) -> export_step.ExportResult:
    return common.export_task(args, TASK, LesionSegmenter, describe)


def describe(summary: dict, checkpoint: dict) -> common.TaskDescription:
    return common.TaskDescription(
        outputs=OUTPUTS,
        thresholds={"lesion": float(summary["threshold"])},
        extra={
            "crop_margin": presets.CROP_MARGIN,
            "probability": "sigmoid(lesion_logits); lesion where >= thresholds.lesion",
            "exam_stage": "acetic acid photos only",
        },
        intended_use=(
            "Outline acetowhite areas on an acetic-acid cervix crop: the lesion-extent figure and "
            "the severity model's 4th input channel."
        ),
        limitations=(
            "Learned from synthetic masks only (no traced real lesions were available): "
            "its real-photo accuracy is unmeasured. Treat the map as a visual aid, not a margin."
        ),
        changelog=["1.0.0: first release."],
    )
