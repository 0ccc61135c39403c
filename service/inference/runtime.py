"""The in-process backend (the default): the four ONNX models, loaded once, checked against their manifests,
shared by every request.

`InferenceSession.run` is thread-safe, so one session per model serves all worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.inference.backend import ModelConfigurationError, ModelSet, check_compatible
from service.inference.manifest import MODEL_FILENAME, Manifest, read_manifest
from service.settings import Settings

MODEL_NAMES = ("detector", "quality", "segmenter", "severity")


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
    check_compatible(models)
    for model in models:
        model.warm_up()
    return models


class OnnxRuntimeBackend:
    """ONNX Runtime in this process: nothing outside it to wait for, so ready once loaded."""

    kind = "onnxruntime"

    def __init__(self, settings: Settings) -> None:
        self.models = load_models(settings)

    def unready_reason(self) -> str | None:
        return None

    def close(self) -> None:
        pass
