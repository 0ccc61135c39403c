"""What the capture app needs to run the capture gate on the device when the network is gone: where the
detector and quality models and their manifests are (the browser checks each file's sha256 against the
manifest, and reads the input spec and thresholds from it), the product settings the service's rules add to
the manifests' thresholds, and the reason vocabulary with its messages and advice in every language.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.inference.manifest import MANIFEST_FILENAME, MODEL_FILENAME, Manifest
from service.pipeline.measures import MAX_SAMPLED_PIXELS
from service.pipeline.rules import EDGE_TOLERANCE, Rules
from service.render.reasons import ADVICE, LANGUAGES, MESSAGES, PRIORITY

# The models the capture gate runs: the preview gate is detect, crop and quality checks (no diagnosis).
GATE_MODELS = ("detector", "quality")


class GateModelOut(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="of the ONNX file; the browser checks what it downloaded against it")
    bytes: int = Field(description="size of the ONNX file: what a phone downloads once")
    manifest_url: str
    model_url: str = Field(description="names the sha256, so a cache keyed by URL never serves a stale model")


class GateRulesOut(BaseModel):
    """The product settings the service's decision rules add to the manifests' thresholds."""

    focus_threshold: str = Field(description="which quality-manifest threshold means 'not sharp'")
    max_cervix_distance: float | None = Field(
        description="a photo whose detector cervix_distance is above this is no cervix photo; null: not "
        "checked (a detector without the output, or CERVIGATE_CERVIX_TYPICALITY_GATE=false)"
    )
    min_cervix_area_fraction: float
    min_cervix_crop_px: int
    cut_off_max_extent: float
    edge_tolerance: float
    tissue_sample_pixels: int = Field(
        description="exposure and glare are measured on a regular grid of at most this many tissue pixels"
    )


class GateOut(BaseModel):
    models: list[GateModelOut]
    rules: GateRulesOut
    reasons: list[str] = Field(description="every reason code, most important first")
    messages: dict[str, dict[str, str]] = Field(description="language -> reason -> what is wrong")
    advice: dict[str, dict[str, str]] = Field(description="language -> reason -> what to do")


def gate_bundle(manifests: dict[str, Manifest], sizes: dict[str, int], rules: Rules, focus: str) -> GateOut:
    models = [
        GateModelOut(
            name=name,
            version=manifests[name].version,
            sha256=manifests[name].sha256,
            bytes=sizes[name],
            manifest_url=f"/v1/models/{name}/{MANIFEST_FILENAME}",
            model_url=f"/v1/models/{name}/{MODEL_FILENAME}?sha256={manifests[name].sha256}",
        )
        for name in GATE_MODELS
    ]
    return GateOut(
        models=models,
        rules=GateRulesOut(
            focus_threshold=focus,
            max_cervix_distance=rules.cervix_distance,
            min_cervix_area_fraction=rules.min_area_fraction,
            min_cervix_crop_px=rules.min_crop_px,
            cut_off_max_extent=rules.cut_off_max_extent,
            edge_tolerance=EDGE_TOLERANCE,
            tissue_sample_pixels=MAX_SAMPLED_PIXELS,
        ),
        reasons=[reason.value for reason in PRIORITY],
        messages=_texts(MESSAGES),
        advice=_texts(ADVICE),
    )


def _texts(table: dict[str, dict[Any, str]]) -> dict[str, dict[str, str]]:
    return {language: {str(code): text for code, text in table[language].items()} for language in LANGUAGES}
