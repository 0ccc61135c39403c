"""Case-level CIN2+ risk: (a) frozen Lite0 features vs (b) Swede-style measured features, nested over cases.

Every atlas photo of a case (saline, acetic acid, iodine, ...) is cropped the way the service crops it, by
the detector of the outer fold that holds its case out (`--detector-run`, its `fold_heads.npz`), and mapped
by the segmenter's outer-fold model that holds it out (`--segmenter-folds DIR`: DIR/fold<k>/ for the photos
of fold k, default `runs/segmenter/folds`, written by the segmenter's training run), so no held-out map
comes from a model that learned its case's outline. The cases are split into the segmenter's folds
(`catalog.fold_of_subject_for`: AACG with AAHO, one cervix), and a fold model that was trained on a case it
maps is refused. So every photo's crop and lesion map is out of fold, and one feature cache serves every
fit. The shipped (refitted) model is fitted on the maps of the shipped segmenter (`--segmenter-dir`), the
one the service runs; without fold models (`--segmenter-folds none`) that one maps every photo.

The shipped model is (b) (`--ship`, default `measured`): neither beat chance on the atlas (both
intervals include 0.5), and the rule is then to ship the simpler. Its ONNX file is the measures graph
(`training.case_severity.SwedeMeasures`, nothing learned); the fitted logistic regression travels in the
manifest (`extra.case_model`) and the service pools photos with `service.pipeline.case_risk`.

    python -m training train severity --output-dir runs/severity --detector-run runs/detector
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.inference.manifest import InputSpec, Manifest, OutputSpec, read_manifest
from service.inference.preprocess import crop_box, fit, normalize, normalize_batch, prepare
from service.io.decoding import decode_upload
from service.pipeline import case_risk
from service.pipeline.stages import detect_cervix
from training import backbones, case_severity, device_suite, engine, metrics, presets, reports
from training import export as export_step
from training.case_severity import CaseTable, PhotoTable
from training.data import catalog
from training.data.adapters import DEFAULT_ATLAS, iarc_atlas
from training.data.records import ImageRecord
from training.features import FeatureExtractor, TorchOnOnnx, onnx_session
from training.sources import load_all
from training.tasks import common
from training.tasks.detector import fold_detectors

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
DEFAULT_SEGMENTER_FOLDS = "runs/segmenter/folds"  # the segmenter's training run (make models) writes them
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--atlas", type=Path, default=DEFAULT_ATLAS)
    parser.add_argument("--detector-run", type=Path, default=Path("runs/detector"),
                        help="run with fold_heads.npz: each fold's detector crops its cases")  # fmt: skip
    parser.add_argument("--segmenter-dir", type=Path, default=Path("models/segmenter"),
                        help="exported segmenter for the lesion maps of every photo")  # fmt: skip
    parser.add_argument(
        "--segmenter-folds", default=DEFAULT_SEGMENTER_FOLDS,
        help="DIR with the segmenter's outer-fold models fold<k>/: fold k's maps its held-out photos "
        f"(default: {DEFAULT_SEGMENTER_FOLDS} when present; 'none': --segmenter-dir maps every photo, "
        "leaky when that segmenter learned from atlas outlines)",
    )  # fmt: skip
    parser.add_argument("--target-sensitivity", type=float, default=0.9,
                        help="CIN2+ sensitivity on inner out-of-fold predictions")  # fmt: skip
    parser.add_argument("--inner-folds", type=int, default=5)
    parser.add_argument("--inner-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole-frame", action="store_true",
                        help="whole-frame crops, no detector (smoke tests)")  # fmt: skip
    parser.add_argument("--max-cases", type=int, default=0,
                        help="keep this many cases, grades alternating (smoke tests); 0: all")  # fmt: skip
    return parser


# --- photos -> crops, lesion maps, features (once, cached) ------------------------------------------------


@dataclass(frozen=True)
class PhotoCrop:
    rgb: np.ndarray  # 224x224x3 uint8, letterboxed cervix crop
    lesion: np.ndarray  # 224x224 uint8, P(lesion) x 255
    inside: np.ndarray  # 224x224 bool, the crop's own pixels (not the letterbox padding)
    detected: bool  # False: the fold's detector missed and the whole frame was used
    lesion_shipped: np.ndarray | None = None  # the shipped segmenter's map, when another one made `lesion`


class LesionChannel:
    """The segmenter as the service runs it: ONNX Runtime on the manifest's preprocessing."""

    def __init__(self, segmenter_dir: Path) -> None:
        if not (segmenter_dir / "manifest.json").is_file():
            raise FileNotFoundError(
                f"no exported segmenter in {segmenter_dir}: run `python -m training train segmenter` and "
                "`python -m training export segmenter` first (make models does both), or pass --segmenter-dir"
            )
        self.manifest: Manifest = read_manifest(segmenter_dir)  # verifies the sha256
        fold_model = self.manifest.extra.get("fold_model")
        # An outer-fold model names the cases whose outlines it learned (None: not a fold model).
        self.fold: int | None = None if not isinstance(fold_model, dict) else int(fold_model["fold"])
        self.trained_on: frozenset[str] = frozenset(
            fold_model["trained_on_cases"] if isinstance(fold_model, dict) else ()
        )
        self.session = export_step.ort_session(segmenter_dir / "model.onnx")
        severity_spec = presets.INPUT_SPECS[TASK]
        spec = self.manifest.input
        if (spec.width, spec.height, spec.resize) != (
            severity_spec.width,
            severity_spec.height,
            severity_spec.resize,
        ):
            raise ValueError(
                "segmenter and severity inputs must share size and resize rule: the map is used as is"
            )

    def __call__(self, crop_rgb: np.ndarray) -> np.ndarray:
        tensor, _ = prepare(crop_rgb, self.manifest.input)
        (logits,) = self.session.run(["lesion_logits"], {self.manifest.input.name: tensor})
        probability = 1.0 / (1.0 + np.exp(-logits[0, 0]))
        return np.round(probability * 255.0).astype(np.uint8)


