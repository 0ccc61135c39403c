"""`make loadtest`: capacity, 60 s of overload at four times capacity, capacity again right after, repeated
in rounds (the median is reported); then a soak and the deadline-storm scenario, against the service over
loopback.

An asyncio driver (a lean HTTP/1.1 client), bounded in requests and time; it starts its own servers
(`python -m service`) with the settings given, and stops them. Writes `--out/loadtest.json`. Every figure
is measured; nothing is asserted here (tests/test_loadtest.py runs a short variant and checks behaviour,
never timing).

Goodput under overload is compared with capacity before it and with the mean of capacity before and after it
(the machine's speed drifts: on this shared VM the hypervisor's steal time, reported per phase, went from 1 %
to over 50 % within minutes). Each phase also reports the server's CPU per answered request, so shedding's
own cost shows apart from the machine's speed.

The storm scenario is the one that showed the deadline fault: one worker, a 0.5 s deadline, 8 closed-loop
clients for 4 s with a 12 MP photo (about 0.1 s of work each), all within `max_inflight`. Before the fix most
answers were 504 while the worker ran pipelines nobody waited for; it reports how many pipelines ran, how many
were dropped unstarted, and what a fresh request gets right after the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.run import REPO, Server, workloads

SHED = 503


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--endpoint", default="/v1/assess")
    parser.add_argument("--capacity-requests", type=int, default=200)
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument("--overload-factor", type=float, default=4.0, help="offered load / measured capacity")
    parser.add_argument(
        "--after-requests",
        type=int,
        default=200,
        help="closed-loop, once the overload stops: what it gets, and capacity after it",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="capacity, overload and after, repeated: the median is reported"
    )
    parser.add_argument(
        "--storm-seconds", type=float, default=4.0, help="0 skips the deadline-storm scenario"
    )
    parser.add_argument("--soak-requests", type=int, default=10_000)
    parser.add_argument(
        "--concurrency", type=int, default=4, help="closed-loop clients for capacity and soak"
    )
    parser.add_argument("--max-inflight", type=int, default=8, help="the server's CERVIGATE_MAX_INFLIGHT")
    parser.add_argument("--atlas", type=Path, default=REPO.parent / "shared" / "data" / "iarc-atlas")
    return parser


@dataclass
class Outcome:
    latencies_ms: dict[int, list[float]] = field(default_factory=dict)  # status -> latencies
    errors: list[str] = field(default_factory=list)  # transport errors: connection refused, reset, timeout
    retry_after_missing: int = 0

    def add(self, status: int, ms: float, retry_after: str | None) -> None:
        self.latencies_ms.setdefault(status, []).append(ms)
        if status == SHED and retry_after is None:
            self.retry_after_missing += 1

    def count(self, status: int) -> int:
        return len(self.latencies_ms.get(status, []))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values()) + len(self.errors)

    def summary(self, seconds: float) -> dict[str, object]:
        accepted = self.latencies_ms.get(200, [])
        return {
            "requests": self.total,
            "seconds": round(seconds, 2),
            "by_status": {str(k): len(v) for k, v in sorted(self.latencies_ms.items())},
            "transport_errors": len(self.errors),
            "transport_error_kinds": sorted(set(self.errors)),
            "accepted_rps": round(len(accepted) / seconds, 2) if seconds else None,
            "shed_fraction": round(self.count(SHED) / self.total, 4) if self.total else None,
            "accepted_p50_ms": round(float(np.percentile(accepted, 50)), 1) if accepted else None,
            "accepted_p99_ms": round(float(np.percentile(accepted, 99)), 1) if accepted else None,
            "shed_without_retry_after": self.retry_after_missing,
        }


_BOUNDARY = "cervigate-loadtest"


class LeanClient:
    """A minimal HTTP/1.1 client on asyncio streams: each request's bytes built once, keep-alive
    connections reused, only the status line and headers parsed. The load generator shares the service's
    two cores here; httpx spent about 2.7 ms of CPU per request, a third of a core at 100 req/s, taken
    from the service it was measuring."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        address = httpx.URL(url)
        self.host, self.port, self.timeout_s = address.host, address.port or 80, timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post_photo(self, path: str, payload: bytes) -> tuple[int, dict[str, str]]:
        while self._idle:  # a kept-alive connection the server may have closed meanwhile: retry on a new one
            try:
                return await self._exchange(self._idle.pop(), path, payload)
            except (ConnectionError, asyncio.IncompleteReadError):
                continue
        return await self._exchange(await asyncio.open_connection(self.host, self.port), path, payload)

    async def _exchange(
        self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str, payload: bytes
    ) -> tuple[int, dict[str, str]]:
        reader, writer = connection
        try:
            writer.write(_request(self.host, path, payload))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
            lines = head.decode("latin-1").split("\r\n")
            fields = (line.partition(":") for line in lines[1:] if line)
            headers = {name.strip().lower(): value.strip() for name, _, value in fields}
            await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append(connection)
        return int(lines[0].split()[1]), headers

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


