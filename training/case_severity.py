"""CIN2+ risk per case (one patient's exam), not per photo: photo features, per-case pooling, nested CV.

Histology is a property of the patient, and an atlas case is one patient's exam (saline, acetic acid, Lugol's
iodine, ...), so both candidate models are fitted and scored on cases:

- (a) `deep`: frozen ImageNet EfficientNet-Lite0 features of each acetic-acid photo's cervix crop (global
  average, and the same map pooled with the lesion map as weights), averaged over the case's acetic-acid
  photos, then an L2 logistic regression on cases.
- (b) `measured`: a handful of measured features after the Swede score's ideas (acetowhite area and density,
  whitening from saline to acetic acid, iodine non-uptake, lesion margin sharpness), logistic regression.

Every choice (feature set, C, the operating threshold) is made on the outer training cases only, by an
inner stratified k-fold over those cases (`nested_case_cv`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

from service.pipeline.case_risk import (
    CASE_FEATURES,
    MEASURED_STAGES,
    case_features,
    stage_means,
)
from training import metrics

# The served definitions: per-photo measures (the ONNX outputs, in order) and the case features made of them.
CASE_MEASURES = CASE_FEATURES
LESION_LEVEL = 0.5  # lesion-map probability that counts as acetowhite
# A lesion under 1 % of the tissue has no density or margin to speak of. A pixel count would make both jump
# with the photo's resolution: a 12 MP copy of a photo grew a 0.3 % speck where the 800 px one had none, and
# its P(CIN2+) went from 0.34 to 0.83 (tests/test_service_api.py, 12-megapixel test).
MIN_LESION_SHARE = 0.01


# --- measured features on one photo: a fixed torch graph, exported as the served ONNX model ---------------


class SwedeMeasures(nn.Module):
    """NCHW crop (RGB, lesion probability; each scaled to 0..1) -> N x `PHOTO_MEASURES`; nothing learned.

    One graph for both sides: training measures every photo with its ONNX export and the service runs the
    same file, so a fitted coefficient always meets the feature it was fitted on. nan marks a measure that is
    undefined on a photo (no tissue; no lesion border); pooling over a case's photos skips it.

    - tissue: not the dark surround or letterbox padding (max channel <= 0.15), not specular glare (bright and
      unsaturated: white for reasons that have nothing to do with acetic acid);
    - whiteness: mean of 1 - HSV saturation over tissue; acetic acid turns red epithelium white, and a ratio
      of channels moves far less with a photo's exposure than brightness does;
    - acetowhite area: share of tissue where the lesion map >= 0.5; density: whiteness inside that area
      minus outside it (0 for a lesion under `MIN_LESION_SHARE` of the tissue: no contrast to speak of);
    - margin sharpness: Sobel gradient of whiteness on the lesion border over its mean on the tissue (sharp,
      raised margins score high: a Swede item; nan, so imputed, for a lesion under `MIN_LESION_SHARE`);
    - iodine yellow: share of tissue that is mustard-yellow (HSV hue 28-70 degrees, saturated, not dark):
      no iodine uptake after Lugol's (a Swede item); iodine-positive tissue is darker mahogany brown.
    """

    def forward(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        rgb, lesion = crop[:, :3], crop[:, 3]
        high, low = rgb.max(dim=1).values, rgb.min(dim=1).values
        saturation = torch.where(high > 0, (high - low) / high.clamp(min=1.0 / 255.0), torch.zeros_like(high))
        tissue = (high > 0.15) & ~((high > 0.92) & (saturation < 0.12))
        white = 1.0 - saturation
        on = (lesion >= LESION_LEVEL) & tissue
        outside = tissue & ~on
        n_tissue, n_on, n_out = _count(tissue), _count(on), _count(outside)
        nan = torch.full_like(n_tissue, float("nan"))
        whiteness = torch.where(n_tissue > 0, _mean(white, tissue), nan)
        area = n_on / n_tissue.clamp(min=1.0)
        lesion_found = area >= MIN_LESION_SHARE
        density = torch.where(
            lesion_found & (n_out > 0), _mean(white, on) - _mean(white, outside), torch.zeros_like(n_on)
        )
        binary = (lesion >= LESION_LEVEL).float()[:, None]
        dilated = F.max_pool2d(binary, 3, stride=1, padding=1)
        eroded = -F.max_pool2d(-binary, 3, stride=1, padding=1)
        border = ((dilated - eroded)[:, 0] > 0) & tissue
        gradient = _sobel_magnitude(white)
        margin = torch.where(
            lesion_found & (_count(border) >= 8) & (n_tissue > 0),
            _mean(gradient, border) / (_mean(gradient, tissue) + 1e-3),
            nan,
        )
        hue = _hue_degrees(rgb, high, low)
        yellow_px = (hue >= 28.0) & (hue <= 70.0) & (saturation >= 0.3) & (high >= 0.35) & tissue
        yellow = torch.where(n_tissue > 0, _count(yellow_px) / n_tissue.clamp(min=1.0), nan)
        return {"measures": torch.stack([whiteness, area, density, margin, yellow], dim=1)}


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.float().sum(dim=(1, 2))


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask.float()).sum(dim=(1, 2)) / _count(mask).clamp(min=1.0)


# x and y Sobel kernels, made once: a module constant, so tracing for export sees a fixed weight.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_SOBEL = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None]


def _sobel_magnitude(image: torch.Tensor) -> torch.Tensor:
    """|Sobel gradient| of an NxHxW image, edges reflected (a crop's border is not an edge)."""
    kernels = _SOBEL.to(image.dtype)
    padded = F.pad(image[:, None], (1, 1, 1, 1), mode="reflect")
    gx, gy = F.conv2d(padded, kernels).unbind(dim=1)
    return torch.sqrt(gx * gx + gy * gy)


def _hue_degrees(rgb: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """HSV hue in degrees (0 for grey pixels)."""
    r, g, b = rgb.unbind(dim=1)
    spread = (high - low).clamp(min=1e-6)
    hue = torch.where(
        high == r, 60.0 * (g - b) / spread, torch.where(high == g, 60.0 * ((b - r) / spread + 2.0),
                                                         60.0 * ((r - g) / spread + 4.0))
    )  # fmt: skip
    hue = torch.where(hue < 0, hue + 360.0, hue)
    return torch.where(high - low > 0, hue, torch.zeros_like(hue))


def measure_photos(module: nn.Module, rgb: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """N x `PHOTO_MEASURES` for NxHxWx3 RGB and NxHxW lesion maps (uint8), with the torch graph."""
    crop = np.concatenate([rgb, lesion[..., None]], axis=3).transpose(0, 3, 1, 2)
    with torch.inference_mode():
        return (
            module(torch.from_numpy(crop.astype(np.float32) / 255.0))["measures"].numpy().astype(np.float64)
        )


# --- pooling photos into cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoTable:
    """One row per photo: its case, exam stage, held-out fold and label, and any per-photo feature columns."""

    case: np.ndarray  # str
    stage: np.ndarray  # str
    fold: np.ndarray  # int, the outer fold that holds the case out
    cin2plus: np.ndarray  # float {0, 1}, the case's histology


@dataclass(frozen=True)
class CaseTable:
    case: np.ndarray
    fold: np.ndarray
    cin2plus: np.ndarray


def case_table(photos: PhotoTable, cases: Sequence[str]) -> CaseTable:
    """Fold and label per case; raises if a case's photos disagree (a case must never straddle folds)."""
    folds, labels = [], []
    for case in cases:
        rows = photos.case == case
        fold, label = np.unique(photos.fold[rows]), np.unique(photos.cin2plus[rows])
        if len(fold) != 1 or len(label) != 1:
            raise ValueError(f"case {case}: photos in folds {fold.tolist()} with labels {label.tolist()}")
        folds.append(int(fold[0]))
        labels.append(float(label[0]))
    return CaseTable(np.asarray(cases), np.array(folds), np.array(labels))


def pool_stage(
    values: np.ndarray, photos: PhotoTable, cases: Sequence[str], stage: str
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` (photos x features) over each case's photos of `stage`, nan-aware (a photo's
    unmeasurable feature does not count); rows of nan and False in `present` for cases without that stage."""
    pooled = np.full((len(cases), values.shape[1]), np.nan)
    present = np.zeros(len(cases), bool)
    for row, case in enumerate(cases):
        rows = (photos.case == case) & (photos.stage == stage)
        if rows.any():
            present[row] = True
            with warnings.catch_warnings():  # an all-nan column warns; it simply stays nan
                warnings.simplefilter("ignore", RuntimeWarning)
                pooled[row] = np.nanmean(values[rows].astype(np.float64), axis=0)
    return pooled, present


def measured_case_features(table: np.ndarray, photos: PhotoTable, cases: Sequence[str]) -> np.ndarray:
    """Photos x `PHOTO_MEASURES` -> cases x `CASE_FEATURES` with the service's own pooling and features
    (`service.pipeline.case_risk`); nan where a stage is missing, imputed inside each fit (`logistic`)."""
    rows = []
    for case in cases:
        by_stage = {
            stage: list(table[(photos.case == case) & (photos.stage == stage)]) for stage in MEASURED_STAGES
        }
        rows.append(case_features(stage_means(by_stage)))
    return np.array(rows)


# --- models and nested CV over cases ---------------------------------------------------------------------


def logistic(c: float) -> Pipeline:
    """Median imputation (of the fit's own training cases) -> standardise -> L2 logistic regression with
    balanced class weights (about three HSIL per LSIL case). Linear end to end on complete rows, so a
    model on mean-pooled photo features equals the mean of per-photo logits (what the service computes)."""
    return make_pipeline(
        SimpleImputer(strategy="median"),
        StandardScaler(),
        LogisticRegression(C=c, class_weight="balanced", max_iter=5000),
    )


@dataclass(frozen=True)
class Choice:
    features: str
    c: float
    inner_auc: float


@dataclass(frozen=True)
class OuterFold:
    fold: int
    choice: Choice
    threshold: float
    held_out: np.ndarray  # row indices into the case table
    probability: np.ndarray


def inner_predictions(
    x: np.ndarray, y: np.ndarray, c: float, *, folds: int, repeats: int, seed: int
) -> np.ndarray:
    """Out-of-fold P(CIN2+) of every training case, averaged over `repeats` stratified k-fold splits."""
    total = np.zeros(len(y))
    for repeat in range(repeats):
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed + repeat)
        for train, test in splitter.split(x, y):
            total[test] += logistic(c).fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    return total / repeats


def choose(
    candidates: Mapping[str, np.ndarray],
    y: np.ndarray,
    cs: Sequence[float],
    *,
    folds: int = 5,
    repeats: int = 3,
    seed: int = 0,
) -> tuple[Choice, np.ndarray]:
    """The (feature set, C) with the best inner out-of-fold ROC-AUC, and its inner predictions (for the
    threshold). Ties go to the smaller C (stronger regularisation) and the earlier feature set (simpler)."""
    folds = max(2, min(folds, int(min(y.sum(), len(y) - y.sum()))))  # every inner fold holds both classes
    best: tuple[Choice, np.ndarray] | None = None
    for name, x in candidates.items():
        for c in sorted(cs):
            p = inner_predictions(x, y, c, folds=folds, repeats=repeats, seed=seed)
            auc = metrics.roc_auc(y, p) or 0.0
            if best is None or auc > best[0].inner_auc + 1e-9:
                best = (Choice(name, float(c), float(auc)), p)
    if best is None:
        raise ValueError("no candidate feature set or C to choose from")
    return best


def nested_case_cv(
    candidates: Mapping[str, np.ndarray],
    cases: CaseTable,
    cs: Sequence[float],
    *,
    target_sensitivity: float,
    inner_folds: int = 5,
    repeats: int = 3,
    seed: int = 0,
) -> list[OuterFold]:
    """For each outer fold: choose features and C and the threshold (sensitivity >= target on the inner
    out-of-fold predictions) on its training cases alone, refit there, score its held-out cases."""
    out = []
    for fold in np.unique(cases.fold):
        train = np.flatnonzero(cases.fold != fold)
        test = np.flatnonzero(cases.fold == fold)
        y = cases.cin2plus[train]
        inner = {name: x[train] for name, x in candidates.items()}
        choice, p_inner = choose(inner, y, cs, folds=inner_folds, repeats=repeats, seed=seed)
        threshold = metrics.threshold_for_sensitivity(y, p_inner, target_sensitivity)
        model = logistic(choice.c).fit(inner[choice.features], y)
        probability = model.predict_proba(candidates[choice.features][test])[:, 1]
        out.append(OuterFold(int(fold), choice, threshold, test, probability))
    return out


def summarise_outer(folds: list[OuterFold], cases: CaseTable, seed: int = 0) -> dict[str, object]:
    """Pooled case-level ROC-AUC with a case-bootstrap CI, per-fold AUC, and sensitivity/specificity at each
    fold's own inner-chosen threshold (pooled over folds)."""
    index = np.concatenate([f.held_out for f in folds])
    probability = np.concatenate([f.probability for f in folds])
    called = np.concatenate([f.probability >= f.threshold for f in folds])
    y = cases.cin2plus[index].astype(bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    return {
        "n_cases": len(index),
        "n_cin2plus": positives,
        "n_not_cin2plus": negatives,
        "roc_auc_pooled": metrics.roc_auc(y, probability),
        "roc_auc_ci": metrics.bootstrap_ci(
            y, probability, metrics.roc_auc, groups=cases.case[index], seed=seed
        ),
        "roc_auc_per_fold": [metrics.roc_auc(cases.cin2plus[f.held_out], f.probability) for f in folds],
        "sensitivity": float((called & y).sum() / max(1, positives)),
        "specificity": float((~called & ~y).sum() / max(1, negatives)),
        "thresholds": [f.threshold for f in folds],
        "choices": [
            {"fold": f.fold, "features": f.choice.features, "c": f.choice.c, "inner_auc": f.choice.inner_auc}
            for f in folds
        ],
    }
