"""`make bench`'s summary: every figure the issue asks for, from the cells it names (no timing here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run import Cell, summarise, write_outputs

REQUIRED = {
    "e2e_p50_ms", "e2e_p99_ms", "throughput_rps", "naive_p50_ms", "naive_throughput_rps", "speedup_vs_naive",
    "floor_p50_ms", "overhead_vs_floor", "stage_p50_ms", "quality_p50_ms", "rss_mb_peak", "machine",
    "quality_floor_p50_ms", "quality_overhead_vs_floor", "e2e_vs_full_decode",
}  # fmt: skip


def _cell(system: str, workload: str, concurrency: int, latency_ms: float, wall_s: float) -> Cell:
    cell = Cell(system, workload, concurrency, [latency_ms] * 10, wall_s)
    if system == "cervigate":
        cell.stage_ms = {"decode": [5.0] * 10, "total": [latency_ms - 2] * 10}
    return cell


def test_summary_figures_come_from_the_right_cells(tmp_path: Path) -> None:
    cells = {
        ("cervigate", "12MP", 1): _cell("cervigate", "12MP", 1, 50.0, 0.5),  # 20 req/s
        ("cervigate", "12MP", 4): _cell("cervigate", "12MP", 4, 150.0, 0.4),  # 25 req/s: the best
        ("naive", "12MP", 1): _cell("naive", "12MP", 1, 400.0, 4.0),
        ("naive", "12MP", 4): _cell("naive", "12MP", 4, 800.0, 2.0),  # 5 req/s
        ("floor", "12MP", 1): _cell("floor", "12MP", 1, 40.0, 0.4),
        ("cervigate", "12MP HEIC", 1): _cell("cervigate", "12MP HEIC", 1, 90.0, 0.9),
    }
    cells[("cervigate", "12MP", 1)].answers = {"diagnosis []"}
    cells[("cervigate", "12MP HEIC", 1)].answers = {"recapture ['not_sharp']"}
    quality, quality_floor = Cell("q", "640x480", 1, [20.0] * 5, 0.1), Cell("qf", "640x480", 1, [8.0] * 5)
    full_decode_ms = [100.0, 110.0, 120.0]
    summary = summarise(cells, quality, quality_floor, "12MP", full_decode_ms, 300.0, {"detector": True})
    assert summary.keys() >= REQUIRED
    assert summary["throughput_rps"] == 25.0 and summary["throughput_concurrency"] == 4
    assert summary["speedup_vs_naive"] == pytest.approx(5.0)
    assert summary["overhead_vs_floor"] == pytest.approx(50.0 / 40.0)
    assert summary["quality_overhead_vs_floor"] == pytest.approx(20.0 / 8.0)
    assert summary["quality_n"] == 5
    assert summary["e2e_vs_full_decode"] == pytest.approx(50.0 / 110.0)
    assert summary["stage_p50_ms"] == {"decode": 5.0, "total": 48.0}
    assert summary["heic_vs_jpeg"] == {"12MP HEIC": pytest.approx(90.0 / 50.0)}
    assert summary["heic_decode_p50_ms"] == {"12MP HEIC": 5.0}
    assert summary["heic_same_answers_as_jpeg"] == {"12MP HEIC": False}
    write_outputs(tmp_path, summary, cells)
    assert {p.name for p in tmp_path.iterdir()} == {"summary.json", "table.md", "latency.png"}
    table = (tmp_path / "table.md").read_text()
    assert "| overhead_vs_floor | 1.25 |" in table
    assert "| 12MP HEIC p50 / JPEG p50 | 1.80 (90.0 ms; **different** answers) |" in table
    assert "one phone, 5 preview frames" in table
