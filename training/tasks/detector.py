"""Cervix detector: whole letterboxed photo -> P(cervix present) and one box.

Positives: atlas photos (presence only: the atlas has no boxes) and synthetic scenes (with boxes).
Negatives: synthetic scenes without a cervix and scikit-image's real photos. Real-data metrics
come from the fixed grouped 5-fold over atlas cases and scikit-image subjects.

    python -m training train detector --output-dir runs/detector
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

from service.manifest import OutputSpec
from service.preprocess import prepare
from training import engine, metrics, presets, reports
from training import export as export_step
from training.data.records import LabelledImage
from training.data.synthetic import generate_scene
from training.models import CervixDetector
from training.sources import SYNTHETIC_SIZE, synthetic_scenes
from training.tasks import common

TASK = "detector"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    common.add_common_arguments(parser, epochs=4, batch_size=32, lr=3e-3, pretrain_epochs=10)
    parser.add_argument("--box-weight", type=float, default=5.0, help="box L1 loss weight vs presence BCE")
    parser.add_argument("--target-recall", type=float, default=0.98,
                        help="operating point: recall of real cervix photos on held-out folds")  # fmt: skip
    return parser


def loss_fn(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], box_weight: float
) -> torch.Tensor:
    present = batch["present"].float()
    presence = F.binary_cross_entropy_with_logits(outputs["cervix_logit"][:, 0], present)
    has_box = (batch["box_known"] * present).float()
    box_l1 = (F.l1_loss(outputs["box"], batch["box_target"], reduction="none").sum(1) * has_box).sum()
    return presence + box_weight * box_l1 / has_box.sum().clamp(min=1.0)


def evaluate(
    model: nn.Module, images: list[LabelledImage], args: argparse.Namespace
) -> dict[str, np.ndarray]:
    """Predictions and targets on the deterministic eval path (the service's preprocessing)."""
    dataset = engine.SampleDataset(images, lambda image, _rng: presets.detector_eval(image), args.seed)
    out = engine.predict(
        model, engine.loader(dataset, args.batch_size, shuffle=False, seed=args.seed, workers=0)
    )
    out["score"] = 1.0 / (1.0 + np.exp(-out["cervix_logit"][:, 0]))
    return out


def fit(
    train_images: list[LabelledImage],
    args: argparse.Namespace,
    base: CervixDetector | None = None,
    *,
    pretraining: bool = False,
) -> CervixDetector:
    """Synthetic pretraining (`pretraining=True`), or a fit on real photos starting from `base`."""
    engine.seed_everything(args.seed)
    dataset = engine.SampleDataset(train_images, presets.detector_train, args.seed)
    loss = partial(loss_fn, box_weight=args.box_weight)
    return common.fit_stage(CervixDetector, base, dataset, loss, args, TASK, pretraining=pretraining)


def box_iou_of(out: dict[str, np.ndarray]) -> np.ndarray:
    """IoU of predicted vs labelled boxes (cx, cy, w, h in input units) where a box is labelled."""
    known = (out["box_known"] > 0) & (out["present"] > 0)

    def corners(cxcywh: np.ndarray) -> np.ndarray:
        cx, cy, w, h = cxcywh.T
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)

    pred, true = corners(out["box"][known]), corners(out["box_target"][known])
    return np.diag(metrics.box_iou(pred, true)) if len(pred) else np.zeros(0)


def main(args: argparse.Namespace) -> dict[str, object]:
    common.configure_torch(args)
    real = common.real_data(TASK, args)
    count, synthetic_split = common.synthetic_split(TASK, args)
    synthetic = synthetic_scenes(0, count)
    synthetic_train = common.pick(synthetic, synthetic_split.train)
    # Pretraining sees synthetic scenes only, so every real fold may start from it.
    base = fit(synthetic_train, args, pretraining=True) if args.pretrain_epochs else None

    def with_replay(real_images: list[LabelledImage]) -> list[LabelledImage]:
        return real_images + common.replay(synthetic_train, args.replay, len(real_images), args.seed)

    held_out: list[dict[str, np.ndarray]] = []
    for fold in common.folds_to_run(args, len(real.folds)):
        split = real.folds[fold]
        model = fit(with_replay(common.pick(real.images, split.train)), args, base)
        out = evaluate(model, common.pick(real.images, split.val), args)
        out["fold"] = np.full(len(split.val), fold)
        out["source"] = np.array([real.records[i].source for i in split.val])
        held_out.append(out)

    model = fit(with_replay(real.images), args, base)
    synthetic_test = evaluate(model, common.pick(synthetic, synthetic_split.test), args)
    engine.save_checkpoint(args.output_dir / "model.pth", model, args, command=common.command_line(args))
    common.save_predictions(args.output_dir, held_out=held_out, synthetic_test=synthetic_test)
    report = summarise(held_out, synthetic_test, args, real_split=common.split_family(real.folds),
                       synthetic_split=synthetic_split.name)  # fmt: skip
    engine.write_json(args.output_dir / "metrics.json", report)
    return report


