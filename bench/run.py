"""`make bench`: CerviGate as served vs a naive PyTorch service vs the decode + inference floor, side by side.

All three run in one invocation, interleaved round by round (systems and workloads rotate), so machine drift
hits them alike. Writes `summary.json`, `table.md` and `latency.png` to `--out`. Never run by tests: speed is
measured here, not asserted. The preview gate (`/v1/quality`) is timed as one phone sees it: frames sent back
to back on one keep-alive connection, many per round (a few short bursts would sample the machine's noise).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.inference.preprocess import crop, crop_box, fit, normalize, prepare
from service.inference.runtime import load_models
from service.io.decoding import register_heif
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ATLAS = REPO.parent / "shared" / "data" / "iarc-atlas"
PHONE_SIZE = (4032, 3024)  # a 12 MP smartphone photo
# How an iPhone stores a photo: HEVC tiles of 512 px in a grid, plus a 320x240 thumbnail (Apple's ImageIO
# writes no larger one). Some cameras add a larger preview; that variant shows what a thumbnail can serve.
HEIC_TILE = 512
HEIC_THUMBNAILS = {"12MP atlas HEIC iPhone": [320], "12MP atlas HEIC 1024 thumb": [320, 1024]}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument(
        "--requests", type=int, default=16, help="requests per system, workload, concurrency, round"
    )
    parser.add_argument(
        "--preview-requests",
        type=int,
        default=128,
        help="preview frames per round, back to back from one phone to /v1/quality (and as many gate floors)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--atlas", type=Path, default=ATLAS)
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=None,
        help="also keep only the workloads whose names contain one of these (a quick look)",
    )
    return parser


# --- workloads -----------------------------------------------------------------------------------------


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def heic(image: Image.Image, thumbnails: list[int], quality: int = 90, preset: str = "fast") -> bytes:
    """A HEIC laid out as phones write it: 512 px grid tiles and embedded thumbnails (longest sides)."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    buffer = io.BytesIO()
    image.save(
        buffer,
        "HEIF",
        quality=quality,
        tile_size=HEIC_TILE,
        thumbnails=thumbnails,
        enc_params={"preset": preset},
    )
    return buffer.getvalue()


def workloads(atlas: Path) -> dict[str, bytes]:
    """Smartphone-size and preview-size JPEGs from a real atlas photo (when present) and a synthetic scene,
    and the 12 MP atlas photo as HEIC, as an iPhone stores it and with a larger embedded thumbnail."""
    from training.data.synthetic import generate_scene

    loads: dict[str, bytes] = {}
    photos = sorted(atlas.glob("images_*/case_*/*cetic*.jpg"))
    if photos:
        real = Image.open(photos[0]).convert("RGB")
        phone = real.resize(PHONE_SIZE, Image.Resampling.LANCZOS)
        loads["12MP atlas"] = jpeg(phone)
        for name, thumbnails in HEIC_THUMBNAILS.items():
            loads[name] = heic(phone, thumbnails)
        loads["800x600 atlas"] = photos[0].read_bytes()
        loads["640x480 atlas"] = jpeg(real.resize((640, 480), Image.Resampling.LANCZOS))
    synthetic = Image.fromarray(generate_scene(7, size=PHONE_SIZE).image)
    loads["12MP synthetic"] = jpeg(synthetic)
    if not photos:
        loads["800x600 synthetic"] = jpeg(synthetic.resize((800, 600), Image.Resampling.LANCZOS))
        loads["640x480 synthetic"] = jpeg(synthetic.resize((640, 480), Image.Resampling.LANCZOS))
    return loads


# --- systems -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    command: list[str]
    ready_path: str
    assess_path: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    scheme: str = "http"
    verify: bool | ssl.SSLContext = True  # for https: trusts the CA (or self-signed certificate) it was given

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = os.environ | self.env | {"CERVIGATE_PORT": str(self.port), "CERVIGATE_LOG_LEVEL": "warning"}
        command = [c.replace("{port}", str(self.port)) for c in self.command]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} while starting")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after 180 s")

    @contextmanager
    def running(self) -> Iterator[Server]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def rss_mb(self) -> float:
        if self.process is None:
            return float("nan")
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


