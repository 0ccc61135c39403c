"""Severity classifier: acetic-acid cervix crop, RGB + lesion probability -> P(CIN2+).

The 4th channel is the shipped lesion segmenter's probability map, computed with ONNX Runtime from
`--segmenter-dir` exactly as the service computes it (run `train/export segmenter` first). Sources:
atlas acetic-acid photos labelled with their case's histology (HSIL = CIN2+, LSIL = not) and
synthetic subjects from a seed range the segmenter never saw. Real figures come from the fixed
grouped 5-fold over atlas cases, with and without the U-Net++/RepVGG paper's test-time voting.

    python -m training train severity --output-dir runs/severity
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from service.manifest import InputSpec, Manifest, OutputSpec, read_manifest
from service.preprocess import crop, fit, normalize, prepare
from service.voting import PAPER_BRIGHTNESS, PAPER_WEIGHTS, variant_batch, voting_variants
from training import engine, metrics, presets, reports
from training import export as export_step
from training.data.records import LabelledImage
from training.models import SeverityNet
from training.sources import synthetic_subjects
from training.tasks import common

TASK = "severity"
STAGE = "acetic"
# Synthetic severity subjects are drawn from seeds the segmenter (seeds 0..) never trained on, so its
# lesion channel here is as good as it will be on new patients, not better.
FIRST_SYNTHETIC_SEED = 100_000
VOTING_ORDER = tuple(PAPER_WEIGHTS)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    common.add_common_arguments(parser, epochs=8, batch_size=32, lr=3e-3, pretrain_epochs=8)
    parser.add_argument(
        "--segmenter-dir",
        type=Path,
        default=Path("models/segmenter"),
        help="exported segmenter (model.onnx + manifest.json) for the 4th channel",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.95,
        help="operating point: CIN2+ sensitivity on pooled held-out real folds",
    )
    parser.add_argument(
        "--lesion-only-rate",
        type=float,
        default=0.25,
        help="share of training samples shown lesion-only, as voting does",
    )
    return parser


@dataclass(frozen=True)
class SeverityCrop:
    """An eval-path crop and its lesion channel: the costly part (segmenter inference), made once."""

    rgb: np.ndarray  # HxWx3 uint8 at model input size (letterboxed cervix crop)
    lesion: np.ndarray  # HxW uint8, segmenter probability x 255, aligned with rgb
    cin2plus: float
    subject: str


@dataclass(frozen=True)
class SeveritySample:
    tensor: np.ndarray  # 4xHxW float32
    cin2plus: float


class LesionChannel:
    """The segmenter as the service runs it: ONNX Runtime on the manifest's preprocessing."""

    def __init__(self, segmenter_dir: Path) -> None:
        if not (segmenter_dir / "manifest.json").is_file():
            raise FileNotFoundError(
                f"no exported segmenter in {segmenter_dir}: run `python -m training train segmenter` and "
                "`python -m training export segmenter` first (make models does both), or pass --segmenter-dir"
            )
        self.manifest: Manifest = read_manifest(segmenter_dir)  # verifies the sha256
        self.session = export_step.ort_session(segmenter_dir / "model.onnx")
        severity_spec = presets.INPUT_SPECS[TASK]
        spec = self.manifest.input
        if (spec.width, spec.height, spec.resize) != (
            severity_spec.width,
            severity_spec.height,
            severity_spec.resize,
        ):
            raise ValueError(
                "segmenter and severity inputs must share size and resize rule: the map is used as is"
            )

    def __call__(self, crop_rgb: np.ndarray) -> np.ndarray:
        tensor, _ = prepare(crop_rgb, self.manifest.input)
        (logits,) = self.session.run(["lesion_logits"], {self.manifest.input.name: tensor})
        probability = 1.0 / (1.0 + np.exp(-logits[0, 0]))
        return np.round(probability * 255.0).astype(np.uint8)


def make_crops(images: list[LabelledImage], lesion_channel: LesionChannel, desc: str) -> list[SeverityCrop]:
    spec = presets.INPUT_SPECS[TASK]
    crops = []
    for image in tqdm(images, desc=desc, leave=False):
        region = crop(image.image, presets.cervix_region(image))
        fitted, _ = fit(region, spec)
        if image.labels.severity is None:
            raise ValueError(f"{image.subject}: severity training needs a histology grade")
        cin2plus = float(image.labels.severity.is_cin2plus)
        crops.append(SeverityCrop(fitted, lesion_channel(region), cin2plus, image.subject))
    return crops


