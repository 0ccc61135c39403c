"""Case-level CIN2+ risk: (a) frozen Lite0 features vs (b) Swede-style measured features, nested over cases.

Every atlas photo of a case (saline, acetic acid, iodine, ...) is cropped the way the service crops it, by
the detector of the outer fold that holds its case out (`--detector-run`, its `fold_heads.npz`), and mapped
by a lesion segmenter (`--segmenter-dir`; `--segmenter-folds DIR` takes DIR/fold<k>/ for the photos of
fold k, for a segmenter trained on real outlines, so no held-out map comes from a model that saw it).
So every photo's crop and lesion map is out of fold, and one feature cache serves every fit.

    python -m training train severity_case --output-dir runs/severity_case --detector-run runs/detector
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.inference.manifest import InputSpec
from service.inference.preprocess import crop_box, fit, normalize_batch
from service.io.decoding import decode_upload
from service.pipeline.stages import detect_cervix
from training import backbones, case_severity, device_suite, engine, metrics, presets
from training.case_severity import CaseTable, PhotoTable
from training.data import catalog
from training.data.adapters import DEFAULT_ATLAS, iarc_atlas
from training.features import FeatureExtractor, TorchOnOnnx, onnx_session
from training.sources import load_all
from training.tasks.detector import fold_detectors
from training.tasks.severity import LesionChannel

TASK = "severity"
SPEC = presets.INPUT_SPECS[TASK]  # 224 px letterbox: the segmenter's map is aligned as is
# The served model: the measures graph on the crop and its lesion map, each channel scaled to 0..1.
MEASURE_SPEC = InputSpec(
    name="crop", width=SPEC.width, height=SPEC.height, channels=("R", "G", "B", "lesion_probability"),
    resize="letterbox", mean=(0.0,) * 4, std=(1.0,) * 4,
)  # fmt: skip
LITE_SPEC = InputSpec(
    name="crop", width=SPEC.width, height=SPEC.height, channels=("R", "G", "B"), resize="letterbox",
    mean=backbones.LITE_MEAN, std=backbones.LITE_STD,
)  # fmt: skip
POOL_CELL = 32  # Lite0's stride at the head: one 7x7 feature cell per 32x32 block of the lesion map
CACHE = "photo_features.npz"
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--atlas", type=Path, default=DEFAULT_ATLAS)
    parser.add_argument("--detector-run", type=Path, default=Path("runs/detector"),
                        help="run with fold_heads.npz: each fold's detector crops its cases")  # fmt: skip
    parser.add_argument("--segmenter-dir", type=Path, default=Path("models/segmenter"),
                        help="exported segmenter for the lesion maps of every photo")  # fmt: skip
    parser.add_argument("--segmenter-folds", type=Path, default=None,
                        help="DIR with fold<k>/ segmenters: fold k's maps its held-out photos")  # fmt: skip
    parser.add_argument("--target-sensitivity", type=float, default=0.9,
                        help="CIN2+ sensitivity on inner out-of-fold predictions")  # fmt: skip
    parser.add_argument("--inner-folds", type=int, default=5)
    parser.add_argument("--inner-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser


# --- photos -> crops, lesion maps, features (once, cached) ------------------------------------------------


@dataclass(frozen=True)
class PhotoCrop:
    rgb: np.ndarray  # 224x224x3 uint8, letterboxed cervix crop
    lesion: np.ndarray  # 224x224 uint8, P(lesion) x 255
    inside: np.ndarray  # 224x224 bool, the crop's own pixels (not the letterbox padding)
    detected: bool  # False: the fold's detector missed and the whole frame was used


def lesion_source(args: argparse.Namespace, folds: list[int]) -> dict[int, LesionChannel]:
    """The segmenter that maps each fold's photos: one shipped model for all, or one per fold."""
    if args.segmenter_folds is None:
        shared = LesionChannel(args.segmenter_dir)
        return dict.fromkeys(folds, shared)
    return {k: LesionChannel(args.segmenter_folds / f"fold{k}") for k in folds}


