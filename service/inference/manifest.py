"""The model manifest: the contract between the export step that writes it and the service that reads it.

One pydantic schema serves both sides, so a field the exporter forgets or the service misreads fails
validation instead of silently changing preprocessing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FILENAME = "manifest.json"
MODEL_FILENAME = "model.onnx"


class InputSpec(BaseModel):
    """How to turn an upright RGB uint8 image into the model's input tensor (NCHW float32)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="ONNX input name")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    channels: tuple[str, ...] = Field(
        description="meaning of each channel in order, e.g. R, G, B, lesion_probability"
    )
    resize: Literal["stretch", "letterbox"] = Field(
        description="stretch: resize to width x height ignoring aspect; letterbox: keep aspect, pad"
    )
    interpolation: Literal["bilinear", "bicubic", "box"] = "bilinear"
    pad_value: int = Field(default=0, ge=0, le=255, description="letterbox padding, in uint8 pixel units")
    scale: float = Field(default=1 / 255, description="multiplied into uint8 pixels before mean/std")
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, float] = Field(
        default=(0.0, 1.0), description="range of each channel after `scale`, before mean/std"
    )

    @model_validator(mode="after")
    def _per_channel_stats(self) -> InputSpec:
        if not (len(self.mean) == len(self.std) == len(self.channels)):
            raise ValueError("mean, std and channels must have one entry per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std entries must be positive")
        return self


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: tuple[int | str, ...] = Field(description="symbolic dims as strings, e.g. ['batch', 4]")
    description: str


class Manifest(BaseModel):
    """Everything the service needs to run one model, and everything a clinic needs to trust it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$", description="semantic version")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of model.onnx")
    input: InputSpec
    outputs: tuple[OutputSpec, ...]
    labels: dict[str, list[str]] = Field(default_factory=dict, description="class names per output")
    thresholds: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, object] = Field(default_factory=dict, description="model-specific settings")
    metrics: dict[str, object] = Field(default_factory=dict, description="with the split they come from")
    training_data: dict[str, object] = Field(default_factory=dict)
    command: str = Field(description="the exact command that produced this model")
    intended_use: str
    limitations: str
    changelog: list[str] = Field(default_factory=list)


class ModelIntegrityError(RuntimeError):
    """A model file does not match the sha256 its manifest promises."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: Path, *, verify: bool = True) -> Manifest:
    """Read `model_dir/manifest.json`; with `verify`, refuse a model.onnx whose hash differs."""
    manifest = Manifest.model_validate_json((model_dir / MANIFEST_FILENAME).read_text())
    if verify:
        actual = sha256_of(model_dir / MODEL_FILENAME)
        if actual != manifest.sha256:
            raise ModelIntegrityError(
                f"{model_dir / MODEL_FILENAME} has sha256 {actual} but its manifest says {manifest.sha256}; "
                "re-export the model with `make models` or restore the shipped file."
            )
    return manifest


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    path = model_dir / MANIFEST_FILENAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path
