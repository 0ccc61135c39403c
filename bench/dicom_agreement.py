"""Does DICOM change the answers, or the decode time? Atlas photos assessed as /v1/assess does (in-process,
no HTTP), as the JPEG and wrapped as DICOM three ways: the JPEG file as JPEG baseline pixel data (what
colposcopes write), native RGB, and native YBR_FULL_422; and, for a subset, as 12 MP phone photos (JPEG
against JPEG-baseline DICOM and native RGB DICOM, whose 36 MB exceed the default upload limit: in-process
only). Decode times: the median of `--repeats` decodes of the first photo, each form.

`python -m bench.dicom_agreement --out bench/out` writes `dicom_agreement.json`. The DICOM files are built
by the tests' own writer (tests/dicom_inputs.py), in memory.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from bench.heic_agreement import Answer, compare
from bench.run import ATLAS, PHONE_SIZE, jpeg
from service.inference.runtime import load_models
from service.io.decoding import DecodeLimits, decode_upload
from service.io.dicom import decode_dicom
from service.pipeline.stages import Pipeline
from service.settings import Settings
from tests import dicom_inputs as dcm


def _forms(data: bytes) -> dict[str, bytes]:
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return {
        "jpeg": data,
        "dicom_jpeg_baseline": dcm.jpeg(data, (rgb.shape[1], rgb.shape[0])),
        "dicom_native_rgb": dcm.native(rgb),
        "dicom_ybr_full_422": dcm.ybr_full_422(rgb),
    }


def _median_ms(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def _decode_times(forms: dict[str, bytes], limits: DecodeLimits, repeats: int) -> dict[str, object]:
    times: dict[str, object] = {}
    for form, data in forms.items():
        decode = partial(decode_upload if form == "jpeg" else decode_dicom, data, limits)
        times[form] = {"bytes": len(data), "decode_ms_median": _median_ms(decode, repeats)}
    return times


def main(args: argparse.Namespace) -> dict[str, object]:
    settings = Settings()
    pipeline = Pipeline(load_models(settings), settings)
    photos = sorted(args.atlas.glob("images_*/case_*/*.jpg"))[: args.limit]
    answers: dict[str, list[Answer]] = {}
    flips: list[dict[str, object]] = []
    for path in photos:
        got = {
            form: Answer.of(pipeline.assess(data, diagnose=True))
            for form, data in _forms(path.read_bytes()).items()
        }
        for form, answer in got.items():
            answers.setdefault(form, []).append(answer)
            if (answer.decision, answer.reasons) != (got["jpeg"].decision, got["jpeg"].reasons):
                flips.append({"photo": f"{path.parent.name}/{path.name}", "form": form})
    phone: dict[str, list[Answer]] = {}
    for path in photos[: args.phone_limit]:
        image = Image.open(path).convert("RGB").resize(PHONE_SIZE, Image.Resampling.LANCZOS)
        data = jpeg(image)
        phone_forms = {
            "jpeg": data,
            "dicom_jpeg_baseline": dcm.jpeg(data, PHONE_SIZE),
            "dicom_native_rgb": dcm.native(np.asarray(image)),
        }
        for form, body in phone_forms.items():
            phone.setdefault(form, []).append(Answer.of(pipeline.assess(body, diagnose=True)))
    first = photos[0]
    image = Image.open(first).convert("RGB")
    phone_data = jpeg(image.resize(PHONE_SIZE, Image.Resampling.LANCZOS))
    phone_rgb = np.asarray(Image.open(io.BytesIO(phone_data)).convert("RGB"))
    result = {
        "photos": len(photos),
        "same_as_jpeg": {form: compare(answers[form], answers["jpeg"]) for form in answers if form != "jpeg"},
        "flips": flips,
        "phone_12mp_photos": len(phone.get("jpeg", [])),
        "phone_12mp_same_as_jpeg": {
            form: compare(phone[form], phone["jpeg"]) for form in phone if form != "jpeg"
        },
        "decode_times": {
            "photo": f"{first.parent.name}/{first.name} ({image.width}x{image.height})",
            "repeats": args.repeats,
            "atlas": _decode_times(_forms(first.read_bytes()), pipeline.limits, args.repeats),
            "phone_12mp": _decode_times(
                {
                    "jpeg": phone_data,
                    "dicom_jpeg_baseline": dcm.jpeg(phone_data, PHONE_SIZE),
                    "dicom_native_rgb": dcm.native(phone_rgb),
                },
                pipeline.limits,
                args.repeats,
            ),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dicom_agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--atlas", type=Path, default=ATLAS)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--phone-limit", type=int, default=30, help="photos also tried at 12 MP")
    parser.add_argument("--repeats", type=int, default=21)
    print(json.dumps(main(parser.parse_args()), indent=2))
