"""What the pipeline needs of an inference engine, whichever runs the models.

Two implementations: ONNX Runtime in this process (`service.inference.runtime`, the default) and a remote
Open Inference Protocol server such as NVIDIA Triton or KServe (`service.inference.remote`), chosen by
`CERVIGATE_INFERENCE_BACKEND`. The pipeline only sees `Model.run`, so preprocessing, rules and advice are
the same on both, and the manifests stay the contract either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.inference.manifest import Manifest, ModelIntegrityError


class ModelConfigurationError(RuntimeError):
    """The models on disk do not fit together or cannot run here; the message says how to fix it."""


class InferenceUnavailable(RuntimeError):
    """The inference engine cannot answer now (down, or 503 after the retries): the request gets 503."""


class InferenceTimeout(TimeoutError):
    """The inference engine did not answer in time: the request gets 504 `deadline_exceeded`."""


class Model(Protocol):
    """One model: its manifest, and outputs by name for one NCHW float32 input prepared by
    `service.inference.preprocess`. `run` is called from several worker threads at once."""

    @property
    def manifest(self) -> Manifest: ...

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]: ...

    def warm_up(self) -> None: ...


@dataclass(frozen=True)
class ModelSet:
    detector: Model
    quality: Model
    segmenter: Model
    severity: Model

    def __iter__(self) -> Iterator[Model]:
        return iter((self.detector, self.quality, self.segmenter, self.severity))


class Backend(Protocol):
    """The loaded models, and whether they can be used now (readiness, polled by /readyz)."""

    kind: str
    models: ModelSet

    def unready_reason(self) -> str | None:
        """None when every model can answer; else why not, for the 503 detail."""
        ...

    def close(self) -> None: ...


def check_compatible(models: ModelSet) -> None:
    """Refuse a set of manifests that do not belong together (the same check for every backend)."""
    severity, segmenter = models.severity.manifest, models.segmenter.manifest
    expected = severity.extra.get("segmenter_sha256")
    if expected != segmenter.sha256:
        raise ModelIntegrityError(
            f"the severity model was trained on the lesion maps of segmenter {expected}, but segmenter "
            f"{segmenter.sha256} is loaded: ship the segmenter and severity models from one `make models`"
        )
    margins = {
        m.manifest.name: m.manifest.extra.get("crop_margin")
        for m in (models.quality, models.segmenter, models.severity)
    }
    if len(set(margins.values())) != 1:
        raise ModelConfigurationError(f"the crop models were trained on different crop margins {margins}")
    shared = ("width", "height", "resize", "interpolation", "pad_value")
    if any(getattr(severity.input, key) != getattr(segmenter.input, key) for key in shared):
        raise ModelConfigurationError(
            "segmenter and severity inputs must share size and resize rule: the lesion map is used as is"
        )
