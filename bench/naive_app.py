"""The naive baseline: the same four-stage chain as a team would first write it.

PyTorch eager on the training checkpoints (`runs/<task>/model.pth` when `make models` has run; otherwise the
same architectures with random weights: the compute per request does not depend on the weights, and this chain
runs every stage whatever the models say), a full-resolution Pillow decode, plain resizes, one FastAPI
route. It is a yardstick for `make bench`, never served.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, UploadFile
from PIL import Image
from pillow_heif import register_heif_opener
from torchvision.transforms.functional import normalize, to_tensor

from service.inference.manifest import read_manifest
from service.pipeline.case_risk import CaseModel
from training import presets
from training.case_severity import SwedeMeasures
from training.models import LesionSegmenter
from training.tasks.detector import PretrainedDetector
from training.tasks.quality import QualityModel

RUNS = Path("runs")
CASE_MODEL = CaseModel.from_extra(read_manifest(Path("models/severity"), verify=False).extra)


def load(task: str, model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    checkpoint = RUNS / task / "model.pth"
    trained = checkpoint.is_file()
    if trained:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    return model.eval(), trained


MODELS = {
    "detector": load("detector", PretrainedDetector()),
    "quality": load("quality", QualityModel()),
    "segmenter": load("segmenter", LesionSegmenter()),
    "severity": (SwedeMeasures().eval(), True),  # nothing to train: fixed measures
}
register_heif_opener()  # HEIC as a first service would read it: pillow-heif's defaults, decoded in full
app = FastAPI()


def tensor(image: Image.Image, task: str) -> torch.Tensor:
    """A plain resize (no letterbox) and the task's input statistics."""
    spec = presets.INPUT_SPECS[task]
    return normalize(
        to_tensor(image.resize((spec.width, spec.height))), list(spec.mean[:3]), list(spec.std[:3])
    )[None]


@app.get("/ready")
def ready() -> dict[str, bool]:
    return {name: trained for name, (_, trained) in MODELS.items()}


@app.post("/assess")
@torch.no_grad()
def assess(image: UploadFile) -> dict[str, float]:
    photo = Image.open(io.BytesIO(image.file.read())).convert("RGB")
    width, height = photo.size
    detection = MODELS["detector"][0](tensor(photo, "detector"))
    cx, cy, w, h = detection["box"][0].tolist()
    box = (
        int((cx - w / 2) * width),
        int((cy - h / 2) * height),
        int((cx + w / 2) * width),
        int((cy + h / 2) * height),
    )
    crop = photo.crop(box) if box[2] > box[0] and box[3] > box[1] else photo
    quality = MODELS["quality"][0](tensor(crop, "quality"))
    rgb = tensor(crop, "segmenter")
    lesion = torch.sigmoid(MODELS["segmenter"][0](rgb)["lesion_logits"])
    spec = presets.INPUT_SPECS["segmenter"]
    plain = to_tensor(crop.resize((spec.width, spec.height)))[None]  # 0..1, as the measures read it
    measures = MODELS["severity"][0](torch.cat([plain, lesion], 1))["measures"][0].numpy()
    vote = CASE_MODEL.probability({"acetic": [measures]})
    return {
        "cervix": float(torch.sigmoid(detection["cervix_logit"][0, 0])),
        "sharp": float(torch.sigmoid(quality["sharp_logit"][0, 0])),
        "lesion_area": float((F.interpolate(lesion, size=(64, 64)) > 0.25).float().mean()),
        "cin2plus": vote,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