class RssSampler:
    """Peak resident memory of a server process, sampled every 50 ms while the bench runs."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self._stop = server, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_mb())
            time.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def drive(url: str, payload: bytes, concurrency: int, count: int) -> tuple[list[float], float, list[dict]]:
    """`count` multipart uploads over `concurrency` keep-alive connections: latencies, wall time, bodies."""
    latencies: list[float] = []
    bodies: list[dict] = []
    remaining = [count]
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=60) as client:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                started = time.perf_counter()
                response = client.post(url, files={"image": ("photo.jpg", payload, "image/jpeg")})
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                with lock:
                    latencies.append(elapsed * 1000)
                    bodies.append(response.json())

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started, bodies


def stream_frames(phone: httpx.Client, url: str, payload: bytes, count: int) -> tuple[list[float], float]:
    """One phone sending preview frames: `count` uploads back to back on its keep-alive connection, after one
    untimed frame that reopens it if the server closed it while idle (uvicorn's keep-alive timeout is 5 s)."""
    phone.post(url, files={"image": ("frame.jpg", payload, "image/jpeg")}).raise_for_status()
    latencies: list[float] = []
    started = time.perf_counter()
    for _ in range(count):
        sent = time.perf_counter()
        phone.post(url, files={"image": ("frame.jpg", payload, "image/jpeg")}).raise_for_status()
        latencies.append((time.perf_counter() - sent) * 1000)
    return latencies, time.perf_counter() - started


class Floor:
    """One reduced-scale JPEG decode plus ONNX Runtime on tensors prepared beforehand: no HTTP, no resizes.

    The decode is at the smallest DCT scale that gives both the whole-photo stage its `decode_min_side` and
    the crop (here the whole frame, grown by the margin) the quality model's input side: the least decoding
    any implementation of the chain must do (the service may decode twice: coarse, then finer for the crop).
    A HEIC's draft is its smallest thumbnail that is enough, or the whole photo in full.
    """

    def __init__(self, settings: Settings) -> None:
        self.models = load_models(settings)
        self.decode_side = settings.decode_min_side
        self.tensors: dict[bytes, list[np.ndarray]] = {}
        self.draft_side: dict[bytes, int] = {}

    def prepare(self, payload: bytes) -> list[np.ndarray]:
        rgb = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
        margin = float(self.models.quality.manifest.extra["crop_margin"])  # type: ignore[arg-type]
        region = crop_box((0, 0, rgb.shape[1], rgb.shape[0]), rgb.shape[1], rgb.shape[0], margin)
        cropped = crop(rgb, region)
        crop_short = min(region[2] - region[0], region[3] - region[1])
        needed = min(1.0, self.models.quality.manifest.input.width / max(1, crop_short))
        self.draft_side[payload] = max(self.decode_side, math.ceil(min(rgb.shape[:2]) * needed))
        segmenter_input, _ = fit(cropped, self.models.segmenter.manifest.input)
        lesion = np.full(segmenter_input.shape[:2], 128, np.uint8)
        spec = self.models.severity.manifest.input
        return [
            prepare(rgb, self.models.detector.manifest.input)[0],
            prepare(cropped, self.models.quality.manifest.input)[0],
            normalize(segmenter_input, self.models.segmenter.manifest.input),
            normalize(np.dstack([segmenter_input, lesion]), spec),  # one photo's measures
        ]

    def once(self, payload: bytes, stages: int = 4) -> float:
        """Decode plus the first `stages` models: 4 for /v1/assess, 2 (detector, quality) for the gate."""
        if payload not in self.tensors:  # prepared once per payload, untimed (a full decode at 12 MP)
            self.tensors[payload] = self.prepare(payload)
        tensors = self.tensors[payload]
        started = time.perf_counter()
        with Image.open(io.BytesIO(payload)) as image:
            side = self.draft_side[payload]
            image.draft("RGB", (side, side))
            image.convert("RGB").load()
        for model, tensor in list(zip(self.models, tensors, strict=True))[:stages]:
            model.run(tensor)
        return (time.perf_counter() - started) * 1000


def time_calls(call: Callable[[], object], count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


# --- the run -------------------------------------------------------------------------------------------


@dataclass
class Cell:
    system: str
    workload: str
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    answers: set[str] = field(default_factory=set)  # decision and reasons, to compare formats of one photo

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies_ms, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies_ms, 99))

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s else float("nan")