def severity_sample(
    item: SeverityCrop, rng: np.random.Generator | None, lesion_only_rate: float = 0.25
) -> SeveritySample:
    """Training shows the kinds of input voting makes: flips, brightness, lesion-only (plus colour jitter)."""
    rgb, lesion = item.rgb, item.lesion
    if rng is not None:
        rgb = presets.colour_jitter(rgb, rng)
        if rng.random() < 0.5:
            rgb, lesion = rgb[:, ::-1], lesion[:, ::-1]
        if rng.random() < 0.5:
            rgb, lesion = rgb[::-1], lesion[::-1]
        if rng.random() < lesion_only_rate:
            rgb = voting_variants(rgb, lesion)["lesion_only"][0]
    tensor = normalize(np.ascontiguousarray(np.dstack([rgb, lesion])), presets.INPUT_SPECS[TASK])[0]
    return SeveritySample(tensor, item.cin2plus)


def loss_fn(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], pos_weight: float
) -> torch.Tensor:
    """BCE with the positive class weighted by negatives/positives of the training set (imbalance)."""
    return F.binary_cross_entropy_with_logits(
        outputs["cin2plus_logit"][:, 0], batch["cin2plus"].float(), pos_weight=torch.tensor(pos_weight)
    )


def fit_model(
    items: list[SeverityCrop],
    args: argparse.Namespace,
    base: SeverityNet | None = None,
    *,
    pretraining: bool = False,
) -> SeverityNet:
    positives = sum(item.cin2plus for item in items)
    pos_weight = (len(items) - positives) / max(positives, 1.0)
    transform = partial(severity_sample, lesion_only_rate=args.lesion_only_rate)
    dataset = engine.SampleDataset(items, transform, args.seed)
    loss = partial(loss_fn, pos_weight=pos_weight)
    return common.fit_stage(SeverityNet, base, dataset, loss, args, TASK, pretraining=pretraining)


@torch.inference_mode()
def score(model: SeverityNet, items: list[SeverityCrop]) -> dict[str, np.ndarray]:
    """P(CIN2+) from the original input alone and from the weighted vote over the paper's six variants."""
    model.eval()
    spec = presets.INPUT_SPECS[TASK]
    weights = np.array([PAPER_WEIGHTS[name] for name in VOTING_ORDER])
    single, voted = [], []
    for item in items:
        batch = variant_batch(voting_variants(item.rgb, item.lesion), VOTING_ORDER, spec)
        probability = torch.sigmoid(model(torch.from_numpy(batch))["cin2plus_logit"][:, 0]).numpy()
        single.append(probability[VOTING_ORDER.index("original")])
        voted.append(float(probability @ weights / weights.sum()))
    return {
        "p_single": np.array(single),
        "p_voting": np.array(voted),
        "cin2plus": np.array([item.cin2plus for item in items]),
        "subject": np.array([item.subject for item in items]),
    }


def main(args: argparse.Namespace) -> dict[str, object]:
    common.configure_torch(args)
    lesion_channel = LesionChannel(args.segmenter_dir)
    real = common.real_data(TASK, args)
    count, synthetic_split = common.synthetic_split(TASK, args)
    # One photo per subject: list index == the subject's index in the synthetic split.
    synthetic = synthetic_subjects(FIRST_SYNTHETIC_SEED, count, (STAGE,))
    keep = [i for i, image in enumerate(synthetic) if image.labels.cervix_present]
    crops = make_crops([synthetic[i] for i in keep], lesion_channel, "synth crops")
    synthetic_crops = dict(zip(keep, crops, strict=True))
    real_crops = make_crops(real.images, lesion_channel, "real crops")
    synthetic_train = [synthetic_crops[i] for i in synthetic_split.train if i in synthetic_crops]
    synthetic_test = [synthetic_crops[i] for i in synthetic_split.test if i in synthetic_crops]

    base = fit_model(synthetic_train, args, pretraining=True) if args.pretrain_epochs else None

    def with_replay(items: list[SeverityCrop]) -> list[SeverityCrop]:
        return items + common.replay(synthetic_train, args.replay, len(items), args.seed)

    held_out = []
    for fold in common.folds_to_run(args, len(real.folds)):
        split = real.folds[fold]
        model = fit_model(with_replay(common.pick(real_crops, split.train)), args, base)
        out = score(model, common.pick(real_crops, split.val))
        out["fold"] = np.full(len(split.val), fold)
        held_out.append(out)

    model = fit_model(with_replay(real_crops), args, base)
    synthetic_eval = score(model, synthetic_test)
    engine.save_checkpoint(
        args.output_dir / "model.pth",
        model,
        args,
        command=common.command_line(args),
        segmenter_sha256=lesion_channel.manifest.sha256,
    )
    common.save_predictions(args.output_dir, held_out=held_out, synthetic_test=synthetic_eval)
    summary = summarise(
        held_out,
        synthetic_eval,
        args,
        real_split=common.split_family(real.folds),
        synthetic_split=synthetic_split.name,
    )
    summary["segmenter"] = {
        "version": lesion_channel.manifest.version,
        "sha256": lesion_channel.manifest.sha256,
    }
    engine.write_json(args.output_dir / "metrics.json", summary)
    return summary


