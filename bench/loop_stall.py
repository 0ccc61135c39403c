"""How long the service's event loop stalls while it receives large uploads.

Two figures. (1) In process, without the noise of other processes: the longest piece of synchronous work
the loop does per multipart upload of `--upload-mb` (default just under the 20 MB limit), parsed as it
streams in chunks of the size asyncio reads (256 KiB), against parsing the whole body at once (what the
service did before). (2) Over loopback: while one process posts such uploads, another pings `/healthz` back
to back; a late ping means the loop could serve nobody. Ping figures include the machine's noise: quote them
as ratios from one run. Writes `--out/loop_stall.json`. Run: `python -m bench.loop_stall`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from python_multipart.multipart import FormParser

from bench.run import REPO, Server
from service.io.uploads import MAX_PARTS, _StreamingForm

MB = 1 << 20
CHUNK = 256 * 1024  # what asyncio's selector transport reads at most per call


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--upload-mb", type=float, default=19.9, help="just under the 20 MB limit")
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    return parser


async def _ping(client: httpx.AsyncClient, until: asyncio.Event) -> list[float]:
    latencies = []
    while not until.is_set():
        started = time.perf_counter()
        await client.get("/healthz")
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def _upload(url: str, size: int, count: int, statuses: multiprocessing.SimpleQueue) -> None:
    """In a process of its own, so building and sending the bodies never delays the pings' client."""
    body = os.urandom(size)  # not an image: parsed whole, then refused as undecodable (422)
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(count):
            response = client.post("/v1/quality", files={"image": ("p.jpg", body, "image/jpeg")})
            statuses.put(response.status_code)


def _multipart(size: int) -> tuple[bytes, dict[bytes, bytes]]:
    boundary = b"cervigate-bench"
    head = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
    head += b"Content-Type: image/jpeg\r\n\r\n"
    return head + os.urandom(size) + b"\r\n--" + boundary + b"--\r\n", {b"boundary": boundary}


def _ignore(part: object) -> None:
    pass


def synchronous_work_ms(size: int, repeats: int = 5) -> dict[str, float]:
    """Longest synchronous step on the loop per upload: whole-body parse (before) vs one chunk (now)."""
    body, params = _multipart(size)
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    whole, longest_chunk = [], []
    for _ in range(repeats):
        started = time.thread_time()  # CPU time: what the loop spends, without other processes' preemption
        joined = b"".join(chunks)  # what the loop did before: join, then parse in one call
        config = {"MAX_MEMORY_FILE_SIZE": len(body) + 1}
        parser = FormParser(
            "multipart/form-data", _ignore, _ignore, boundary=params[b"boundary"], config=config
        )
        parser.write(joined)
        parser.finalize()
        whole.append((time.thread_time() - started) * 1000)
        form = _StreamingForm(params, max_images=1, max_parts=MAX_PARTS)
        steps = []
        for chunk in chunks:
            started = time.thread_time()
            form.feed(chunk)
            steps.append((time.thread_time() - started) * 1000)
        longest_chunk.append(max(steps))
    return {
        "whole_body_parse_ms_median": round(float(np.median(whole)), 2),
        "streamed_longest_chunk_ms_median": round(float(np.median(longest_chunk)), 3),
    }


def _summary(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies)
    return {
        "pings": len(values),
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
    }


async def measure(url: str, args: argparse.Namespace) -> dict[str, object]:
    statuses: multiprocessing.SimpleQueue = multiprocessing.SimpleQueue()
    uploader = multiprocessing.Process(
        target=_upload, args=(url, int(args.upload_mb * MB), args.uploads, statuses)
    )
    async with httpx.AsyncClient(base_url=url, timeout=60) as pinger:
        stop = asyncio.Event()
        idle = asyncio.create_task(_ping(pinger, stop))
        await asyncio.sleep(args.idle_seconds)
        stop.set()
        idle_latencies = await idle
        stop = asyncio.Event()
        busy = asyncio.create_task(_ping(pinger, stop))
        uploader.start()
        while uploader.is_alive():
            await asyncio.sleep(0.05)
        stop.set()
        busy_latencies = await busy
    seen = set()
    while not statuses.empty():
        seen.add(statuses.get())
    return {
        "upload_mb": args.upload_mb,
        "uploads": args.uploads,
        "upload_statuses": sorted(seen),
        "idle": _summary(idle_latencies),
        "during_uploads": _summary(busy_latencies),
    }


def main(args: argparse.Namespace) -> None:
    in_process = synchronous_work_ms(int(args.upload_mb * MB))
    server = Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/quality")
    server.start()
    try:
        result = {"in_process": in_process, "loopback": asyncio.run(measure(server.url, args))}
    finally:
        server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loop_stall.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