def machine_info() -> dict[str, object]:
    import onnxruntime

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def main(args: argparse.Namespace) -> dict[str, object]:
    args.out.mkdir(parents=True, exist_ok=True)
    loads = workloads(args.atlas)
    if args.workloads:  # the headline and the preview frame stay: the summary is built on them
        kept = (next(iter(loads)), next(name for name in loads if name.startswith("640x480")))
        loads = {n: d for n, d in loads.items() if n in kept or any(w in n for w in args.workloads)}
    settings = Settings()
    register_heif(settings.heif_decode_threads)  # the floor decodes HEIC as the service does
    cervigate = Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/assess")
    # PyTorch's OpenMP threads busy-wait after each request by default, which would steal the cores from
    # whichever system runs next in the interleaving; passive waiting keeps the comparison fair.
    naive = Server(
        "naive",
        [sys.executable, "-m", "bench.naive_app", "--port", "{port}"],
        "/ready",
        "/assess",
        env={"OMP_WAIT_POLICY": "PASSIVE"},
    )
    floor = Floor(settings)
    cells: dict[tuple[str, str, int], Cell] = {}
    quality = Cell("cervigate /v1/quality", "640x480", 1)
    quality_floor = Cell("floor /v1/quality", "640x480", 1)
    phone = httpx.Client(timeout=60)  # one phone, one keep-alive connection for the whole run
    try:
        for server in (cervigate, naive):
            server.start()
        naive_weights = httpx.get(naive.url + "/ready").json()
        preview = next(name for name in loads if name.startswith("640x480"))
        with RssSampler(cervigate) as rss:
            for round_ in range(args.rounds):
                for concurrency in args.concurrency:
                    names = list(loads)
                    names = names[round_ % len(names) :] + names[: round_ % len(names)]
                    for workload in names:
                        systems = (
                            [cervigate, naive] if (round_ + concurrency) % 2 == 0 else [naive, cervigate]
                        )
                        for server in systems:
                            cell = cells.setdefault(
                                (server.name, workload, concurrency), Cell(server.name, workload, concurrency)
                            )
                            latencies, wall, bodies = drive(
                                server.url + server.assess_path, loads[workload], concurrency, args.requests
                            )
                            cell.latencies_ms += latencies
                            cell.wall_s += wall
                            for body in bodies:
                                for stage, ms in body.get("timings_ms", {}).items():
                                    cell.stage_ms.setdefault(stage, []).append(ms)
                                if server is cervigate:
                                    cell.answers.add(f"{body['decision']} {sorted(body['reasons'])}")
                        if concurrency == 1:
                            cell = cells.setdefault(("floor", workload, 1), Cell("floor", workload, 1))
                            cell.latencies_ms += [floor.once(loads[workload]) for _ in range(args.requests)]
                            cell.wall_s += sum(cell.latencies_ms[-args.requests :]) / 1000
                            if workload == preview:  # the preview gate, in the same interleaving
                                measure_gate(
                                    phone,
                                    cervigate.url + "/v1/quality",
                                    floor,
                                    loads[preview],
                                    (quality, quality_floor),
                                    args.preview_requests,
                                    floor_first=round_ % 2 == 1,
                                )
    finally:
        phone.close()
        for server in (cervigate, naive):
            server.stop()
    headline = next(name for name in loads if name.startswith("12MP"))
    full_decode = time_calls(lambda: Image.open(io.BytesIO(loads[headline])).convert("RGB").load(), 20)
    summary = summarise(cells, quality, quality_floor, headline, full_decode, rss.peak, naive_weights)
    write_outputs(args.out, summary, cells)
    return summary


