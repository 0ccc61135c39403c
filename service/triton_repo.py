"""Write an NVIDIA Triton model repository from models/: `python -m service.triton_repo OUT [--device cpu]`.

One directory per model, named as the service calls it, with `config.pbtxt` built from the manifest (the
contract: inputs, outputs, dims and dtypes come from it, never typed by hand) and the ONNX file, whose
sha256 is checked against the manifest on the way:

    OUT/detector/config.pbtxt
    OUT/detector/1/model.onnx

Triton versions are integers, so each model is version 1 of its directory; the manifest's semantic version
and sha256 go into the config's `parameters`, where `GET /v2/models/{m}/config` shows them.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from service.inference.manifest import MODEL_FILENAME, Manifest, read_manifest
from service.inference.runtime import MODEL_NAMES
from service.settings import REPO_MODELS_DIR

Device = Literal["cpu", "gpu"]
MAX_BATCH_SIZE = 8
# Median batch-1 latency of each model with ONNX Runtime on one CPU thread (`--measure` times them again;
# measured 2026-12-01 on the 2-core development machine). On that CPU a batch of 4 costs 3 to 4 times one
# request (detector 47 ms for 4 vs 16 ms for 1; quality 139 vs 33 ms), so batching buys little there; on a
# GPU it is what pays. The queue delay is a tenth of the model's own run time: a lone request waits at most
# 10 % longer, and requests from several replicas arriving within it share one run.
BATCH1_MS: dict[str, float] = {"detector": 15.8, "quality": 32.7, "segmenter": 14.3, "severity": 2.6}
QUEUE_DELAY_SHARE = 0.1


def queue_delay_us(batch1_ms: float) -> int:
    return max(100, int(round(batch1_ms * 1000 * QUEUE_DELAY_SHARE, -2)))  # Triton counts in microseconds


def _dims(shape: Sequence[int | str]) -> str:
    """Dims after the batch dimension (Triton adds it when max_batch_size > 0); symbolic ones are -1."""
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape)


def config_pbtxt(manifest: Manifest, device: Device, delay_us: int) -> str:
    spec = manifest.input
    outputs = ",\n".join(
        f'  {{ name: "{o.name}" data_type: TYPE_FP32 dims: [ {_dims(o.shape[1:])} ] }}'
        for o in manifest.outputs
    )
    # CPU: two instances, so one model runs while the next batch forms; GPU: one per GPU, which Triton
    # feeds through the dynamic batcher (more instances only contend for the same device).
    instances = "{ count: 2 kind: KIND_CPU }" if device == "cpu" else "{ count: 1 kind: KIND_GPU }"
    return f"""# Written by `python -m service.triton_repo` from {manifest.name}/manifest.json: do not edit.
name: "{manifest.name}"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH_SIZE}
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [
  {{ name: "{spec.name}" data_type: TYPE_FP32 dims: [ {len(spec.channels)}, {spec.height}, {spec.width} ] }}
]
output [
{outputs}
]
dynamic_batching {{
  max_queue_delay_microseconds: {delay_us}
}}
instance_group [
  {instances}
]
parameters {{ key: "cervigate_version" value: {{ string_value: "{manifest.version}" }} }}
parameters {{ key: "cervigate_sha256" value: {{ string_value: "{manifest.sha256}" }} }}
"""


def measure_batch1_ms(model_dir: Path, runs: int = 15) -> float:
    """The median time of one batch-1 run here, as the service's in-process backend runs it."""
    import onnxruntime as ort  # only for --measure

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_dir / MODEL_FILENAME), options, providers=["CPUExecutionProvider"]
    )
    spec = read_manifest(model_dir, verify=False).input
    feed = {spec.name: np.zeros((1, len(spec.channels), spec.height, spec.width), np.float32)}
    session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000


def write_repository(
    out: Path,
    models_dir: Path = REPO_MODELS_DIR,
    device: Device = "gpu",
    batch1_ms: dict[str, float] | None = None,
) -> list[Path]:
    """The repository under `out`; returns the config files written."""
    latencies = batch1_ms or BATCH1_MS
    written = []
    for name in MODEL_NAMES:
        manifest = read_manifest(models_dir / name)  # refuses an ONNX file that is not the manifest's
        target = out / name
        (target / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(models_dir / name / MODEL_FILENAME, target / "1" / MODEL_FILENAME)
        config = target / "config.pbtxt"
        config.write_text(config_pbtxt(manifest, device, queue_delay_us(latencies[name])))
        written.append(config)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.triton_repo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", type=Path, help="the repository to write (tritonserver --model-repository)")
    parser.add_argument("--models-dir", type=Path, default=REPO_MODELS_DIR)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu", help="instance_group kind")
    parser.add_argument("--measure", action="store_true", help="time each model here for the queue delay")
    args = parser.parse_args(argv)
    latencies = {n: measure_batch1_ms(args.models_dir / n) for n in MODEL_NAMES} if args.measure else None
    for config in write_repository(args.out, args.models_dir, args.device, latencies):
        print(config)


if __name__ == "__main__":
    main()