@functools.cache
def _request(host: str, path: str, payload: bytes) -> bytes:
    head = f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="frame.jpg"\r\n'
    body = (
        (head + "Content-Type: image/jpeg\r\n\r\n").encode() + payload + f"\r\n--{_BOUNDARY}--\r\n".encode()
    )
    request_head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={_BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return request_head.encode() + body


async def _one(client: LeanClient, path: str, payload: bytes, outcome: Outcome) -> None:
    started = time.perf_counter()
    try:
        status, headers = await client.post_photo(path, payload)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as error:
        outcome.errors.append(type(error).__name__)
        return
    outcome.add(status, (time.perf_counter() - started) * 1000, headers.get("retry-after"))


@contextlib.asynccontextmanager
async def _lean(url: str) -> AsyncIterator[LeanClient]:
    client = LeanClient(url)
    try:
        yield client
    finally:
        await client.aclose()


async def closed_loop(url: str, path: str, payload: bytes, clients: int, count: int) -> tuple[Outcome, float]:
    outcome, remaining = Outcome(), [count]
    async with _lean(url) as client:

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                await _one(client, path, payload, outcome)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcome, time.perf_counter() - started


async def open_loop(
    url: str, path: str, payload: bytes, rate: float, seconds: float, rss: RssSampler | None = None
) -> tuple[Outcome, float]:
    """Requests arrive at `rate` per second whatever the service does: how real phones behave."""
    outcome, tasks = Outcome(), []
    next_sample = 0.0
    async with _lean(url) as client:
        started = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            due = int(elapsed * rate) + 1
            for _ in range(due - sent):
                tasks.append(asyncio.create_task(_one(client, path, payload, outcome)))
            sent = due
            if rss is not None and elapsed >= next_sample:
                rss.sample()
                next_sample = elapsed + 1.0
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    return outcome, time.perf_counter() - started


@dataclass
class RssSampler:
    server: Server
    samples: list[float] = field(default_factory=list)

    def sample(self) -> None:
        self.samples.append(self.server.rss_mb())

    def summary(self) -> dict[str, float]:
        return {"rss_mb_max": round(max(self.samples), 1), "rss_mb_first": round(self.samples[0], 1)}


def _metric(url: str, name: str) -> float | None:
    """One unlabelled (or first-labelled) sample from /metrics; None when the service does not export it."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def storm(args: argparse.Namespace, payload: bytes) -> dict[str, object]:
    """The deadline-storm scenario (module docstring), on a server of its own."""
    env = {
        "CERVIGATE_INFERENCE_WORKERS": "1",
        "CERVIGATE_REQUEST_DEADLINE_S": "0.5",
        "CERVIGATE_MAX_INFLIGHT": "32",
    }
    server = Server("cervigate-storm", [sys.executable, "-m", "service"], "/readyz", "/v1/assess", env=env)
    server.start()
    try:
        warm, warm_seconds = asyncio.run(closed_loop(server.url, "/v1/assess", payload, 1, 10))
        runs = 'cervigate_stage_duration_seconds_count{stage="decode"}'
        runs_before, cpu_before = _metric(server.url, runs), _cpu_seconds(server)
        burst, seconds = asyncio.run(timed_closed_loop(server.url, payload, 8, args.storm_seconds))
        time.sleep(3.0)  # work already started finishes
        runs_after, cpu_after = _metric(server.url, runs), _cpu_seconds(server)
        dropped = _metric(server.url, "cervigate_work_dropped_total")
        fresh, _ = asyncio.run(closed_loop(server.url, "/v1/assess", payload, 1, 5))
    finally:
        server.stop()
    return {
        "settings": env,
        "clients": 8,
        "request_alone_p50_ms": warm.summary(warm_seconds)["accepted_p50_ms"],
        "burst": burst.summary(seconds),
        "server_cpu_seconds_in_burst": round(cpu_after - cpu_before, 2),
        # Pipelines whose stages were recorded (the service records them where the work ran, so abandoned
        # pipelines count too); older services recorded only answered ones.
        "pipelines_run": None if runs_before is None or runs_after is None else runs_after - runs_before,
        "dropped_unstarted": dropped,  # None: the service does not drop queued work past its deadline
        "fresh_after_burst": fresh.summary(1.0)["by_status"],
    }


def _cpu_seconds(server: Server) -> float:
    """User + system CPU time of the server process so far (/proc/<pid>/stat, in clock ticks)."""
    assert server.process is not None
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed_closed_loop(url: str, payload: bytes, clients: int, seconds: float) -> tuple[Outcome, float]:
    """`clients` each sending one request after another until `seconds` have passed."""
    outcome = Outcome()
    async with _lean(url) as client:
        started = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() - started < seconds:
                await _one(client, "/v1/assess", payload, outcome)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcome, time.perf_counter() - started


@dataclass
class Meter:
    """CPU accounting over one phase: the server's and the load generator's cores, and the machine's steal
    (time the hypervisor gave another guest: on a shared VM it swings between phases and moves every rate)."""

    server: Server
    started: float = field(default_factory=time.perf_counter)
    client_cpu: float = field(default_factory=time.process_time)
    server_cpu: float = field(init=False)
    machine: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.server_cpu, self.machine = _cpu_seconds(self.server), _steal_and_total()

    def summary(self, answered: int) -> dict[str, float | None]:
        seconds = time.perf_counter() - self.started
        server_cpu = _cpu_seconds(self.server) - self.server_cpu
        steal, total = (now - then for now, then in zip(_steal_and_total(), self.machine, strict=True))
        return {
            "load_generator_cores": round((time.process_time() - self.client_cpu) / seconds, 2),
            "server_cores": round(server_cpu / seconds, 2),
            "server_cpu_ms_per_200": round(1000 * server_cpu / answered, 1) if answered else None,
            "steal_fraction": round(steal / total, 3) if total else None,
        }


def _steal_and_total() -> tuple[int, int]:
    """The machine's steal and total CPU time so far, in ticks (/proc/stat's first line)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return ticks[7], sum(ticks[:8])  # user nice system idle iowait irq softirq steal