def measure_gate(
    phone: httpx.Client,
    url: str,
    floor: Floor,
    frame: bytes,
    cells: tuple[Cell, Cell],
    count: int,
    *,
    floor_first: bool,
) -> None:
    """One round of the preview gate: `count` frames back to back over HTTP and as many gate floors (the
    order alternates by round, so neither always follows the other systems' cells)."""
    quality, quality_floor = cells

    def served() -> None:
        latencies, wall = stream_frames(phone, url, frame, count)
        quality.latencies_ms += latencies
        quality.wall_s += wall

    def bare() -> None:
        latencies = [floor.once(frame, stages=2) for _ in range(count)]
        quality_floor.latencies_ms += latencies
        quality_floor.wall_s += sum(latencies) / 1000

    for part in (bare, served) if floor_first else (served, bare):
        part()


def summarise(
    cells: dict[tuple[str, str, int], Cell],
    quality: Cell,
    quality_floor: Cell,
    headline: str,
    full_decode_ms: list[float],
    rss_peak: float,
    naive_weights: dict[str, bool],
) -> dict[str, object]:
    def best(system: str) -> Cell:
        return max(
            (c for c in cells.values() if c.system == system and c.workload == headline),
            key=lambda c: c.throughput,
        )

    served, naive, floor = (
        cells[("cervigate", headline, 1)],
        cells[("naive", headline, 1)],
        cells[("floor", headline, 1)],
    )
    best_served, best_naive = best("cervigate"), best("naive")
    full_decode = statistics.median(full_decode_ms)
    heic = {w: c for (system, w, n), c in cells.items() if system == "cervigate" and n == 1 and "HEIC" in w}
    return {
        "headline_workload": headline,
        "e2e_p50_ms": served.p50,
        "e2e_p99_ms": served.p99,
        "throughput_rps": best_served.throughput,
        "throughput_concurrency": best_served.concurrency,
        "naive_p50_ms": naive.p50,
        "naive_throughput_rps": best_naive.throughput,
        "naive_throughput_concurrency": best_naive.concurrency,
        "speedup_vs_naive": best_served.throughput / best_naive.throughput,
        "floor_p50_ms": floor.p50,
        "overhead_vs_floor": served.p50 / floor.p50,
        "stage_p50_ms": {stage: float(np.median(v)) for stage, v in served.stage_ms.items()},
        "quality_p50_ms": quality.p50,
        "quality_floor_p50_ms": quality_floor.p50,
        "quality_overhead_vs_floor": quality.p50 / quality_floor.p50,
        "quality_n": len(quality.latencies_ms),
        "pillow_full_decode_p50_ms": full_decode,
        "e2e_vs_full_decode": served.p50 / full_decode,
        "rss_mb_peak": rss_peak,
        # The same photo as HEIC against the headline JPEG: p50 at one client, and whether answers agreed.
        "heic_p50_ms": {w: c.p50 for w, c in heic.items()},
        "heic_vs_jpeg": {w: c.p50 / served.p50 for w, c in heic.items()},
        "heic_decode_p50_ms": {
            w: float(np.median(c.stage_ms.get("decode", [np.nan]))) for w, c in heic.items()
        },
        "heic_same_answers_as_jpeg": {w: c.answers == served.answers for w, c in heic.items()},
        "naive_weights_trained": naive_weights,
        "cells": [
            {
                "system": c.system,
                "workload": c.workload,
                "concurrency": c.concurrency,
                "n": len(c.latencies_ms),
                "p50_ms": c.p50,
                "p99_ms": c.p99,
                "throughput_rps": c.throughput,
            }
            for c in sorted(cells.values(), key=lambda c: (c.workload, c.system, c.concurrency))
        ],
        "machine": machine_info(),
    }


