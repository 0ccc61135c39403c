"""A patient's CIN2+ risk from the measures of their exam's photos (numpy; the severity manifest's model).

The severity ONNX model measures one photo (`severity.extra.case_model.photo_measures`: whiteness,
acetowhite area and density, lesion margin sharpness, iodine non-uptake); this module pools those measures
per exam stage and applies the logistic regression fitted on atlas cases. Training builds its case features
with `case_features` too, so what was fitted is what is served.

A stage the exam lacks (no saline photo, no iodine photo; a one-photo /v1/assess has neither) leaves its
features missing, and a missing feature takes the median of the training cases, as in training.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ACETIC, SALINE, IODINE = "acetic", "saline", "iodine"
PHOTO_MEASURES = ("whiteness", "acetowhite_area", "acetowhite_density", "margin_sharpness", "iodine_yellow")
CASE_FEATURES = ("acetowhite_area", "acetowhite_density", "whitening", "iodine_yellow", "margin_sharpness")
# The stages whose photos the case features read; other stages (green filter) are not measured.
MEASURED_STAGES = (ACETIC, SALINE, IODINE)
METHOD = "logistic_on_stage_means_of_photo_measures"


def stage_means(photos: Mapping[str, Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
    """Stage -> photos' measure vectors, averaged per stage, skipping a photo's undefined (nan) measures."""
    means = {}
    for stage, rows in photos.items():
        if len(rows):
            with warnings.catch_warnings():  # a measure undefined on every photo stays nan
                warnings.simplefilter("ignore", RuntimeWarning)
                means[stage] = np.nanmean(np.stack([np.asarray(r, np.float64) for r in rows]), axis=0)
    return means


def case_features(means: Mapping[str, np.ndarray]) -> np.ndarray:
    """`CASE_FEATURES` from per-stage mean measures; nan for a feature whose stage is missing.

    Whitening is the acetic-acid photos' whiteness minus the saline photos': what acetic acid changed, not
    how white this cervix looks anyway. The lesion-map features read the acetic-acid photos only."""
    missing = np.full(len(PHOTO_MEASURES), np.nan)
    acetic, saline, iodine = (means.get(stage, missing) for stage in (ACETIC, SALINE, IODINE))
    at = PHOTO_MEASURES.index
    return np.array(
        [
            acetic[at("acetowhite_area")],
            acetic[at("acetowhite_density")],
            acetic[at("whiteness")] - saline[at("whiteness")],
            iodine[at("iodine_yellow")],
            acetic[at("margin_sharpness")],
        ]
    )


@dataclass(frozen=True)
class CaseModel:
    """Logistic regression on `CASE_FEATURES`: missing -> training median, then logit = weight . x + bias
    (the training standardisation is folded into weight and bias)."""

    impute: np.ndarray
    weight: np.ndarray
    bias: float

    @classmethod
    def from_extra(cls, extra: Mapping[str, object]) -> CaseModel:
        """From the severity manifest's `extra.case_model`; refuses one made for other features."""
        spec = extra.get("case_model")
        if not isinstance(spec, dict):
            raise ValueError("the severity manifest has no extra.case_model: re-export it")
        if tuple(spec["features"]) != CASE_FEATURES or tuple(spec["photo_measures"]) != PHOTO_MEASURES:
            raise ValueError(
                f"the severity model's features {spec['features']} / measures {spec['photo_measures']} are "
                f"not the ones this service computes ({CASE_FEATURES} / {PHOTO_MEASURES})"
            )
        return cls(np.array(spec["impute"], float), np.array(spec["weight"], float), float(spec["bias"]))

    def logit(self, features: np.ndarray) -> float:
        filled = np.where(np.isnan(features), self.impute, features)
        return float(filled @ self.weight + self.bias)

    def probability(self, photos: Mapping[str, Sequence[np.ndarray]]) -> float:
        """P(CIN2+) of one exam from its photos' measures by stage."""
        return float(1.0 / (1.0 + np.exp(-self.logit(case_features(stage_means(photos))))))
