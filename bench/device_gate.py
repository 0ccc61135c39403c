"""The capture app's device gate (ONNX Runtime Web, WebAssembly) against the service, in headless Chromium:
the same 640x480 preview frames (sharp, out of focus, dark, after iodine, no cervix) judged by both, how
often the decision and reasons agree and where they differ, and the device gate's time per frame with 1 and
2 WebAssembly threads; plus what a phone downloads once (the two models and ONNX Runtime's WebAssembly).

`python -m bench.device_gate` writes bench/out/device_gate.json. Never part of `make test`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright

from bench.capture_browser import (
    DEVICE_ASSESS,
    chromium,
    parity_frames,
    settings_script,
    verdict,
    wait_for_device_gate,
)
from bench.run import ATLAS, REPO, Server

STATIC = REPO / "service" / "web" / "static"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--atlas", type=Path, default=ATLAS)
    parser.add_argument("--per-kind", type=int, default=12, help="frames of each kind")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    return parser


def compare(page: Any, server: Server, frames: list[Any]) -> dict[str, Any]:
    agree, differences, sharpness_gaps, device_ms = 0, [], [], []
    for frame in frames:
        served = httpx.post(
            server.url + "/v1/quality", content=frame.jpeg, headers={"content-type": "image/jpeg"}, timeout=30
        ).json()
        device = page.evaluate(DEVICE_ASSESS, [base64.b64encode(frame.jpeg).decode(), "acetic"])
        device_ms.append(device["timings_ms"]["total"])
        if served.get("quality") and device.get("quality"):
            sharpness_gaps.append(abs(served["quality"]["sharpness"] - device["quality"]["sharpness"]))
        if verdict(served) == verdict(device):
            agree += 1
        else:
            differences.append(
                {
                    "kind": frame.kind,
                    "frame": frame.name,
                    "service": verdict(served),
                    "device": verdict(device),
                }
            )
    return {
        "frames": len(frames),
        "same_decision_and_reasons": agree,
        "agreement": round(agree / len(frames), 4),
        "differences": differences,
        "sharpness_abs_difference_median": round(statistics.median(sharpness_gaps), 5)
        if sharpness_gaps
        else None,
        "sharpness_abs_difference_max": round(max(sharpness_gaps), 5) if sharpness_gaps else None,
        "device_ms_per_frame_median": round(statistics.median(device_ms), 1),
    }


# Chromium's own JPEG decoding, and its canvas downscale (what a page would use without a resize of its own),
# for comparison with Pillow's: RGB bytes back, base64.
BROWSER_PIXELS = """async ([b64, width, height]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes], {type: 'image/jpeg'}));
  const canvas = new OffscreenCanvas(width || bitmap.width, height || bitmap.height);
  const context = canvas.getContext('2d');
  context.imageSmoothingQuality = 'high';
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const rgb = new Uint8Array(rgba.length / 4 * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
  }
  let s = '';
  for (let i = 0; i < rgb.length; i += 8192) s += String.fromCharCode(...rgb.subarray(i, i + 8192));
  return btoa(s);
}"""


def pixel_differences(page: Any, frames: list[Any]) -> dict[str, Any]:
    """Mean absolute difference (0-255 levels) between the browser's and Pillow's pixels: JPEG decoding, and
    a canvas downscale to the detector's 192x144 against Pillow's bilinear (why the gate resizes itself)."""
    decode, canvas = [], []
    for frame in frames:
        jpeg = base64.b64encode(frame.jpeg).decode()
        pillow = np.asarray(Image.open(io.BytesIO(frame.jpeg)).convert("RGB"), dtype=np.int16)
        browser = np.frombuffer(base64.b64decode(page.evaluate(BROWSER_PIXELS, [jpeg, 0, 0])), np.uint8)
        decode.append(float(np.abs(browser.reshape(pillow.shape) - pillow).mean()))
        small = np.asarray(
            Image.fromarray(pillow.astype(np.uint8)).resize((192, 144), Image.Resampling.BILINEAR), np.int16
        )
        drawn = np.frombuffer(base64.b64decode(page.evaluate(BROWSER_PIXELS, [jpeg, 192, 144])), np.uint8)
        canvas.append(float(np.abs(drawn.reshape(small.shape) - small).mean()))
    return {
        "jpeg_decode_mean_abs_levels": round(statistics.mean(decode), 3),
        "canvas_downscale_vs_pillow_bilinear_mean_abs_levels": round(statistics.mean(canvas), 3),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    frames = parity_frames(args.atlas, args.per_kind)
    results: dict[str, Any] = {"kinds": sorted({f.kind for f in frames}), "by_threads": {}}
    server = Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/assess")
    with server.running(), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium())
        for threads in args.threads:
            context = browser.new_context()
            context.add_init_script(settings_script(deviceThreads=threads))
            page = context.new_page()
            page.goto(server.url + "/capture/")
            state = wait_for_device_gate(page)
            results["models_download_bytes"] = state["downloadBytes"]
            results["by_threads"][str(state["threads"])] = compare(page, server, frames)
            results.setdefault("browser_vs_pillow_pixels", pixel_differences(page, frames))
            context.close()
        browser.close()
    ort_bytes = sum(p.stat().st_size for p in (STATIC / "ort").iterdir())
    results["onnxruntime_web_bytes"] = ort_bytes
    results["first_download_bytes"] = results["models_download_bytes"] + ort_bytes
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_gate.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
