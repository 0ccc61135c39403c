"""`make bench-remote`: the same atlas photos through CerviGate with the models in process (ONNX Runtime)
and through CerviGate in front of a remote Open Inference Protocol server (KServe's Python model server
serving the shipped ONNX models over V2 REST; tests/kserve_onnx_server.py), interleaved photo by photo,
one client.
Writes `remote.json` to `--out`.

On one machine the engine shares the service's cores, and KServe's Python server is no Triton: this measures
what the protocol hop costs (encoding, loopback HTTP, the engine's own request handling), not what a GPU
engine gains. Never run by tests.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from bench.run import ATLAS, REPO, Server
from service.inference.manifest import read_manifest
from service.inference.remote import HEADER_LENGTH, decode_response, encode_request
from service.inference.runtime import MODEL_NAMES

KSERVE_VENV = REPO / ".kserve-venv"
# KServe's pins clash with the service's, so it gets a venv of its own, kept between runs (the stamp says
# what is in it). The same ONNX Runtime as the service's: a difference in answers is then the protocol's.
KSERVE_REQUIREMENTS = ["kserve==0.21.*", f"onnxruntime=={importlib.metadata.version('onnxruntime')}"]
KSERVE_SERVER = "tests/kserve_onnx_server.py"
KSERVE_COMMAND = (
    f"python -m venv .kserve-venv && .kserve-venv/bin/pip install {' '.join(KSERVE_REQUIREMENTS)}"
)


def build_kserve_venv() -> str | None:
    """Create or update .kserve-venv (about a minute from PyPI); None when ready, else why not."""
    stamp = KSERVE_VENV / ".installed"
    wanted = "\n".join(KSERVE_REQUIREMENTS)
    if stamp.is_file() and stamp.read_text() == wanted:
        return None
    python = KSERVE_VENV / "bin" / "python"
    steps = [] if python.exists() else [[sys.executable, "-m", "venv", str(KSERVE_VENV)]]
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    steps.append([*pip, *KSERVE_REQUIREMENTS])
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            return f"{' '.join(step)} failed: {result.stderr.strip()[-500:]}"
    stamp.write_text(wanted)
    return None


def kserve_server(*args: str, port: int | None = None) -> Server:
    """The KServe model server serving models/ (more `args`: --delay-s, --serve-as), as a bench Server."""
    python = str(KSERVE_VENV / "bin" / "python")
    command = [python, KSERVE_SERVER, "--models-dir", "models", "--http-port", "{port}", *args]
    server = Server("kserve", command, "/v2/health/ready", "/v2/models/detector/infer")
    if port is not None:
        server.port = port
    return server


def cervigate_server(remote_url: str | None, **env: str) -> Server:
    """`python -m service`, with the remote backend on `remote_url` when given."""
    settings = {"CERVIGATE_CAPTURE_APP": "false", **env}
    if remote_url is not None:
        settings |= {"CERVIGATE_INFERENCE_BACKEND": "remote", "CERVIGATE_REMOTE_URL": remote_url}
    return Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/assess", env=settings)


def atlas_photos(count: int) -> list[Path]:
    """Acetic-acid photos spread over the atlas (not one case's)."""
    paths = sorted(ATLAS.glob("images_*/case_*/*cetic*.jpg"))
    return paths[:: max(1, len(paths) // count)][:count]


def _post(client: httpx.Client, url: str, data: bytes) -> float:
    started = time.perf_counter()
    response = client.post(url + "/v1/assess", files={"image": ("photo.jpg", data)})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed * 1000


def client_side_ms(runs: int = 20) -> dict[str, float]:
    """What the protocol costs CerviGate itself per model call: encoding the request and decoding a
    response of the model's output size (the engine's own decoding is the engine's)."""
    out = {}
    for name in MODEL_NAMES:
        manifest = read_manifest(REPO / "models" / name, verify=False)
        spec = manifest.input
        tensor = np.zeros((1, len(spec.channels), spec.height, spec.width), np.float32)
        names = [o.name for o in manifest.outputs]
        shapes = [[1, *(d if isinstance(d, int) else 1 for d in o.shape[1:])] for o in manifest.outputs]
        raws = [np.zeros(shape, np.float32).tobytes() for shape in shapes]
        head = json.dumps({"outputs": [
            {"name": n, "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": len(raw)}}
            for n, shape, raw in zip(names, shapes, raws, strict=True)
        ]}).encode()  # fmt: skip
        response = httpx.Response(200, content=head + b"".join(raws), headers={HEADER_LENGTH: str(len(head))})
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            encode_request(spec.name, tensor, names)
            decode_response(response)
            times.append(time.perf_counter() - started)
        out[name] = round(statistics.median(times) * 1000, 3)
    return out


def main(args: argparse.Namespace) -> dict[str, object]:
    problem = build_kserve_venv()
    if problem:
        sys.exit(f"no KServe model server: {problem}; create it with `{KSERVE_COMMAND}`")
    photos = [path.read_bytes() for path in atlas_photos(args.photos)]
    times: dict[str, list[float]] = {"in_process": [], "remote": []}
    with (
        kserve_server().running() as engine,
        cervigate_server(engine.url).running() as remote,
        cervigate_server(None).running() as local,
        httpx.Client(timeout=60) as client,
    ):
        servers = {"in_process": local.url, "remote": remote.url}
        for url in servers.values():  # first requests pay connection set-up
            for data in photos[:2]:
                _post(client, url, data)
        for round_ in range(args.rounds):
            order = list(servers.items()) if round_ % 2 == 0 else list(servers.items())[::-1]
            for data in photos:
                for name, url in order:
                    times[name].append(_post(client, url, data))
    medians = {name: statistics.median(values) for name, values in times.items()}
    summary: dict[str, object] = {
        "photos": len(photos),
        "requests_each": len(times["remote"]),
        "p50_ms": {name: round(value, 1) for name, value in medians.items()},
        "remote_over_in_process": round(medians["remote"] / medians["in_process"], 2),
        "client_encode_decode_ms_per_call": client_side_ms(),
        "engine": "KServe 0.21 Python model server, V2 REST, binary tensors, same machine",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "remote.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    print(json.dumps(main(parser.parse_args()), indent=2))