def write_outputs(out: Path, summary: dict[str, object], cells: dict[tuple[str, str, int], Cell]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"Headline workload: {summary['headline_workload']} (p50 at concurrency 1, throughput at the best "
        "concurrency). Targets: speedup ≥ 4, overhead ≤ 1.25, quality p50 ≤ 10 ms, 12 MP ≤ 0.6 × full decode "
        "RSS ≤ 600 MB, 12 MP HEIC ≤ 2 × the JPEG.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key in (
        "e2e_p50_ms",
        "e2e_p99_ms",
        "throughput_rps",
        "naive_p50_ms",
        "naive_throughput_rps",
        "speedup_vs_naive",
        "floor_p50_ms",
        "overhead_vs_floor",
        "quality_p50_ms",
        "quality_floor_p50_ms",
        "quality_overhead_vs_floor",
        "pillow_full_decode_p50_ms",
        "e2e_vs_full_decode",
        "rss_mb_peak",
    ):
        lines.append(f"| {key} | {summary[key]:.2f} |")
    for workload, ratio in summary["heic_vs_jpeg"].items():  # type: ignore[attr-defined]
        same = "same" if summary["heic_same_answers_as_jpeg"][workload] else "**different**"  # type: ignore[index]
        lines.append(
            f"| {workload} p50 / JPEG p50 | {ratio:.2f} ({summary['heic_p50_ms'][workload]:.1f} ms; "  # type: ignore[index]
            f"{same} answers) |"
        )
    stages = ", ".join(f"{k} {v:.1f}" for k, v in summary["stage_p50_ms"].items())  # type: ignore[attr-defined]
    lines += [
        "",
        f"quality_p50_ms: one phone, {summary['quality_n']} preview frames (640x480) sent back to back to "
        "/v1/quality on one keep-alive connection over all rounds; its floor is decode + detector + quality "
        "model on prepared tensors, as many calls, in the same rounds.",
        "",
        f"Stage p50 (ms, server side): {stages}. With a core idle, quality and segment run side by side, "
        "so stages can add up to more than the total. The "
        "floor runs its models one after another on one thread.",
        "",
        "| workload | system | concurrency | p50 ms | p99 ms | req/s |",
        "|---|---|---|---|---|---|",
    ]
    for c in summary["cells"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {c['workload']} | {c['system']} | {c['concurrency']} | {c['p50_ms']:.1f} | "
            f"{c['p99_ms']:.1f} | {c['throughput_rps']:.1f} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(out / "latency.png", cells)


def plot(path: Path, cells: dict[tuple[str, str, int], Cell]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads_ = sorted({c.workload for c in cells.values()})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    systems = ("cervigate", "naive", "floor")
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        values = [cells[(system, w, 1)].p50 if (system, w, 1) in cells else 0 for w in workloads_]
        left.bar(np.arange(len(workloads_)) + i * width, values, width, label=system)
    left.set_xticks(np.arange(len(workloads_)) + width, workloads_, rotation=15)
    left.set_ylabel("p50 latency, concurrency 1 (ms)")
    left.legend()
    for system in ("cervigate", "naive"):
        for workload in workloads_:
            points = sorted(
                (c.concurrency, c.throughput)
                for c in cells.values()
                if c.system == system and c.workload == workload
            )
            right.plot(
                *zip(*points, strict=True),
                marker="o",
                label=f"{system} {workload}",
                linestyle="-" if system == "cervigate" else "--",
            )
    right.set_xlabel("concurrent clients")
    right.set_ylabel("requests / s")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    result = main(get_args_parser().parse_args())
    print(json.dumps({k: v for k, v in result.items() if k not in ("cells", "machine")}, indent=2))
