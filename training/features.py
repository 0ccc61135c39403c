"""Frozen-backbone features, computed once with ONNX Runtime and kept in memory.

The pretrained trunk does not train (its ImageNet features are what generalise from 45 cases), so
each augmented view's features are computed once and every fold, inner fold and head fit reuses them:
nested selection then costs head fits, not backbone passes. ONNX Runtime runs the trunk about 8x faster
than PyTorch eager on this CPU (Lite0 at 192 px: ~3 ms vs ~20 ms per image).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from service.inference.manifest import InputSpec
from service.inference.preprocess import normalize_batch

# The TorchScript exporter warns once per strided slice that it cannot fold it; harmless and noisy.
warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
# Frozen trunks export fine with the TorchScript exporter, which is several times faster to run per fold.
warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")


class NamedOutputs(nn.Module):
    """A dict-returning module as a tuple-returning one, in a fixed order (ONNX outputs are ordered)."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.module = module
        self.names = tuple(names)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module(image)
        return tuple(out[name] for name in self.names)


class FeatureExtractor:
    """`extract(fitted)` -> {output name: float16 array} for NxHxWx3 uint8 images at the spec's size.

    `reduce` maps each raw output to what is kept (e.g. global average pooling), so big maps need not be
    stored."""

    def __init__(
        self,
        module: nn.Module,
        names: Sequence[str],
        spec: InputSpec,
        *,
        reduce: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
        threads: int = 0,
        batch_size: int = 32,
    ) -> None:
        self.names = tuple(names)
        self.spec = spec
        self.reduce = reduce or {}
        self.batch_size = batch_size
        self.session = onnx_session(module, self.names, spec, threads)

    def extract(self, fitted: np.ndarray, desc: str = "features") -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        starts = range(0, len(fitted), self.batch_size)
        for start in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 4):
            tensor = normalize_batch(fitted[start : start + self.batch_size], self.spec)
            for name, value in zip(
                self.names, self.session.run(list(self.names), {"image": tensor}), strict=True
            ):
                kept = self.reduce[name](value) if name in self.reduce else value
                parts[name].append(kept.astype(np.float16))
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def global_average(maps: np.ndarray) -> np.ndarray:
    return maps.mean(axis=(2, 3))


def onnx_session(
    module: nn.Module, names: tuple[str, ...], spec: InputSpec, threads: int = 0
) -> ort.InferenceSession:
    """`module` (returning a dict of tensors) exported to ONNX with input "image" and a dynamic batch, then
    loaded in ONNX Runtime; the file lives only for the export."""
    dummy = torch.zeros(1, len(spec.channels), spec.height, spec.width)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        # The wrapper in eval mode, not only the module: the exporter puts the wrapper back in the mode it
        # found it in, and a module left training would run BatchNorm on batch statistics afterwards.
        torch.onnx.export(
            NamedOutputs(module, names).eval(), (dummy,), str(path), input_names=["image"],
            output_names=list(names), dynamic_axes={"image": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class TorchOnOnnx:
    """A torch model run by ONNX Runtime, with a manifest-like `.manifest.input`: what the service's stage
    functions take (`service.pipeline.stages.RunsModel`), so training measures fold models with the served
    code."""

    def __init__(self, module: nn.Module, spec: InputSpec, names: tuple[str, ...]) -> None:
        self.manifest = SimpleNamespace(input=spec)
        self.names = names
        self.session = onnx_session(module, names, spec)

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(list(self.names), {"image": tensor}), strict=True))