def segmenter_folds_dir(args: argparse.Namespace) -> Path | None:
    """`--segmenter-folds` as a folder, or None: 'none', or the default when that run has no fold models."""
    value = str(args.segmenter_folds)
    if value.lower() == "none":
        return None
    if value == DEFAULT_SEGMENTER_FOLDS and not Path(value).is_dir():
        print(
            f"{TASK}: no segmenter fold models in {value}: {args.segmenter_dir} maps every photo, so "
            "held-out maps of outlined cases are not held out (train the segmenter first, or pass "
            "--segmenter-folds)",
            flush=True,
        )
        return None
    return Path(value)


def lesion_source(args: argparse.Namespace, cases_of_fold: dict[int, set[str]]) -> dict[int, LesionChannel]:
    """The segmenter that maps each fold's photos: one per outer fold (`--segmenter-folds`), refused if it
    learned the outline of a case it maps or holds out another fold, else the shipped model for all."""
    folds_dir = segmenter_folds_dir(args)
    if folds_dir is None:
        return dict.fromkeys(cases_of_fold, LesionChannel(args.segmenter_dir))
    lesions = {k: LesionChannel(folds_dir / f"fold{k}") for k in cases_of_fold}
    for k, lesion in lesions.items():
        if lesion.fold != k:
            raise ValueError(f"{folds_dir}/fold{k} is not the segmenter's outer fold {k} model")
        if seen := sorted(cases_of_fold[k] & lesion.trained_on):
            raise ValueError(
                f"{folds_dir}/fold{k} learned the outlines of {seen}, which severity holds out in fold {k}: "
                "the two tasks' folds differ (catalog.fold_of_subject_for)"
            )
    return lesions


