"""The capture app's speed as a health worker meets it: Chromium with a fake camera playing a sharp atlas
photo at 30 frames/s (faster than the gate answers, so the gate sets the pace), against `python -m service`.

1. Preview: auto-capture off for `--seconds`; frames per second the page got answers for, the page's round
   trip per frame, and the service's own /v1/quality time from its metrics.
2. Auto-capture: `--captures` times, the time from the first "hold still" frame to the assessment on
   screen, and from the still to the assessment.

`make bench-capture` writes bench/out/capture.json. Never part of `make test`: timings are not asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from playwright.sync_api import sync_playwright

from bench.capture_browser import (
    CAMERA_SIZE,
    SCENE_CASE,
    camera_video,
    chromium,
    launch_args,
    settings_script,
)
from bench.fake_camera import Scene, write_y4m
from bench.run import ATLAS, REPO, Server

CAMERA_FPS = 30


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--atlas", type=Path, default=ATLAS)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the preview run")
    parser.add_argument("--captures", type=int, default=5, help="auto-captures to time")
    parser.add_argument("--frames", type=int, default=3, help="passing frames that trigger a capture")
    parser.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        help="also remake the README's picture (docs/capture-app.png): the live overlay on a sharp atlas "
        "frame and on the same frame out of focus, side by side",
    )
    return parser


def sharp_video(atlas: Path, out: Path) -> Path:
    case = next(atlas.glob(f"images_*/{SCENE_CASE}"))
    photo = Image.open(case / "2_After_acetic_acid.jpg").convert("RGB")
    write_y4m(out, [Scene("sharp", photo, 2.0)], CAMERA_SIZE, CAMERA_FPS)
    return out


def quality_seconds(server: Server) -> tuple[float, int]:
    """Sum and count of the service's /v1/quality request durations (its Prometheus histogram)."""
    total, count = 0.0, 0
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("cervigate_request_duration_seconds_") and 'endpoint="/v1/quality"' in line:
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith("cervigate_request_duration_seconds_sum"):
                total = value
            elif line.startswith("cervigate_request_duration_seconds_count"):
                count = int(value)
    return total, count


def _poll(condition: Any, what: str, timeout_s: float = 60) -> None:
    # Not page.wait_for_function: the page's Content-Security-Policy (rightly) forbids evaluating strings.
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s:g} s")
        time.sleep(0.05)


def preview_run(page: Any, server: Server, seconds: float) -> dict[str, Any]:
    page.click("#start")
    _poll(lambda: page.evaluate("window.cervigate.stats.framesAnswered") > 0, "the first answered frame")
    before = page.evaluate("window.cervigate.stats.framesAnswered")
    server_before = quality_seconds(server)
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    stats = page.evaluate("window.cervigate.stats")
    server_after = quality_seconds(server)
    frames = stats["framesAnswered"] - before
    served = server_after[1] - server_before[1]
    return {
        "frames_answered": frames,
        "seconds": round(elapsed, 2),
        "frames_per_second": round(frames / elapsed, 2),
        "round_trip_ms_median": round(statistics.median(stats["roundTripsMs"][-frames:]), 1),
        "service_quality_ms_mean": round(1000 * (server_after[0] - server_before[0]) / max(served, 1), 1),
        "max_in_flight": stats["maxInFlight"],
    }


def capture_runs(page: Any, count: int) -> dict[str, Any]:
    page.click("#start")
    timings = []
    for _ in range(count):
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        capture = page.evaluate("window.cervigate.captures.at(-1)")
        timings.append(capture)
        page.click("#retake")
        page.wait_for_selector("#result[hidden]", state="attached", timeout=10_000)
    hold = [c["shownAt"] - c["holdStillAt"] for c in timings]
    still = [c["shownAt"] - c["capturedAt"] for c in timings]
    return {
        "captures": count,
        "decisions": [c["decision"] for c in timings],
        "still_source": sorted({c["source"] for c in timings}),
        "hold_still_to_assessment_ms_median": round(statistics.median(hold)),
        "hold_still_to_assessment_ms": [round(v) for v in hold],
        "still_to_assessment_ms_median": round(statistics.median(still)),
    }


def screenshot(browser: Any, server: Server, atlas: Path, tmp: Path, out: Path) -> None:
    """Two states of the page on the test video's scenes (auto-capture off), side by side."""
    context = browser.new_context(permissions=["camera"], viewport={"width": 640, "height": 720})
    context.add_init_script(settings_script(autoCaptureFrames=0))
    page = context.new_page()
    page.goto(server.url + "/capture/")
    page.click("#start")
    shots = []
    for reason in ("accept", "out_of_focus"):
        _poll(lambda r=reason: page.evaluate("document.getElementById('status').dataset.reason") == r, reason)
        time.sleep(0.3)  # the box and the text of this frame are painted
        path = tmp / f"{reason}.png"
        page.screenshot(path=str(path))
        shots.append(Image.open(path).convert("RGB"))
    context.close()
    gap = 16
    sheet = Image.new("RGB", (sum(s.width for s in shots) + gap, max(s.height for s in shots)), "white")
    sheet.paste(shots[0], (0, 0))
    sheet.paste(shots[1], (shots[0].width + gap, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)


def main(args: argparse.Namespace) -> dict[str, Any]:
    browser_path = chromium()
    if browser_path is None:
        raise SystemExit("Chromium not found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    server = Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/assess")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        video = sharp_video(args.atlas, Path(tmp) / "sharp.y4m")
        server.start()
        browser = playwright.chromium.launch(executable_path=browser_path, args=launch_args(video))
        try:
            if args.screenshot:
                scenes = camera_video(args.atlas, Path(tmp) / "scenes.y4m")
                shooter = playwright.chromium.launch(executable_path=browser_path, args=launch_args(scenes))
                screenshot(shooter, server, args.atlas, Path(tmp), args.screenshot)
                shooter.close()
            results: dict[str, Any] = {"camera": {"size": CAMERA_SIZE, "fps": CAMERA_FPS, "case": SCENE_CASE}}
            for name, settings in (("preview", {"autoCaptureFrames": 0}), ("auto_capture", {})):
                context = browser.new_context(permissions=["camera"], viewport={"width": 900, "height": 800})
                context.add_init_script(settings_script(**({"autoCaptureFrames": args.frames} | settings)))
                page = context.new_page()
                page.goto(server.url + "/capture/")
                if name == "preview":
                    results[name] = preview_run(page, server, args.seconds)
                else:
                    results[name] = capture_runs(page, args.captures)
                context.close()
        finally:
            browser.close()
            server.stop()
    (args.out / "capture.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