def _per_case(out: dict[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean probability per case (a case's photos are not independent; histology is per case)."""
    cases = np.unique(out["subject"])
    y = np.array([out["cin2plus"][out["subject"] == c][0] for c in cases])
    p = np.array([out[key][out["subject"] == c].mean() for c in cases])
    return y, p


def summarise(
    held_out: list[dict[str, np.ndarray]],
    synthetic_eval: dict[str, np.ndarray],
    args: argparse.Namespace,
    *,
    real_split: str,
    synthetic_split: str,
) -> dict[str, object]:
    summary: dict[str, object] = {"real_split": real_split, "synthetic_split": synthetic_split}
    for mode in ("single", "voting"):
        key = f"p_{mode}"
        if held_out:
            pooled = {k: np.concatenate([h[k] for h in held_out]) for k in held_out[0]}
            threshold = metrics.threshold_for_sensitivity(
                pooled["cin2plus"], pooled[key], args.target_sensitivity
            )
            folds = [
                metrics.binary_metrics(h["cin2plus"], h[key], threshold, positive_class="CIN2+")
                for h in held_out
            ]
            case_y, case_p = _per_case(pooled, key)
            summary[f"{mode}_threshold"] = threshold
            summary[f"{mode}_real_held_out"] = metrics.mean_sd_over_folds(folds)
            summary[f"{mode}_real_pooled"] = metrics.binary_metrics(
                pooled["cin2plus"], pooled[key], threshold, positive_class="CIN2+"
            )
            summary[f"{mode}_real_pooled_roc_auc_ci"] = metrics.bootstrap_ci(
                pooled["cin2plus"], pooled[key], metrics.roc_auc, groups=pooled["subject"]
            )
            summary[f"{mode}_real_per_case"] = metrics.binary_metrics(
                case_y, case_p, threshold, positive_class="CIN2+"
            )
        summary[f"{mode}_synthetic_test"] = metrics.binary_metrics(
            synthetic_eval["cin2plus"],
            synthetic_eval[key],
            float(summary.get(f"{mode}_threshold", 0.5)),  # type: ignore[arg-type]
            positive_class="CIN2+",
        )
    summary["threshold_rule"] = (
        f"highest P(CIN2+) threshold with CIN2+ sensitivity >= {args.target_sensitivity} on the pooled "
        "held-out real folds, chosen separately with and without voting"
    )
    return summary


CHANGELOG = (
    "1.0.0: first release.",
    "1.1.0: same network and recipe, retrained on the lesion maps of segmenter 2.0.0 (learned from real "
    "clinician outlines); thresholds re-chosen by the same rule.",
)
get_step_parser = partial(common.get_step_parser, version=CHANGELOG[-1].split(":")[0])

OUTPUTS = (OutputSpec(name="cin2plus_logit", shape=("batch", 1), description="logit of P(CIN2+)"),)


def report(args: argparse.Namespace) -> dict[str, Path]:
    run_dir: Path = args.run_dir
    summary = json.loads((run_dir / "metrics.json").read_text())
    predictions = common.load_predictions(run_dir)
    figures: dict[str, reports.FigureSpec] = {}
    real = predictions.get("held_out")
    if real is not None and len(np.unique(real["cin2plus"])) == 2:
        for mode in ("single", "voting"):
            threshold = summary[f"{mode}_threshold"]
            figures[f"roc_{mode}_real_held_out"] = partial(
                reports.plot_roc,
                real["cin2plus"],
                real[f"p_{mode}"],
                threshold,
                title=f"CIN2+, held-out atlas cases ({'with' if mode == 'voting' else 'without'} voting)",
            )
            figures[f"confusion_{mode}_real_held_out"] = partial(
                reports.plot_confusion,
                summary[f"{mode}_real_pooled"]["confusion_matrix"],
                ["not CIN2+", "CIN2+"],
                title=f"Held-out atlas photos ({mode})",
            )
        figures["calibration_voting_real_held_out"] = partial(
            reports.plot_calibration,
            metrics.calibration(real["cin2plus"], real["p_voting"]),
            title="Calibration",
        )
    figures["examples_synthetic_test"] = partial(_plot_examples, run_dir, args.atlas)
    return reports.write_report(
        run_dir / "report",
        "Severity classifier (CIN2+)",
        summary,
        split=summary.get("real_split", "synthetic"),
        figures=figures,
        notes=(
            "Real figures: atlas acetic-acid photos of held-out cases (grouped 5-fold), histology per "
            "case (HSIL = CIN2+). 'single' scores the original input; 'voting' is the weighted vote over "
            "the paper's six variants, computed as the service computes it (service.voting).",
            "The atlas is small (44 cases, about three HSIL per LSIL): confidence intervals are wide.",
        ),
    )


def _plot_examples(run_dir: Path, atlas: Path, path: Path) -> Path:
    """The final model on held-out synthetic subjects: RGB with the lesion channel tinted yellow."""
    model, checkpoint = common.load_final(run_dir, SeverityNet)
    args = argparse.Namespace(**checkpoint["args"])
    _, split = common.synthetic_split(TASK, args)
    photos = [synthetic_subjects(FIRST_SYNTHETIC_SEED + i, 1, (STAGE,))[0] for i in split.test[:16]]
    photos = [photo for photo in photos if photo.labels.cervix_present][:12]
    items = make_crops(photos, LesionChannel(args.segmenter_dir), "examples")
    out = score(model, items)
    drawn = [
        (
            item.rgb * (1 - item.lesion[..., None] / 510)
            + np.array([255, 230, 0]) * item.lesion[..., None] / 510
        ).astype(np.uint8)
        for item in items
    ]
    captions = [
        f"P(CIN2+) {p:.2f} voted, truth {'CIN2+' if y else 'not'}"
        for p, y in zip(out["p_voting"], out["cin2plus"], strict=True)
    ]
    return reports.plot_examples(drawn, captions, path)


def export(args: argparse.Namespace) -> export_step.ExportResult:
    return common.export_task(args, TASK, SeverityNet, describe, parity_input)


def parity_input(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    fitted, _ = fit(rgb, spec)
    lesion = (fitted.mean(axis=2) > 140).astype(np.uint8) * 255  # any plausible 4th channel will do
    return normalize(np.dstack([fitted, lesion]), spec)


def describe(summary: dict, checkpoint: dict) -> common.TaskDescription:
    return common.TaskDescription(
        outputs=OUTPUTS,
        thresholds={
            "cin2plus": float(summary.get("voting_threshold", 0.5)),
            "cin2plus_single": float(summary.get("single_threshold", 0.5)),
        },
        extra={
            "probability": "sigmoid(cin2plus_logit); refer when the vote >= thresholds.cin2plus",
            "lesion_channel": "the segmenter's sigmoid x 255 on the same letterboxed crop, as uint8",
            "segmenter_sha256": checkpoint.get("segmenter_sha256"),
            "voting": {
                "order": list(VOTING_ORDER),
                "weights": PAPER_WEIGHTS,
                "brightness": PAPER_BRIGHTNESS,
                "rule": "service.voting: weighted mean of P(CIN2+) over the variants",
            },
            "crop_margin": presets.CROP_MARGIN,
        },
        intended_use=(
            "Estimate, from an acetic-acid cervix photo, the probability of CIN2+ to support a referral "
            "decision by a trained health worker. Research reference model, not a medical device."
        ),
        limitations=(
            "Real training data is 44 atlas cases with case-level histology (HSIL vs LSIL, no normals): "
            "specificity on a screening population (mostly normal) is unmeasured. The lesion channel comes "
            "from the shipped segmenter, which learned from outlines of some of these atlas photos: on the "
            "held-out folds the lesion channel itself is not held out."
        ),
        changelog=list(CHANGELOG),
    )