def measure_round(args: argparse.Namespace, server: Server, payload: bytes) -> dict[str, Any]:
    """Capacity, the overload at `overload_factor` times it, and capacity again right after (a bracket:
    the machine's speed drifts, so the overload is compared with capacity on both sides of it)."""
    meter = Meter(server)
    capacity, seconds = asyncio.run(
        closed_loop(server.url, args.endpoint, payload, args.concurrency, args.capacity_requests)
    )
    capacity_rps = capacity.count(200) / seconds
    result: dict[str, Any] = {"capacity": {**capacity.summary(seconds), **meter.summary(capacity.count(200))}}
    rss, meter = RssSampler(server), Meter(server)
    rate = args.overload_factor * capacity_rps
    overload, seconds = asyncio.run(
        open_loop(server.url, args.endpoint, payload, rate, args.overload_seconds, rss)
    )
    goodput = overload.count(200) / seconds
    result["overload"] = {
        "offered_rps": round(rate, 2),
        **overload.summary(seconds),
        **rss.summary(),
        **meter.summary(overload.count(200)),
    }
    meter = Meter(server)
    after, seconds = asyncio.run(
        closed_loop(server.url, args.endpoint, payload, args.concurrency, args.after_requests)
    )
    result["after_overload"] = {**after.summary(seconds), **meter.summary(after.count(200))}
    after_rps = after.count(200) / seconds
    capacity_cpu, overload_cpu = (result[p]["server_cpu_ms_per_200"] for p in ("capacity", "overload"))
    result["goodput"] = {
        "fraction_of_capacity_before": round(goodput / capacity_rps, 3),
        "fraction_of_capacity_bracket": round(goodput / ((capacity_rps + after_rps) / 2), 3),
        # Of the server's CPU under overload, the part an answered request costs at capacity: the rest went
        # to shedding (and to the overload's own contention), whatever the machine's speed did meanwhile.
        "useful_cpu_fraction": (
            round(capacity_cpu / overload_cpu, 3) if capacity_cpu and overload_cpu else None
        ),
    }
    return result