def summarise(
    held_out: list[dict[str, np.ndarray]], synthetic_test: dict[str, np.ndarray], args: argparse.Namespace,
    *, real_split: str, synthetic_split: str,
) -> dict[str, object]:  # fmt: skip
    summary: dict[str, object] = {"real_split": real_split, "synthetic_split": synthetic_split}
    if held_out:
        pooled = {k: np.concatenate([h[k] for h in held_out]) for k in ("score", "present")}
        threshold = metrics.threshold_for_sensitivity(pooled["present"], pooled["score"], args.target_recall)
        per_fold = [metrics.binary_metrics(h["present"], h["score"], threshold) for h in held_out]
        summary |= {
            "threshold": threshold,
            "threshold_rule": f"highest score with recall >= {args.target_recall} on pooled held-out folds",
            "real_held_out": metrics.mean_sd_over_folds(per_fold),
            "real_pooled": metrics.binary_metrics(pooled["present"], pooled["score"], threshold),
        }
    synthetic_threshold = float(summary.get("threshold", 0.5))  # type: ignore[arg-type]
    summary["synthetic_test"] = metrics.binary_metrics(
        synthetic_test["present"], synthetic_test["score"], synthetic_threshold
    )
    ious = box_iou_of(synthetic_test)
    summary["synthetic_test_box_iou"] = {
        "mean": float(ious.mean()),
        "median": float(np.median(ious)),
        "at_least_0.5": float((ious >= 0.5).mean()),
        "n": len(ious),
    }
    return summary


get_step_parser = common.get_step_parser

OUTPUTS = (
    OutputSpec(name="cervix_logit", shape=("batch", 1), description="logit of P(cervix in the photo)"),
    OutputSpec(name="box", shape=("batch", 4),
               description="cx, cy, w, h of the cervix as fractions of the model input (letterboxed photo)"),
)  # fmt: skip


def report(args: argparse.Namespace) -> dict[str, Path]:
    """Report from the held-out predictions of `train` (real: pooled CV folds; synthetic: test subjects)."""
    run_dir: Path = args.run_dir
    summary = json.loads((run_dir / "metrics.json").read_text())
    predictions = common.load_predictions(run_dir)
    figures: dict[str, reports.FigureSpec] = {}
    real = predictions.get("held_out")
    if real is not None and len(np.unique(real["present"])) == 2:  # tiny smoke runs may hold out one class
        threshold = summary["threshold"]
        figures["roc_real_held_out"] = partial(reports.plot_roc, real["present"], real["score"], threshold,
                                               title="Cervix present, held-out real photos")  # fmt: skip
        cm = summary["real_pooled"]["confusion_matrix"]
        figures["confusion_real_held_out"] = partial(reports.plot_confusion, cm, ["no cervix", "cervix"],
                                                     title="Held-out real photos")  # fmt: skip
        figures["calibration_real_held_out"] = partial(
            reports.plot_calibration, metrics.calibration(real["present"], real["score"]), title="Calibration"
        )
    model, checkpoint = common.load_final(run_dir, CervixDetector)
    figures["examples_synthetic_test"] = partial(_plot_examples, model, checkpoint)
    return reports.write_report(
        run_dir / "report", "Cervix detector", summary, split=summary.get("real_split", "synthetic"),
        figures=figures,
        notes=("Real figures: grouped 5-fold over atlas cases and scikit-image photos, every photo "
               "scored by a model that never saw its case; synthetic figures: held-out synthetic subjects.",),
    )  # fmt: skip


def _plot_examples(model: CervixDetector, checkpoint: dict[str, object], path: Path) -> Path:
    args = argparse.Namespace(**checkpoint["args"])  # type: ignore[arg-type]
    _, split = common.synthetic_split(TASK, args)
    images = [generate_scene(seed, SYNTHETIC_SIZE) for seed in list(split.test)[:12]]
    out = evaluate(model, images, args)
    drawn, captions = [], []
    for i, labelled in enumerate(images):
        _, placement = prepare(labelled.image, presets.INPUT_SPECS[TASK])
        spec = presets.INPUT_SPECS[TASK]
        cx, cy, w, h = out["box"][i] * np.array([spec.width, spec.height, spec.width, spec.height])
        box = placement.to_source((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        canvas = Image.fromarray(labelled.image)
        draw = ImageDraw.Draw(canvas)
        if labelled.labels.cervix_box:
            draw.rectangle(labelled.labels.cervix_box, outline=(0, 255, 0), width=3)
        draw.rectangle(box, outline=(255, 255, 0), width=3)
        drawn.append(np.asarray(canvas))
        captions.append(
            f"P(cervix)={out['score'][i]:.2f} (truth {'yes' if labelled.labels.cervix_present else 'no'})"
        )
    return reports.plot_examples(drawn, captions, path)


def export(args: argparse.Namespace) -> export_step.ExportResult:
    return common.export_task(args, TASK, CervixDetector, describe)


def describe(summary: dict, checkpoint: dict) -> common.TaskDescription:
    return common.TaskDescription(
        outputs=OUTPUTS,
        thresholds={"cervix_present": float(summary.get("threshold", 0.5))},
        extra={
            "box_format": "cx, cy, w, h in 0..1 of the model input; undo the letterbox to get pixels",
            "score": "sigmoid(cervix_logit)",
        },
        intended_use=(
            "Find the cervix in a colposcopy photo so the quality and diagnosis models see a "
            "crop of it; reject photos that show no cervix."
        ),
        limitations=(
            "Trained from scratch on 45 atlas cases (presence only), synthetic scenes (boxes) "
            "and 24 scikit-image photos; boxes were never learned from real photos. Expect "
            "misses on unusual framing, devices and skin tones not in the atlas."
        ),
        changelog=["1.0.0: first release."],
    )
