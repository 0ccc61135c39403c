"""Peak memory of one assessment of the largest accepted image, per format: the decode constant of the
service's memory bound (service/sizing.py, README "Sizing").

For each format an atlas photo is resized to `--pixels` (default: the `max_pixels` setting) and saved, in a
process of its own; then a fresh process loads the models, warms up, resets its peak-RSS mark
(/proc/self/clear_refs) and assesses the photo once: the growth of the peak over the resident size before is
what one running request needs. Also reports the resident size after warm-up. Writes `--out/memory.json`.
Run: `python -m bench.memory` (Linux only).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import ATLAS, REPO

FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")


def get_args_parser() -> argparse.ArgumentParser:
    from service.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--pixels", type=int, default=Settings().max_pixels)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--atlas", type=Path, default=ATLAS)
    return parser


def make_photo(source: Path, pixels: int, fmt: str, out: Path) -> None:
    from PIL import Image

    from service.io.decoding import register_heif

    register_heif()
    photo = Image.open(source).convert("RGB")
    scale = math.sqrt(pixels / (photo.width * photo.height))
    size = (int(photo.width * scale), int(photo.height * scale))
    options = {"quality": 90} if fmt in ("JPEG", "WEBP", "HEIF") else {"compress_level": 1}
    photo.resize(size, Image.Resampling.BILINEAR).save(out, fmt, **options)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(path: Path, warm_photo: Path) -> dict[str, float | str]:
    """In this process: load, warm up, reset the peak, assess once."""
    from service.inference.runtime import load_models
    from service.io.decoding import register_heif
    from service.pipeline.stages import Pipeline
    from service.settings import Settings

    register_heif()
    settings = Settings()
    pipeline = Pipeline(load_models(settings), settings)
    pipeline.assess(warm_photo.read_bytes(), diagnose=True)
    data = path.read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current size
    before = _status_mb("VmRSS")
    assessment = pipeline.assess(data, diagnose=True)
    return {
        "upload_mb": round(len(data) / 2**20, 1),
        "resident_mb_before": round(before, 1),
        "peak_growth_mb": round(_status_mb("VmHWM") - before, 1),
        "decision": assessment.decision,
        "decode_ms": round(assessment.timings_ms["decode"], 1),
    }


def main(args: argparse.Namespace) -> dict[str, object]:
    photos = sorted(args.atlas.glob("images_*/case_*/*cetic*.jpg"))
    source = photos[0]
    report: dict[str, object] = {"pixels": args.pixels, "source": source.name, "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            path = Path(tmp) / f"photo.{fmt.lower()}"
            here = [sys.executable, "-m", "bench.memory"]
            subprocess.run(
                [*here, "make", str(source), str(args.pixels), fmt, str(path)], check=True, cwd=REPO
            )
            out = subprocess.run([*here, "measure", str(path), str(source)],
                                 check=True, cwd=REPO, capture_output=True, text=True)  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["bytes_per_pixel"] = round(result["peak_growth_mb"] * 2**20 / args.pixels, 2)
            report["formats"][fmt] = result  # type: ignore[index]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:  # a child process: write one photo
        make_photo(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    elif sys.argv[1:2] == ["measure"]:  # a child process: one measurement, as JSON on the last line
        print(json.dumps(measure(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        print(json.dumps(main(get_args_parser().parse_args()), indent=2))