def crop_photo(
    rgb: np.ndarray,
    detector: tuple[TorchOnOnnx, float] | None,
    lesion: LesionChannel,
    shipped: LesionChannel | None = None,
) -> PhotoCrop:
    """The service's crop: JPEG as a phone sends it, decoded as served, boxed by the detector, grown by the
    crop margin; a missed cervix falls back to the whole frame (the atlas frames the cervix). `lesion` maps
    it; `shipped`, when another segmenter than that, maps it too (`lesion_shipped`: the final fit's map)."""
    decoded = decode_upload(device_suite.encode_jpeg(rgb), device_suite.SERVED_DECODE)
    width, height = decoded.original_size
    found = detect_cervix(detector[0], decoded, detector[1]).box if detector is not None else None
    box = found or (0.0, 0.0, float(width), float(height))
    region = crop_box(box, width, height, presets.CROP_MARGIN)
    crop_rgb = decoded.region(region, SPEC.width)
    fitted, placement = fit(crop_rgb, SPEC)
    inside = np.zeros(fitted.shape[:2], bool)
    left, top = round(placement.pad_x), round(placement.pad_y)
    inside[top : top + round(crop_rgb.shape[0] * placement.scale_y),
           left : left + round(crop_rgb.shape[1] * placement.scale_x)] = True  # fmt: skip
    return PhotoCrop(
        fitted, lesion(crop_rgb), inside, found is not None, None if shipped is None else shipped(crop_rgb)
    )


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
    records = catalog.task_data(TASK, args.atlas).real  # every staged photo of a graded case
    if args.max_cases:
        keep = few_cases(records, args.max_cases)
        records = [r for r in records if r.subject in keep]
    fold_of = catalog.fold_of_subject_for(TASK, args.atlas)  # the segmenter's folds
    # Each model's held-out output comes from its own fold that held the case out: the detector's folds
    # keep AACG in fold 2 (AAHO's is 3), so its crop comes from a detector that never saw it.
    detector_fold_of = catalog.fold_of_subject_for("detector", args.atlas)
    images = load_all(records, desc="atlas")
    cases_of_fold: dict[int, set[str]] = {}
    for record in records:
        cases_of_fold.setdefault(fold_of[record.subject], set()).add(record.subject)
    detector_folds = sorted({detector_fold_of[r.subject] for r in records})
    detectors: dict[int, tuple[TorchOnOnnx, float] | None] = dict.fromkeys(detector_folds)
    if not args.whole_frame:
        detectors = {
            k: (TorchOnOnnx(model, presets.INPUT_SPECS["detector"], ("cervix_logit", "box")), t)
            for k, (model, t) in fold_detectors(args.detector_run).items()
        }
        if missing := set(detector_folds) - set(detectors):
            raise ValueError(f"{args.detector_run} has no detector for fold(s) {sorted(missing)}")
    lesions = lesion_source(args, dict(sorted(cases_of_fold.items())))
    shipped = LesionChannel(args.segmenter_dir)
    per_fold = any(lesion.fold is not None for lesion in lesions.values())
    crops = []
    for record, image in tqdm(zip(records, images, strict=True), total=len(records), desc="crops"):
        fold = fold_of[record.subject]
        detector = detectors[detector_fold_of[record.subject]]
        crops.append(crop_photo(image.image, detector, lesions[fold], shipped if per_fold else None))
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
        # which segmenter made each photo's held-out map, and the shipped one's map for the final fit
        "segmenter_sha256": np.array([lesions[fold_of[r.subject]].manifest.sha256 for r in records]),
        "shipped_segmenter_sha256": np.array(shipped.manifest.sha256),
    }
    if per_fold:
        out["lesion_shipped"] = np.stack([c.lesion_shipped for c in crops])  # type: ignore[misc]
    return out


def few_cases(records: list[ImageRecord], count: int) -> set[str]:
    """`count` cases taken from each grade in turn, so a small run still has both classes."""
    by_grade: dict[bool, list[str]] = {True: [], False: []}
    for record in records:
        grade = record.labels.severity.is_cin2plus  # type: ignore[union-attr]
        if record.subject not in by_grade[grade]:
            by_grade[grade].append(record.subject)
    mixed = [c for pair in zip(by_grade[False], by_grade[True], strict=False) for c in pair]
    return set(mixed[:count])


