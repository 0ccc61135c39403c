"""`python -m service.triton_repo OUT` writes a Triton model repository whose configs match the manifests and
the ONNX graphs. Each config.pbtxt is parsed with Triton's own ModelConfig message (tritonclient's protobuf
module), so a field Triton does not know, or a value of the wrong type, fails here as it would in Triton."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from service.inference.manifest import read_manifest, sha256_of
from service.inference.runtime import MODEL_NAMES
from service.triton_repo import BATCH1_MS, MAX_BATCH_SIZE, queue_delay_us

REPO = Path(__file__).resolve().parents[1]
Config = model_config_pb2.ModelConfig


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def repository(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"triton-{request.param}")
    command = [sys.executable, "-m", "service.triton_repo", str(out), "--device", request.param]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=120)
    return request.param, out


def _config(out: Path, name: str) -> Config:
    return text_format.Parse((out / name / "config.pbtxt").read_text(), Config())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_config_is_its_manifest(repository: tuple[str, Path], name: str) -> None:
    device, out = repository
    manifest = read_manifest(REPO / "models" / name)
    config = _config(out, name)
    assert (config.name, config.platform, config.max_batch_size) == (name, "onnxruntime_onnx", MAX_BATCH_SIZE)
    spec = manifest.input
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        (spec.name, model_config_pb2.TYPE_FP32, [len(spec.channels), spec.height, spec.width])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        (o.name, model_config_pb2.TYPE_FP32, [d if isinstance(d, int) else -1 for d in o.shape[1:]])
        for o in manifest.outputs
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == queue_delay_us(BATCH1_MS[name]) > 0
    kind = {
        "gpu": model_config_pb2.ModelInstanceGroup.KIND_GPU,
        "cpu": model_config_pb2.ModelInstanceGroup.KIND_CPU,
    }
    assert [group.kind for group in config.instance_group] == [kind[device]]
    assert config.parameters["cervigate_version"].string_value == manifest.version
    assert config.parameters["cervigate_sha256"].string_value == manifest.sha256
    assert sha256_of(out / name / "1" / "model.onnx") == manifest.sha256


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_config_fits_its_onnx_graph(repository: tuple[str, Path], name: str) -> None:
    """Triton checks a config against the graph at load time; the same check, here."""
    _, out = repository
    config = _config(out, name)
    session = ort.InferenceSession(str(out / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = {t.name: (t.type, t.shape) for t in (*session.get_inputs(), *session.get_outputs())}
    declared = {t.name: list(t.dims) for t in (*config.input, *config.output)}
    assert declared.keys() == graph.keys()
    for tensor, dims in declared.items():
        kind, shape = graph[tensor]
        assert kind == "tensor(float)"
        assert isinstance(shape[0], str), f"{tensor}: the batch dimension must be variable for batching"
        assert [d if isinstance(d, int) else -1 for d in shape[1:]] == dims
