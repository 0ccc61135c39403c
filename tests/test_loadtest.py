"""The short variant of `make loadtest`: behaviour under overload and a small soak, never timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import loadtest

pytestmark = pytest.mark.slow


def test_overload_sheds_with_503_and_retry_after_and_nothing_else_fails(tmp_path: Path) -> None:
    args = loadtest.get_args_parser().parse_args(
        [
            "--out",
            str(tmp_path),
            "--capacity-requests",
            "40",
            "--overload-seconds",
            "5",
            "--soak-requests",
            "150",
            "--max-inflight",
            "4",
            "--after-requests",
            "30",
            "--storm-seconds",
            "0",
            "--rounds",
            "2",
        ]
    )
    report = loadtest.main(args)
    assert len(report["rounds"]) == 2
    for measured in report["rounds"]:
        capacity, overload = measured["capacity"], measured["overload"]
        assert capacity["by_status"] == {"200": 40} and capacity["transport_errors"] == 0
        # At four times the measured capacity the service turns work away rather than queueing it without
        # bound...
        assert set(overload["by_status"]) <= {"200", "503"}, overload["by_status"]
        assert overload["rss_mb_max"] > 0
        assert overload["by_status"].get("503", 0) > 0 and overload["shed_without_retry_after"] == 0
        assert overload["by_status"].get("200", 0) > 0 and overload["transport_errors"] == 0
        # ...answers everything once the overload stops (no queue left behind to time out), stays ready...
        assert measured["after_overload"]["by_status"] == {"200": 30}
        assert measured["ready_after_overload"]
        # ...and accounts for its CPU: every phase that answered has a cost per answer.
        assert all(measured[phase]["server_cpu_ms_per_200"] > 0 for phase in ("capacity", "overload"))
    assert set(report["goodput_median"]) >= {"fraction_of_capacity_before", "fraction_of_capacity_bracket"}
    # ...serves a soak afterwards without an error, and stops cleanly.
    soak = report["soak"]
    assert report["ready_after_soak"]
    assert soak["by_status"] == {"200": 150} and soak["transport_errors"] == 0
    assert report["exit_code"] in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    assert (tmp_path / "loadtest.json").is_file()
