"""A/B of CERVIGATE_OVERLAP_STAGES in one run: two servers, interleaved round by round.

Reports the 12 MP `/v1/assess` p50 at one client (where overlap should help) and the throughput at as many
clients as workers (where it must not hurt). `python -m bench.overlap_ab`; about 2 minutes here. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.run import ATLAS, Server, drive, workloads


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=30, help="requests per side per round at 1 client")
    parser.add_argument(
        "--busy-requests", type=int, default=40, help="requests per side per round at 2 clients"
    )
    parser.add_argument("--atlas", type=Path, default=ATLAS)
    return parser


def main(args: argparse.Namespace) -> dict[str, object]:
    payload = next(data for name, data in workloads(args.atlas).items() if name.startswith("12MP"))
    servers = {
        setting: Server(
            f"overlap {setting}", [sys.executable, "-m", "service"], "/readyz", "/v1/assess",
            env={"CERVIGATE_OVERLAP_STAGES": setting, "CERVIGATE_INFERENCE_WORKERS": "2"},
        )
        for setting in ("true", "false")
    }  # fmt: skip
    latencies: dict[str, list[float]] = {setting: [] for setting in servers}
    throughputs: dict[str, list[float]] = {setting: [] for setting in servers}
    try:
        for server in servers.values():
            server.start()
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for setting in order:
                url = servers[setting].url + "/v1/assess"
                latencies[setting] += drive(url, payload, 1, args.requests)[0]
                _, wall_s, _ = drive(url, payload, 2, args.busy_requests)
                throughputs[setting].append(args.busy_requests / wall_s)
    finally:
        for server in servers.values():
            server.stop()
    p50 = {setting: statistics.median(values) for setting, values in latencies.items()}
    rps = {setting: statistics.median(values) for setting, values in throughputs.items()}
    return {
        "p50_ms_1_client": p50,
        "throughput_rps_2_clients": rps,
        "p50_ratio_on_off": p50["true"] / p50["false"],
        "throughput_ratio_on_off": rps["true"] / rps["false"],
        "requests_per_side_1_client": args.rounds * args.requests,
    }


if __name__ == "__main__":
    print(json.dumps(main(get_args_parser().parse_args()), indent=2))
