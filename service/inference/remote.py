"""The remote backend: the four models on an Open Inference Protocol server (NVIDIA Triton, KServe).

The service keeps decoding, cropping, preprocessing, rules and advice, and sends each prepared tensor to
the engine by model name (and version, when set) over KServe V2 REST:

    GET  {url}/v2/models/{name}[/versions/{v}]          metadata, checked against the manifest at start-up
    GET  {url}/v2/models/{name}[/versions/{v}]/ready     readiness, polled by /readyz
    POST {url}/v2/models/{name}[/versions/{v}]/infer     inference

Tensors travel with the binary tensor data extension (Triton's, which KServe also speaks): a JSON header,
then the raw little-endian bytes. A 448x448 RGB crop is 2.4 MB as float32 and several times that as JSON
numbers, which would cost more to encode and parse than the model takes to run.

The manifests stay the contract: the remote model's inputs, outputs, shapes and dtypes must match them, or
the service refuses to start (a wrong model deployed under the right name would otherwise answer, wrongly).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from service.inference.backend import (
    InferenceTimeout,
    InferenceUnavailable,
    ModelConfigurationError,
    ModelSet,
    check_compatible,
)
from service.inference.manifest import MODEL_FILENAME, Manifest, read_manifest
from service.inference.runtime import MODEL_NAMES
from service.settings import Settings

if TYPE_CHECKING:
    from service.telemetry import Metrics

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPE = "FP32"  # every CerviGate model takes and gives float32 (service.inference.preprocess)
READY_TIMEOUT_S = 1.0  # per model: four checks stay within a Kubernetes probe's 5 s timeout


class RemoteError(RuntimeError):
    """The engine answered, but not with a result (4xx or 5xx other than 503): a bug on one side."""


class OipClient:
    """A V2 REST client, shared by every worker thread (httpx.Client is thread-safe), keeping connections
    alive so a model call costs one round trip, not a TCP handshake."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.url = settings.remote_url.rstrip("/")
        self.version = settings.remote_model_version
        self.retries, self.backoff_s = settings.remote_retries, settings.remote_backoff_s
        self.metrics = metrics
        # A model's first call may load it on the engine (Triton and KServe load lazily, a GPU compiles
        # its kernels): start-up allows it as long as it waits for the engine, not one request's budget.
        self.first_call_timeout_s = max(settings.remote_timeout_s, settings.remote_startup_wait_s)
        connections = 2 * settings.inference_workers  # a worker and the spare core it may borrow
        self.http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(settings.remote_timeout_s, connect=min(settings.remote_timeout_s, 2.0)),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def path(self, model: str) -> str:
        return f"/v2/models/{model}" + (f"/versions/{self.version}" if self.version else "")

    def metadata(self, model: str) -> dict[str, Any]:
        response = self.http.get(self.path(model))
        if response.status_code != 200:
            raise RemoteError(f"metadata of {model}: HTTP {response.status_code} {response.text[:200]}")
        metadata: dict[str, Any] = response.json()
        return metadata

    def model_ready(self, model: str) -> bool:
        return self.http.get(self.path(model) + "/ready", timeout=READY_TIMEOUT_S).status_code == 200

    def infer(
        self,
        model: str,
        input_name: str,
        tensor: np.ndarray,
        outputs: list[str],
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """One call, retried with exponential backoff while the engine is unreachable or answers 503 (it
        is starting, or shedding load): inference has no side effects, so a retry is always safe. A timeout
        (`timeout_s`, else CERVIGATE_REMOTE_TIMEOUT_S) is not retried: the engine may still be working on
        it, and the request's deadline is running."""
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else httpx.Timeout(timeout_s, connect=2.0)
        body, headers = encode_request(input_name, tensor, outputs)
        path = self.path(model) + "/infer"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            started = time.perf_counter()
            try:
                response = self.http.post(path, content=body, headers=headers, timeout=timeout)
            except httpx.TimeoutException as error:
                self.metrics.remote_errors.labels(model, "timeout").inc()
                raise InferenceTimeout(f"{model} on {self.url}: no answer in time") from error
            except httpx.TransportError:
                self.metrics.remote_errors.labels(model, "unreachable").inc()
                continue
            if response.status_code == 503:
                self.metrics.remote_errors.labels(model, "unavailable").inc()
                continue
            if response.status_code != 200:
                self.metrics.remote_errors.labels(model, "error").inc()
                raise RemoteError(f"{model} on {self.url}: HTTP {response.status_code} {response.text[:200]}")
            self.metrics.remote_duration.labels(model).observe(time.perf_counter() - started)
            arrays = decode_response(response)
            if missing := set(outputs) - set(arrays):
                raise RemoteError(f"{model} on {self.url} answered without {sorted(missing)}")
            return arrays
        raise InferenceUnavailable(
            f"{model} on {self.url}: unreachable or 503 after {self.retries + 1} tries"
        )

    def close(self) -> None:
        self.http.close()


def encode_request(input_name: str, tensor: np.ndarray, outputs: list[str]) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(tensor, dtype="<f4").tobytes()
    header = {
        "inputs": [
            {"name": input_name, "shape": list(tensor.shape), "datatype": DATATYPE,
             "parameters": {"binary_data_size": len(raw)}},
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + raw, headers


def decode_response(response: httpx.Response) -> dict[str, np.ndarray]:
    """Outputs by name, from binary tensor data or from plain JSON `data` (an engine may send either)."""
    content = response.content
    length = response.headers.get(HEADER_LENGTH)
    head_end = int(length) if length is not None else len(content)
    header = json.loads(content[:head_end])
    arrays: dict[str, np.ndarray] = {}
    offset = head_end
    for output in header["outputs"]:
        if output["datatype"] != DATATYPE:
            raise RemoteError(f"output {output['name']} is {output['datatype']}, not {DATATYPE}")
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            array = np.asarray(output["data"], dtype=np.float32)
        else:
            # A copy, as ONNX Runtime's outputs are: writable, and not pinning the whole response body.
            array = np.frombuffer(content, dtype="<f4", count=size // 4, offset=offset).copy()
            offset += size
        arrays[output["name"]] = array.reshape(output["shape"])
    return arrays


def metadata_mismatches(manifest: Manifest, metadata: dict[str, Any]) -> list[str]:
    """How the served model differs from its manifest. A remote -1 (a variable dim) matches any size,
    a manifest's symbolic dim ("batch") matches any remote one."""
    problems: list[str] = []
    spec = manifest.input
    expected_input = ("batch", len(spec.channels), spec.height, spec.width)
    inputs = {tensor["name"]: tensor for tensor in metadata.get("inputs", [])}
    if set(inputs) != {spec.name}:
        problems.append(f"inputs are {sorted(inputs)}, the manifest has one, {spec.name!r}")
    outputs = {tensor["name"]: tensor for tensor in metadata.get("outputs", [])}
    wanted = [(spec.name, expected_input, inputs)] + [(o.name, o.shape, outputs) for o in manifest.outputs]
    for name, shape, served in wanted:
        tensor = served.get(name)
        if tensor is None:
            if served is outputs:
                problems.append(f"no output {name!r} (it has {sorted(outputs)})")
            continue
        if tensor.get("datatype") != DATATYPE:
            problems.append(f"{name} is {tensor.get('datatype')}, not {DATATYPE}")
        if not _shape_fits(tuple(shape), tuple(tensor.get("shape", ()))):
            problems.append(f"{name} has shape {tensor.get('shape')}, the manifest {list(shape)}")
    return problems


def _shape_fits(manifest: tuple[int | str, ...], served: tuple[int, ...]) -> bool:
    if len(manifest) != len(served):
        return False
    return all(isinstance(want, str) or got in (-1, want) for want, got in zip(manifest, served, strict=True))


@dataclass(frozen=True)
class RemoteModel:
    manifest: Manifest
    client: OipClient

    def run(self, tensor: np.ndarray, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        names = [output.name for output in self.manifest.outputs]
        return self.client.infer(self.manifest.name, self.manifest.input.name, tensor, names, timeout_s)

    def warm_up(self) -> None:
        spec = self.manifest.input
        tensor = np.zeros((1, len(spec.channels), spec.height, spec.width), dtype=np.float32)
        self.run(tensor, timeout_s=self.client.first_call_timeout_s)


class RemoteBackend:
    """The models on `CERVIGATE_REMOTE_URL`, checked against the manifests in `CERVIGATE_MODELS_DIR`."""

    kind = "remote"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.client = OipClient(settings, metrics)
        try:
            manifests = [_read(settings.models_dir / name) for name in MODEL_NAMES]
            self._wait_until_ready(settings.remote_startup_wait_s)
            self._check_metadata(manifests, settings.models_dir)
            self.models = ModelSet(*(RemoteModel(manifest, self.client) for manifest in manifests))
            check_compatible(self.models)
            for model in self.models:
                model.warm_up()
        except BaseException:
            self.client.close()
            raise

    def _wait_until_ready(self, wait_s: float) -> None:
        """Kubernetes starts the engine and the service together: wait for it rather than crash-loop."""
        deadline = time.monotonic() + wait_s
        while True:
            reason = self.unready_reason()
            if reason is None:
                return
            if time.monotonic() >= deadline:
                raise ModelConfigurationError(
                    f"{reason} after {wait_s:g} s (CERVIGATE_REMOTE_STARTUP_WAIT_S)"
                )
            time.sleep(0.5)

    def _check_metadata(self, manifests: list[Manifest], models_dir: Path) -> None:
        problems = []
        for manifest in manifests:
            try:
                metadata = self.client.metadata(manifest.name)
            except (httpx.HTTPError, RemoteError) as error:
                problems.append(f"{manifest.name}: no metadata ({error})")
                continue
            problems += [f"{manifest.name}: {p}" for p in metadata_mismatches(manifest, metadata)]
        if problems:
            raise ModelConfigurationError(
                f"the models served at {self.client.url} do not match the manifests in {models_dir}: "
                + "; ".join(problems)
                + ". Serve the repository `python -m service.triton_repo` writes from these models."
            )

    def unready_reason(self) -> str | None:
        try:
            waiting = [name for name in MODEL_NAMES if not self.client.model_ready(name)]
        except httpx.HTTPError as error:
            return f"the inference server at {self.client.url} does not answer ({type(error).__name__})"
        if waiting:
            return f"models not ready on {self.client.url}: {', '.join(waiting)}"
        return None

    def close(self) -> None:
        self.client.close()


def _read(model_dir: Path) -> Manifest:
    # The engine holds the graph; the service needs only the manifest. Where the ONNX file is here too (the
    # image bakes it in), its sha256 is still checked, so the manifests cannot drift from the shipped models.
    return read_manifest(model_dir, verify=(model_dir / MODEL_FILENAME).is_file())
