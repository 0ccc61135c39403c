"""The remote backend against a real Open Inference Protocol server: the shipped ONNX models served by
KServe's Python model server (tests/kserve_onnx_server.py) over V2 REST, in its own process and virtual
environment, with CerviGate run as `python -m service` in front of it.

Same answers as ONNX Runtime in process on atlas photos; and the failure paths: the engine down (/readyz 503,
requests 503, back when it returns), the engine slow (504 at the deadline), the engine serving the wrong model
under a right name (the service refuses to start)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.remote import KSERVE_COMMAND, atlas_photos, build_kserve_venv, cervigate_server, kserve_server
from bench.run import Server, free_port
from service.inference.backend import InferenceTimeout
from service.inference.manifest import read_manifest
from service.inference.remote import OipClient, RemoteBackend, RemoteModel, metadata_mismatches
from service.inference.runtime import MODEL_NAMES, load_models
from service.pipeline.stages import Assessment, Pipeline
from service.settings import Settings
from service.telemetry import Metrics

REPO = Path(__file__).resolve().parents[1]
PHOTOS = 8
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kserve_venv() -> None:
    problem = build_kserve_venv()  # about a minute the first time, then kept in .kserve-venv
    if problem:
        pytest.skip(f"no KServe model server: {problem}; create it with `{KSERVE_COMMAND}`")


@pytest.fixture(scope="module")
def engine(kserve_venv: None) -> Iterator[Server]:
    with kserve_server().running() as server:
        yield server


@pytest.fixture(scope="module")
def photos(atlas_root: Path) -> list[bytes]:
    paths = atlas_photos(PHOTOS)
    assert len(paths) == PHOTOS, f"expected acetic-acid photos under {atlas_root}"
    return [path.read_bytes() for path in paths]


def _remote_settings(url: str, **overrides: object) -> Settings:
    return Settings(inference_backend="remote", remote_url=url, **overrides)  # type: ignore[arg-type]


def _numbers(a: Assessment) -> dict[str, float]:
    """Every probability and measure the answer is made of, unrounded."""
    out = {"cervix": a.detection.score}
    if a.quality is not None:
        out |= {"sharpness": a.quality.sharpness, "p_acetic": a.quality.p_acetic, "luma": a.quality.luma}
    if a.lesion is not None:
        out["lesion_area"] = a.lesion.area_fraction
    if a.measures is not None:
        out |= {f"measure_{i}": float(v) for i, v in enumerate(a.measures)}
    if a.diagnosis is not None:
        out["p_cin2plus"] = a.diagnosis.probability
    return out


def test_the_pipeline_on_the_remote_engine_answers_as_in_process(engine: Server, photos: list[bytes]) -> None:
    remote = RemoteBackend(_remote_settings(engine.url), Metrics())
    try:
        local = Pipeline(load_models(Settings()), Settings())
        served = Pipeline(remote.models, Settings())
        diagnosed = 0
        for data in photos:
            here, there = local.assess(data, diagnose=True), served.assess(data, diagnose=True)
            assert (there.decision, there.reasons) == (here.decision, here.reasons)
            a, b = _numbers(here), _numbers(there)
            assert a.keys() == b.keys()
            close = {k: bool(np.isclose(a[k], b[k], rtol=0, atol=1e-5, equal_nan=True)) for k in a}
            assert all(close.values()), {k: (a[k], b[k]) for k in a if not close[k]}
            if here.lesion is not None and there.lesion is not None:
                assert np.array_equal(here.lesion.probability, there.lesion.probability)
            diagnosed += here.diagnosis is not None
        assert diagnosed, "no photo reached the severity model: the comparison would miss two models"
    finally:
        remote.close()


def test_the_service_in_front_of_the_engine_gives_the_in_process_answers(
    engine: Server, photos: list[bytes]
) -> None:
    def answers(server: Server) -> list[dict]:
        out = []
        for data in photos:
            response = httpx.post(server.url + "/v1/assess", files={"image": ("p.jpg", data)}, timeout=60)
            assert response.status_code == 200, response.text
            body = response.json()
            out.append(
                {k: body.get(k) for k in ("decision", "reasons", "cervix", "quality", "lesion", "diagnosis")}
            )
        return out

    with cervigate_server(engine.url).running() as remote, cervigate_server(None).running() as local:
        assert answers(remote) == answers(local)
        metrics = httpx.get(remote.url + "/metrics").text
    for model in MODEL_NAMES:  # every model was called remotely, and it shows
        assert f'cervigate_remote_inference_duration_seconds_count{{model="{model}"}}' in metrics


def test_readiness_follows_the_engine_and_requests_get_503_while_it_is_down(
    kserve_venv: None, photos: list[bytes]
) -> None:
    engine = kserve_server()
    engine.start()
    try:
        with cervigate_server(engine.url, CERVIGATE_REMOTE_RETRIES="1").running() as service:
            engine.stop()
            ready = httpx.get(service.url + "/readyz")
            assert ready.status_code == 503 and ready.json()["code"] == "not_ready"
            assert engine.url in ready.json()["detail"]
            assert "cervigate_ready 0.0" in httpx.get(service.url + "/metrics").text
            response = httpx.post(
                service.url + "/v1/assess", files={"image": ("p.jpg", photos[0])}, timeout=60
            )
            assert response.status_code == 503 and response.json()["code"] == "inference_unavailable"
            assert response.headers["retry-after"] == "1" and engine.url not in response.text
            exam = httpx.post(service.url + "/v1/exams", files=[("image", ("a.jpg", photos[0]))], timeout=60)
            assert exam.status_code == 503 and exam.json()["code"] == "inference_unavailable"
            assert exam.headers["retry-after"] == "1"
            assert engine.url not in exam.text  # clients are not told internal host names
            engine = kserve_server(port=engine.port)  # the engine comes back where it was
            engine.start()
            assert httpx.get(service.url + "/readyz").status_code == 200
            response = httpx.post(
                service.url + "/v1/assess", files={"image": ("p.jpg", photos[0])}, timeout=60
            )
            assert response.status_code == 200
            # Two tries (CERVIGATE_REMOTE_RETRIES=1) for the photo, two for the exam's, then none failed.
            metrics = httpx.get(service.url + "/metrics").text
            assert (
                'cervigate_remote_inference_errors_total{cause="unreachable",model="detector"} 4.0' in metrics
            )
    finally:
        engine.stop()


def test_a_slow_engine_meets_the_deadline_and_the_call_timeout(
    kserve_venv: None, photos: list[bytes]
) -> None:
    with kserve_server("--delay-s", "1.1").running() as engine:
        # One model call of 1.1 s cannot fit a 1 s deadline: the phone gets 504 and retakes. The call
        # timeout is generous so that start-up's warm-up pass on a loaded host is not what is tested.
        deadline_only = {"CERVIGATE_REQUEST_DEADLINE_S": "1", "CERVIGATE_REMOTE_TIMEOUT_S": "30"}
        with cervigate_server(engine.url, **deadline_only).running() as service:
            response = httpx.post(
                service.url + "/v1/assess", files={"image": ("p.jpg", photos[0])}, timeout=60
            )
            assert response.status_code == 504 and response.json()["code"] == "deadline_exceeded"
        # One call slower than CERVIGATE_REMOTE_TIMEOUT_S is abandoned, not retried, and counted.
        metrics = Metrics()
        client = OipClient(_remote_settings(engine.url, remote_timeout_s=0.2), metrics)
        spec = read_manifest(REPO / "models" / "severity").input
        tensor = np.zeros((1, len(spec.channels), spec.height, spec.width), np.float32)
        with pytest.raises(InferenceTimeout):
            client.infer("severity", spec.name, tensor, ["measures"])
        client.close()
        assert metrics.remote_errors.labels("severity", "timeout")._value.get() == 1


def test_the_service_refuses_to_start_on_a_model_that_is_not_its_manifests(kserve_venv: None) -> None:
    # The quality model's graph deployed under the detector's name: it would answer, with nonsense.
    with kserve_server("--serve-as", "detector=quality").running() as engine:
        env = os.environ | {
            "CERVIGATE_INFERENCE_BACKEND": "remote",
            "CERVIGATE_REMOTE_URL": engine.url,
            "CERVIGATE_CAPTURE_APP": "false",
            "CERVIGATE_PORT": str(free_port()),
        }
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
        )
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "do not match the manifests" in log, log[-2000:]
    assert "detector: inputs are ['crop'], the manifest has one, 'image'" in log, log[-2000:]
    assert time.monotonic() - started < 170  # it refused; it did not wait for a start-up timeout


def test_metadata_is_compared_dim_by_dim() -> None:
    manifest = read_manifest(REPO / "models" / "detector", verify=False)
    served = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 192, 192]}],
        "outputs": [
            {"name": "cervix_logit", "datatype": "FP32", "shape": [-1, 1]},
            {"name": "box", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "cervix_distance", "datatype": "FP32", "shape": [-1, 1]},
        ],
    }
    assert metadata_mismatches(manifest, served) == []
    served["inputs"][0]["shape"] = [-1, 3, 224, 224]
    served["outputs"][1] = {"name": "box", "datatype": "FP16", "shape": [-1, 4]}
    del served["outputs"][0]
    assert metadata_mismatches(manifest, served) == [
        "image has shape [-1, 3, 224, 224], the manifest ['batch', 3, 192, 192]",
        "no output 'cervix_logit' (it has ['box', 'cervix_distance'])",
        "box is FP16, not FP32",
    ]


def test_a_models_first_call_may_take_as_long_as_start_up_waits() -> None:
    # Triton and KServe load a model on its first call: the warm-up call gets start-up's wait, a
    # request's call gets CERVIGATE_REMOTE_TIMEOUT_S. No engine needed: the transport records each call.
    manifest = read_manifest(REPO / "models" / "severity")
    outputs = [output.name for output in manifest.outputs]
    timeouts: list[float] = []

    def engine(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        answer = [{"name": name, "shape": [1, 1], "datatype": "FP32", "data": [0.5]} for name in outputs]
        return httpx.Response(200, json={"outputs": answer})

    settings = _remote_settings("http://engine", remote_timeout_s=0.5, remote_startup_wait_s=90)
    client = OipClient(settings, Metrics())
    client.http = httpx.Client(base_url=client.url, timeout=0.5, transport=httpx.MockTransport(engine))
    model = RemoteModel(manifest, client)
    model.warm_up()
    spec = manifest.input
    model.run(np.zeros((1, len(spec.channels), spec.height, spec.width), np.float32))
    client.close()
    assert timeouts == [90.0, 0.5]
