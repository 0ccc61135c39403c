"""Do HEIC thumbnails change the answers? Atlas photos as 12 MP HEICs (512 px grid tiles, 320 px and 1024 px
thumbnails), assessed as /v1/assess does: as served, decoded in full (thumbnails off, as before), and the same
photo as a 12 MP JPEG (served), which shows how far two decodes of one photo differ anyway.

`python -m bench.heic_agreement --out bench/out` writes `heic_agreement.json`. In-process (no HTTP), one
photo at a time; the x265 encode dominates (about 4 s a photo at its `ultrafast` preset here).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image

from bench.run import ATLAS, PHONE_SIZE, heic, jpeg
from service.inference.runtime import load_models
from service.io.decoding import register_heif
from service.pipeline.stages import Assessment, Pipeline
from service.settings import Settings

THUMBNAILS = [320, 1024]


@dataclass(frozen=True)
class Answer:
    decision: str
    reasons: tuple[str, ...]
    sharpness: float
    p_acetic: float
    cin2plus: float
    box: tuple[float, ...]

    @classmethod
    def of(cls, assessment: Assessment) -> Answer:
        box = assessment.detection.box or (np.nan,) * 4
        return cls(
            decision=assessment.decision,
            reasons=tuple(sorted(str(r) for r in assessment.reasons)),
            sharpness=assessment.quality.sharpness if assessment.quality else np.nan,
            p_acetic=assessment.quality.p_acetic if assessment.quality else np.nan,
            cin2plus=assessment.diagnosis.probability if assessment.diagnosis else np.nan,
            box=tuple(box),
        )


def compare(a: list[Answer], b: list[Answer]) -> dict[str, object]:
    def gap(values: list[float]) -> float:
        finite = [v for v in values if np.isfinite(v)]
        return float(max(finite)) if finite else 0.0

    return {
        "same_decision": sum(x.decision == y.decision for x, y in zip(a, b, strict=True)),
        "same_reasons": sum(x.reasons == y.reasons for x, y in zip(a, b, strict=True)),
        "max_abs_diff_sharpness": gap([abs(x.sharpness - y.sharpness) for x, y in zip(a, b, strict=True)]),
        "max_abs_diff_p_acetic": gap([abs(x.p_acetic - y.p_acetic) for x, y in zip(a, b, strict=True)]),
        "max_abs_diff_p_cin2plus": gap([abs(x.cin2plus - y.cin2plus) for x, y in zip(a, b, strict=True)]),
        "max_box_diff_px": gap(
            [float(np.max(np.abs(np.subtract(x.box, y.box)))) for x, y in zip(a, b, strict=True)]
        ),
    }


def main(args: argparse.Namespace) -> dict[str, object]:
    settings = Settings()
    register_heif(settings.heif_decode_threads)
    pipeline = Pipeline(load_models(settings), settings)
    pattern = f"*{args.stage}*.jpg" if args.stage else "*.jpg"
    photos = sorted(args.atlas.glob(f"images_*/case_*/{pattern}"))[: args.limit]
    served: list[Answer] = []
    full: list[Answer] = []
    as_jpeg: list[Answer] = []
    flips: list[dict[str, object]] = []  # photos whose decision or reasons differ, with all three answers
    for path in photos:
        phone = Image.open(path).convert("RGB").resize(PHONE_SIZE, Image.Resampling.LANCZOS)
        data = heic(phone, THUMBNAILS, preset="ultrafast")
        served.append(Answer.of(pipeline.assess(data, diagnose=True)))
        pillow_heif.options.THUMBNAILS = False
        try:
            full.append(Answer.of(pipeline.assess(data, diagnose=True)))
        finally:
            pillow_heif.options.THUMBNAILS = True
        as_jpeg.append(Answer.of(pipeline.assess(jpeg(phone), diagnose=True)))
        if (served[-1].decision, served[-1].reasons) != (full[-1].decision, full[-1].reasons):
            answers = {"served": served[-1], "full_decode": full[-1], "jpeg": as_jpeg[-1]}
            flips.append(
                {"photo": f"{path.parent.name}/{path.name}"} | {k: asdict(v) for k, v in answers.items()}
            )
            print(json.dumps(flips[-1]), flush=True)
    result = {
        "photos": len(photos),
        "stage": args.stage,
        "heic": f"{PHONE_SIZE[0]}x{PHONE_SIZE[1]}, 512 px tiles, thumbnails {THUMBNAILS}, x265 ultrafast q90",
        "served_vs_full_decode": compare(served, full),
        "served_heic_vs_jpeg": compare(served, as_jpeg),
        "full_decode_heic_vs_jpeg": compare(full, as_jpeg),
        "flips": flips,
        "decisions_served": {
            d: sum(a.decision == d for a in served) for d in sorted({a.decision for a in served})
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heic_agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--atlas", type=Path, default=ATLAS)
    parser.add_argument("--stage", default="", help="only photos whose file names contain this (e.g. cetic)")
    parser.add_argument("--limit", type=int, default=None)
    print(json.dumps(main(parser.parse_args()), indent=2))