def crop_photo(rgb: np.ndarray, detector: TorchOnOnnx, threshold: float, lesion: LesionChannel) -> PhotoCrop:
    """The service's crop: JPEG as a phone sends it, decoded as served, boxed by the detector, grown by the
    crop margin; a missed cervix falls back to the whole frame (the atlas frames the cervix)."""
    decoded = decode_upload(device_suite.encode_jpeg(rgb), device_suite.SERVED_DECODE)
    detection = detect_cervix(detector, decoded, threshold)
    width, height = decoded.original_size
    box = detection.box or (0.0, 0.0, float(width), float(height))
    region = crop_box(box, width, height, presets.CROP_MARGIN)
    crop_rgb = decoded.region(region, SPEC.width)
    fitted, placement = fit(crop_rgb, SPEC)
    inside = np.zeros(fitted.shape[:2], bool)
    left, top = round(placement.pad_x), round(placement.pad_y)
    inside[top : top + round(crop_rgb.shape[0] * placement.scale_y),
           left : left + round(crop_rgb.shape[1] * placement.scale_x)] = True  # fmt: skip
    return PhotoCrop(fitted, lesion(crop_rgb), inside, detection.box is not None)


def lesion_weights(lesion: np.ndarray, cell: int = POOL_CELL) -> np.ndarray:
    """NxHxW uint8 lesion maps -> Nx(H/cell)x(W/cell) mean probability per feature cell (average pooling,
    which ONNX has)."""
    n, h, w = lesion.shape
    return lesion.reshape(n, h // cell, cell, w // cell, cell).mean(axis=(2, 4)) / 255.0


def pooled_features(maps: np.ndarray, lesion: np.ndarray) -> dict[str, np.ndarray]:
    """Global average of the head map, and the map averaged with the lesion probability as weights (the
    lesion's own appearance); a photo with no lesion falls back to the global average."""
    maps = maps.astype(np.float32)
    weights = lesion_weights(lesion)[:, None]
    total = weights.sum(axis=(2, 3))
    gap = maps.mean(axis=(2, 3))
    weighted = (maps * weights).sum(axis=(2, 3)) / np.maximum(total, 1e-6)
    weighted = np.where(total > 1e-3, weighted, gap)
    return {"gap": gap, "lesion": weighted}


def extract(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Crops, maps, deep features and measures of every atlas photo that shows the cervix and has a stage."""
    records = [r for r in iarc_atlas(args.atlas) if r.labels.exam_stage and r.labels.severity is not None]
    fold_of = catalog.real_fold_of_subject(args.atlas)
    images = load_all(records, desc="atlas")
    folds = sorted({fold_of[r.subject] for r in records})
    detectors = {
        k: (TorchOnOnnx(model, presets.INPUT_SPECS["detector"], ("cervix_logit", "box")), t)
        for k, (model, t) in fold_detectors(args.detector_run).items()
    }
    lesions = lesion_source(args, folds)
    crops = []
    for record, image in tqdm(zip(records, images, strict=True), total=len(records), desc="crops"):
        detector, threshold = detectors[fold_of[record.subject]]
        crops.append(crop_photo(image.image, detector, threshold, lesions[fold_of[record.subject]]))
    trunk = backbones.LiteTrunk((), head=True)
    extractor = FeatureExtractor(trunk, ("head",), LITE_SPEC, threads=args.threads, batch_size=16)
    maps = extractor.extract(np.stack([c.rgb for c in crops]), desc="lite0")["head"]
    lesion = np.stack([c.lesion for c in crops])
    deep = pooled_features(maps, lesion)
    out: dict[str, np.ndarray] = {
        "case": np.array([r.subject for r in records]),
        "stage": np.array([r.labels.exam_stage for r in records]),
        "fold": np.array([fold_of[r.subject] for r in records]),
        "cin2plus": np.array([float(r.labels.severity.is_cin2plus) for r in records]),  # type: ignore[union-attr]
        "path": np.array([str(r.path.relative_to(args.atlas)) for r in records]),
        "detected": np.array([c.detected for c in crops]),
        "deep_gap": deep["gap"],
        "deep_lesion": deep["lesion"],
        "rgb": np.stack([c.rgb for c in crops]),
        "lesion": lesion,
    }
    return out


def load_or_extract(args: argparse.Namespace) -> dict[str, np.ndarray]:
    path = args.output_dir / CACHE
    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    features = extract(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **features)  # type: ignore[arg-type]
    return features


# --- the comparison ---------------------------------------------------------------------------------------


def tables(features: dict[str, np.ndarray]) -> tuple[PhotoTable, CaseTable]:
    """Photos, and the cases that can be scored (at least one acetic-acid photo: the exam endpoint's rule)."""
    photos = PhotoTable(features["case"], features["stage"], features["fold"], features["cin2plus"])
    cases = sorted(set(photos.case[photos.stage == case_severity.ACETIC].tolist()))
    return photos, case_severity.case_table(photos, cases)


def candidates(
    features: dict[str, np.ndarray], photos: PhotoTable, cases: CaseTable
) -> dict[str, dict[str, np.ndarray]]:
    names = list(cases.case)
    gap, _ = case_severity.pool_stage(features["deep_gap"], photos, names, case_severity.ACETIC)
    lesion, _ = case_severity.pool_stage(features["deep_lesion"], photos, names, case_severity.ACETIC)
    measured = case_severity.measured_case_features(features["measures"], photos, names)
    return {
        "deep": {"gap": gap, "gap+lesion": np.hstack([gap, lesion])},
        "measured": {"measured": measured},
    }


def served_measures(rgb: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """Per-photo measures from the ONNX export of the measures graph, as the service will compute them."""
    session = onnx_session(case_severity.SwedeMeasures(), ("measures",), MEASURE_SPEC)
    tensor = normalize_batch(np.concatenate([rgb, lesion[..., None]], axis=3), MEASURE_SPEC)
    (out,) = session.run(["measures"], {"image": tensor})
    return np.asarray(out, dtype=np.float64)


def swede_scores(atlas: Path) -> dict[str, float]:
    """The atlas's Swede score per case (a colposcopist's): a reference to compare with, never an input."""
    scores = {}
    for path in sorted(atlas.glob("cases_*.csv")):
        with path.open(newline="") as stream:
            for row in csv.DictReader(stream):
                text = row.get("swede_score", "").strip()
                if text.isdigit():  # some cases say why it could not be scored
                    scores[f"iarc-{row['case_id']}"] = float(text)
    return scores


def context(
    features: dict[str, np.ndarray], photos: PhotoTable, cases: CaseTable, atlas: Path
) -> dict[str, object]:
    """Descriptive figures on all cases at once (no fitting, so nothing here is a held-out estimate): the
    Swede score's own ROC-AUC, and each measured feature's, with the direction the Swede score expects."""
    swede = swede_scores(atlas)
    known = np.array([c in swede for c in cases.case])
    measured = candidates(features, photos, cases)["measured"]["measured"]
    single = {}
    for i, name in enumerate(case_severity.CASE_MEASURES):
        ok = ~np.isnan(measured[:, i])
        single[name] = {"roc_auc": metrics.roc_auc(cases.cin2plus[ok], measured[ok, i]), "n": int(ok.sum())}
    return {
        "swede_score_roc_auc": metrics.roc_auc(
            cases.cin2plus[known], np.array([swede[c] for c in cases.case[known]])
        ),
        "swede_score_n": int(known.sum()),
        "single_measure_roc_auc": single,
    }


def main(args: argparse.Namespace) -> dict[str, object]:
    features = load_or_extract(args)
    features["measures"] = served_measures(features["rgb"], features["lesion"])
    photos, cases = tables(features)
    summary: dict[str, object] = {
        "n_photos": len(photos.case),
        "photos_by_stage": {s: int((photos.stage == s).sum()) for s in np.unique(photos.stage)},
        "detector_missed": int((~features["detected"]).sum()),
        "target_sensitivity": args.target_sensitivity,
        "c_grid": list(C_GRID),
    }
    for model, options in candidates(features, photos, cases).items():
        folds = case_severity.nested_case_cv(
            options, cases, C_GRID, target_sensitivity=args.target_sensitivity,
            inner_folds=args.inner_folds, repeats=args.inner_repeats, seed=args.seed,
        )  # fmt: skip
        summary[model] = case_severity.summarise_outer(folds, cases, seed=args.seed)
        summary[f"{model}_held_out"] = {
            "case": [str(c) for f in folds for c in cases.case[f.held_out]],
            "p": [float(p) for f in folds for p in f.probability],
        }
    summary["context"] = context(features, photos, cases, args.atlas)
    missing = candidates(features, photos, cases)["measured"]["measured"]
    summary["measured_missing_cases"] = {
        name: int(np.isnan(missing[:, i]).sum()) for i, name in enumerate(case_severity.CASE_MEASURES)
    }
    engine.write_json(args.output_dir / "metrics.json", summary)
    print(
        json.dumps({k: v for k, v in summary.items() if not k.endswith("_held_out")}, indent=1, default=str)
    )
    return summary
