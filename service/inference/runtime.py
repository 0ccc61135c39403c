"""The four ONNX models, loaded once, checked against their manifests, shared by every request.

`InferenceSession.run` is thread-safe, so one session per model serves all worker threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.inference.manifest import MODEL_FILENAME, Manifest, ModelIntegrityError, read_manifest
from service.settings import Settings

MODEL_NAMES = ("detector", "quality", "segmenter", "severity")


class ModelConfigurationError(RuntimeError):
    """The models on disk do not fit together or cannot run here; the message says how to fix it."""


@dataclass(frozen=True)
class OnnxModel:
    manifest: Manifest
    session: ort.InferenceSession

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for one NCHW float32 input prepared by `service.inference.preprocess`."""
        names = [output.name for output in self.manifest.outputs]
        return dict(zip(names, self.session.run(names, {self.manifest.input.name: tensor}), strict=True))

    def warm_up(self) -> None:
        spec = self.manifest.input
        self.run(np.zeros((1, len(spec.channels), spec.height, spec.width), dtype=np.float32))


@dataclass(frozen=True)
class ModelSet:
    detector: OnnxModel
    quality: OnnxModel
    segmenter: OnnxModel
    severity: OnnxModel

    def __iter__(self) -> Iterator[OnnxModel]:
        return iter((self.detector, self.quality, self.segmenter, self.severity))


def session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1  # the graphs are sequential; parallelism comes from worker threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not settings.ort_spinning:
        # Four sessions each keep their own pool; threads left spinning by one model steal the cores the
        # next model in the chain needs (measured: 2 threads with spinning made the chain 2.4x slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_model(model_dir: Path, settings: Settings) -> OnnxModel:
    if not (model_dir / MODEL_FILENAME).is_file():
        raise ModelConfigurationError(
            f"no {MODEL_FILENAME} in {model_dir}: set CERVIGATE_MODELS_DIR to a directory holding "
            f"{', '.join(MODEL_NAMES)} (the repository's models/ has them), or run `make models`"
        )
    manifest = read_manifest(model_dir)  # raises ModelIntegrityError on a sha256 mismatch
    available = set(ort.get_available_providers())
    providers = [p for p in settings.providers if p in available]
    if not providers:
        raise ModelConfigurationError(
            f"none of CERVIGATE_PROVIDERS={settings.providers} is available in this ONNX Runtime build "
            f"(it has {sorted(available)})"
        )
    session = ort.InferenceSession(
        str(model_dir / MODEL_FILENAME), sess_options=session_options(settings), providers=providers
    )
    return OnnxModel(manifest, session)


def load_models(settings: Settings) -> ModelSet:
    """Load, verify and warm up all four models; refuse a set that does not belong together."""
    models = ModelSet(*(load_model(settings.models_dir / name, settings) for name in MODEL_NAMES))
    _check_compatible(models)
    for model in models:
        model.warm_up()
    return models


def _check_compatible(models: ModelSet) -> None:
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