def main(args: argparse.Namespace) -> dict[str, object]:
    args.out.mkdir(parents=True, exist_ok=True)
    loads = workloads(args.atlas)
    name = next(n for n in loads if n.startswith("800x600"))
    payload = loads[name]
    server = Server(
        "cervigate",
        [sys.executable, "-m", "service"],
        "/readyz",
        args.endpoint,
        env={"CERVIGATE_MAX_INFLIGHT": str(args.max_inflight)},
    )
    report: dict[str, object] = {
        "endpoint": args.endpoint,
        "workload": name,
        "max_inflight": args.max_inflight,
        "overload_factor": args.overload_factor,
    }
    server.start()
    try:
        asyncio.run(closed_loop(server.url, args.endpoint, payload, args.concurrency, 20))  # warm-up
        rounds = []
        for _ in range(args.rounds):
            rounds.append(measure_round(args, server, payload))
            rounds[-1]["ready_after_overload"] = httpx.get(server.url + "/readyz").status_code == 200
        report["rounds"] = rounds
        report["goodput_median"] = {
            key: float(np.median([r["goodput"][key] for r in rounds]))
            for key in ("fraction_of_capacity_before", "fraction_of_capacity_bracket", "useful_cpu_fraction")
            if all(r["goodput"][key] is not None for r in rounds)
        }
        rss_start = server.rss_mb()
        soak, seconds = asyncio.run(
            closed_loop(server.url, args.endpoint, payload, args.concurrency, args.soak_requests)
        )
        rss_end = server.rss_mb()
        report["soak"] = {
            **soak.summary(seconds),
            "rss_mb_start": round(rss_start, 1),
            "rss_mb_end": round(rss_end, 1),
            "rss_growth_fraction": round((rss_end - rss_start) / rss_start, 4),
        }
        report["ready_after_soak"] = httpx.get(server.url + "/readyz").status_code == 200
    finally:
        server.stop()
    report["exit_code"] = server.process.returncode if server.process else None
    if args.storm_seconds > 0:
        report["deadline_storm"] = storm(
            args, loads["12MP atlas" if "12MP atlas" in loads else "12MP synthetic"]
        )
    (args.out / "loadtest.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    result = main(get_args_parser().parse_args())
    print(json.dumps(result, indent=2))
    sys.exit(0)