def load_or_extract(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The feature cache of an earlier run, if the same segmenters made its lesion maps; else made anew."""
    path = args.output_dir / CACHE
    if path.is_file():
        with np.load(path) as data:
            cached = {k: data[k] for k in data.files}
        if same_segmenters(cached, args):
            return cached
        print(f"{TASK}: {path} was mapped by other segmenters than these: made anew", flush=True)
    features = extract(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **features)  # type: ignore[arg-type]
    return features


def same_segmenters(cached: dict[str, np.ndarray], args: argparse.Namespace) -> bool:
    """Whether the cached maps come from the segmenters this run would use (the manifests' sha256s)."""
    if "segmenter_sha256" not in cached:  # a cache from before the maps' provenance was kept
        return False
    shipped = read_manifest(args.segmenter_dir).sha256
    folds_dir = segmenter_folds_dir(args)
    expected = {
        int(k): shipped if folds_dir is None else read_manifest(folds_dir / f"fold{int(k)}").sha256
        for k in np.unique(cached["fold"])
    }
    return str(cached["shipped_segmenter_sha256"]) == shipped and all(
        sha == expected[int(k)] for sha, k in zip(cached["segmenter_sha256"], cached["fold"], strict=True)
    )


# --- the comparison ---------------------------------------------------------------------------------------


def tables(features: dict[str, np.ndarray]) -> tuple[PhotoTable, CaseTable]:
    """Photos, and the cases that can be scored (at least one acetic-acid photo: the exam endpoint's rule)."""
    photos = PhotoTable(features["case"], features["stage"], features["fold"], features["cin2plus"])
    cases = sorted(set(photos.case[photos.stage == case_risk.ACETIC].tolist()))
    return photos, case_severity.case_table(photos, cases)


def candidates(
    features: dict[str, np.ndarray], photos: PhotoTable, cases: CaseTable
) -> dict[str, dict[str, np.ndarray]]:
    names = list(cases.case)
    gap, _ = case_severity.pool_stage(features["deep_gap"], photos, names, case_risk.ACETIC)
    lesion, _ = case_severity.pool_stage(features["deep_lesion"], photos, names, case_risk.ACETIC)
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


def lesion_maps(features: dict[str, np.ndarray]) -> dict[str, object]:
    """Which segmenter mapped which fold's photos (held-out figures) and which one the final fit's photos."""
    by_fold = {
        f"fold{int(k)}": sorted(set(features["segmenter_sha256"][features["fold"] == k].tolist()))
        for k in np.unique(features["fold"])
    }
    per_fold = "lesion_shipped" in features
    return {
        "held_out": "each fold's photos mapped by the segmenter's outer-fold model that held the fold out "
        "(--segmenter-folds)"
        if per_fold
        else "one segmenter for every photo (--segmenter-dir): held-out maps of cases it learned from are "
        "not held out",
        "segmenter_sha256_by_fold": by_fold,
        "final_fit": "the shipped segmenter's maps (--segmenter-dir), as the service computes them",
        "shipped_segmenter_sha256": str(features["shipped_segmenter_sha256"]),
    }


def main(args: argparse.Namespace) -> dict[str, object]:
    features = load_or_extract(args)
    shipped_sha256 = str(features["shipped_segmenter_sha256"])
    features["measures"] = served_measures(features["rgb"], features["lesion"])
    # The final fit measures every photo on the shipped segmenter's map: the one the service runs.
    shipped_measures = (
        served_measures(features["rgb"], features["lesion_shipped"])
        if "lesion_shipped" in features
        else features["measures"]
    )
    photos, cases = tables(features)
    summary: dict[str, object] = {
        "real_split": common.split_family(
            catalog.real_folds(iarc_atlas(args.atlas), catalog.fold_of_subject_for(TASK, args.atlas))
        ),
        "real_split_note": "the fixed real folds, except that AACG (one cervix with AAHO) joins AAHO's "
        "fold, as in the segmenter's (catalog.fold_of_subject_for)",
        "lesion_maps": lesion_maps(features),
        "n_photos": len(photos.case),
        "photos_by_stage": {s: int((photos.stage == s).sum()) for s in np.unique(photos.stage)},
        "crops": "whole frame" if args.whole_frame else "each outer fold's detector",
        "detector_missed": int((~features["detected"]).sum()),
        "target_sensitivity": args.target_sensitivity,
        "c_grid": list(C_GRID),
    }
    options = candidates(features, photos, cases)
    held_out = []
    for model, sets in options.items():
        folds = case_severity.nested_case_cv(
            sets, cases, C_GRID, target_sensitivity=args.target_sensitivity,
            inner_folds=args.inner_folds, repeats=args.inner_repeats, seed=args.seed,
        )  # fmt: skip
        summary[model] = case_severity.summarise_outer(folds, cases, seed=args.seed)
        held_out.append(held_out_rows(model, folds, cases))
    summary["context"] = context(features, photos, cases, args.atlas)
    measured = case_severity.measured_case_features(shipped_measures, photos, list(cases.case))
    summary["measured_missing_cases"] = {
        name: int(np.isnan(measured[:, i]).sum()) for i, name in enumerate(case_risk.CASE_FEATURES)
    }
    final, summary["shipped"] = fit_final(measured, cases, args)
    summary["threshold"] = final["threshold"]
    engine.save_checkpoint(
        args.output_dir / "model.pth",
        case_severity.SwedeMeasures(),
        args,
        command=getattr(args, "command", "python -m training train severity"),
        segmenter_sha256=shipped_sha256,
        case_model=final,
    )
    common.save_predictions(args.output_dir, held_out=held_out)
    engine.write_json(args.output_dir / "metrics.json", summary)
    return summary


def held_out_rows(
    model: str, folds: list[case_severity.OuterFold], cases: CaseTable
) -> dict[str, np.ndarray]:
    index = np.concatenate([f.held_out for f in folds])
    return {
        "model": np.full(len(index), model),
        "case": cases.case[index],
        "fold": cases.fold[index],
        "cin2plus": cases.cin2plus[index],
        "p": np.concatenate([f.probability for f in folds]),
        "called": np.concatenate([f.probability >= f.threshold for f in folds]),
    }


def fit_final(
    x: np.ndarray, cases: CaseTable, args: argparse.Namespace
) -> tuple[dict[str, object], dict[str, object]]:
    """The shipped (b) model on every case: C and the threshold chosen by the same inner CV the outer folds
    used, then the pipeline folded into median imputation + one weight vector and bias (what the manifest
    carries and `service.pipeline.case_risk.CaseModel` applies)."""
    choice, p_inner = case_severity.choose(
        {"measured": x}, cases.cin2plus, C_GRID, folds=args.inner_folds, repeats=args.inner_repeats,
        seed=args.seed,
    )  # fmt: skip
    threshold = metrics.threshold_for_sensitivity(cases.cin2plus, p_inner, args.target_sensitivity)
    pipeline = case_severity.logistic(choice.c).fit(x, cases.cin2plus)
    imputer, scaler, model = (step for _, step in pipeline.steps)
    weight = model.coef_[0] / scaler.scale_
    bias = float(model.intercept_[0] - weight @ scaler.mean_)
    case_model = {
        "features": list(case_risk.CASE_FEATURES),
        "photo_measures": list(case_risk.PHOTO_MEASURES),
        "impute": [float(v) for v in imputer.statistics_],
        "weight": [float(v) for v in weight],
        "bias": bias,
        "threshold": float(threshold),
        "c": choice.c,
    }
    shipped = {"model": "measured", "c": choice.c, "inner_auc": choice.inner_auc, "n_cases": len(cases.case)}
    return case_model, shipped


get_step_parser = partial(common.get_step_parser, version="2.1.0")

OUTPUTS = (
    OutputSpec(
        name="measures",
        shape=("batch", len(case_risk.PHOTO_MEASURES)),
        description="per-photo measures (extra.case_model.photo_measures order); nan: undefined here",
    ),
)


def report(args: argparse.Namespace) -> dict[str, Path]:
    run_dir: Path = args.run_dir
    summary = json.loads((run_dir / "metrics.json").read_text())
    held_out = common.load_predictions(run_dir)["held_out"]
    figures: dict[str, reports.FigureSpec] = {}
    for model in ("deep", "measured"):
        rows = held_out["model"] == model
        figures[f"roc_{model}_held_out_cases"] = partial(
            reports.plot_roc, held_out["cin2plus"][rows], held_out["p"][rows],
            float(np.median(summary[model]["thresholds"])),
            title=f"CIN2+ per held-out atlas case: {model} (median of the folds' thresholds marked)",
        )  # fmt: skip
    return reports.write_report(
        run_dir / "report",
        "Severity: CIN2+ per case",
        summary,
        split="real-gkf5-s0 (outer) / inner stratified 5-fold x3 over each outer fold's training cases",
        figures=figures,
        notes=(
            "Case-level: one prediction per atlas case (patient), histology HSIL = CIN2+, LSIL = not.",
            "deep: frozen ImageNet Lite0 features of each acetic-acid crop, mean over the case's acetic-acid "
            "photos, L2 logistic regression. measured: Swede-style measures, logistic regression (shipped).",
            "Neither interval excludes 0.5: on 44 cases neither model is shown to beat chance.",
        ),
    )


def export(args: argparse.Namespace) -> export_step.ExportResult:
    return common.export_task(args, TASK, case_severity.SwedeMeasures, describe, parity_input)


def parity_input(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A crop with a lesion channel that has a border (bright pixels), so every measure is defined."""
    fitted, _ = fit(rgb, spec)
    lesion = (fitted.mean(axis=2) > 110).astype(np.uint8) * 255
    return normalize(np.dstack([fitted, lesion]), spec)


def describe(summary: dict, checkpoint: dict) -> common.TaskDescription:
    case_model = dict(checkpoint["case_model"])
    threshold = float(case_model.pop("threshold"))
    return common.TaskDescription(
        outputs=OUTPUTS,
        thresholds={"cin2plus": threshold},
        extra={
            "case_model": case_model,
            "combine": (
                "service.pipeline.case_risk: per exam stage (acetic, saline, iodine) the mean of its usable "
                "photos' measures; case features from those means (missing stage -> impute); "
                "P(CIN2+) = sigmoid(weight . features + bias); refer when P >= thresholds.cin2plus"
            ),
            "lesion_channel": "the segmenter's sigmoid x 255 on the same letterboxed crop, as uint8 "
            "(saline and iodine photos: any; their measures do not read it)",
            "segmenter_sha256": checkpoint.get("segmenter_sha256"),
            "crop_margin": presets.CROP_MARGIN,
        },
        intended_use=(
            "Research reference for a patient's CIN2+ risk from an exam's photos, read beside a trained "
            "health worker's own assessment. Not a medical device; not shown to beat chance on the atlas."
        ),
        limitations=(
            "44 atlas cases (32 HSIL, 12 LSIL, no normals): held-out case ROC-AUC is not distinguishable "
            "from 0.5 (see metrics), so it must not drive a referral on its own. Shipped because it is the "
            "simpler of two candidates that both failed to beat chance. The held-out figures read each "
            "photo's lesion map from the segmenter's outer-fold model that held its case out (metrics."
            "lesion_maps), so none comes from a model that learned its case's outline; the shipped fit reads "
            "the shipped segmenter's maps, which learned from clinician outlines of 65 photos of 27 of these "
            "cases (for those its training maps are closer to the outlines than a new patient's will be)."
        ),
        changelog=[
            "1.0.0: per-photo 4-channel CNN from scratch with test-time voting.",
            "2.0.0: case level. The ONNX model measures each photo (Swede-style measures, nothing "
            "learned); a logistic regression on cases combines an exam's acetic-acid, saline and iodine "
            "photos. The per-photo CNN and voting are retired.",
            "2.1.0: the case model refitted on the lesion maps of segmenter 2.0.0 (learned from real "
            "clinician outlines); acetowhite density and margin only for a lesion of at least 1 % of the "
            "tissue (a pixel count made them jump with the photo's resolution); threshold re-chosen by the "
            "same nested rule. Its held-out figures since re-measured leak-free (issue #14): each photo's "
            "lesion map from the segmenter's outer-fold model that held its case out, AACG held out with "
            "AAHO (one cervix) as the segmenter does; the model, threshold and ONNX file are unchanged.",
        ],
    )
