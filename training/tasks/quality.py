"""Quality model: cervix crop -> P(sharp), blur kind (none/defocus/motion), exam stage.

Sources: atlas photos (marks inpainted) and synthetic subjects at every exam stage, degraded at
source resolution by the physical degradation model, then cropped. Degraded crops are made once
per run into pools (`--train-variants` per training source, `--eval-variants` per held-out source,
fixed seeds) because degradation costs more than a training step. Real figures come from the
fixed grouped 5-fold over atlas cases, side by side with the classical focus measures on the very
same crops.

    python -m training train quality --output-dir runs/quality
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from service.manifest import OutputSpec
from training import engine, metrics, presets, reports
from training import export as export_step
from training.data.degrade import BLUR_KINDS
from training.data.records import EXAM_STAGES, LabelledImage
from training.focus_measures import FOCUS_MEASURES
from training.models import QualityNet
from training.sources import parallel_map, synthetic_subjects
from training.tasks import common

TASK = "quality"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    common.add_common_arguments(parser, epochs=3, batch_size=32, lr=3e-3, pretrain_epochs=6)
    parser.add_argument("--train-variants", type=int, default=3, help="degraded crops per real photo")
    parser.add_argument(
        "--synthetic-variants", type=int, default=1, help="degraded crops per synthetic photo"
    )
    parser.add_argument("--eval-variants", type=int, default=4, help="degraded crops per held-out real photo")
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.98,
        help="operating point: sensitivity for 'not sharp' on held-out real folds",
    )
    parser.add_argument(
        "--balanced-sensitivity",
        type=float,
        default=0.95,
        help="second operating point, the service's default: at 0.98 most sharp photos are sent back",
    )
    parser.add_argument(
        "--max-acetic-recapture",
        type=float,
        default=0.10,
        help="not-acetic threshold: at most this share of held-out acetic-acid crops is called not acetic",
    )
    return parser


def loss_fn(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each head learns only where its label is known (ambiguous blur, unknown stage are skipped)."""
    sharp = batch["sharp"].float()
    known = ~torch.isnan(sharp)
    loss = outputs["sharp_logit"].sum() * 0.0  # keeps the graph when a batch has no known labels
    if known.any():
        loss = loss + F.binary_cross_entropy_with_logits(outputs["sharp_logit"][known, 0], sharp[known])
    kind = batch["blur_kind"].long()
    if (kind >= 0).any():
        loss = loss + F.cross_entropy(outputs["blur_kind_logits"][kind >= 0], kind[kind >= 0])
    stage = batch["stage"].long()
    if (stage >= 0).any():
        loss = loss + 0.5 * F.cross_entropy(outputs["stage_logits"][stage >= 0], stage[stage >= 0])
    return loss


def make_pool(
    images: list[LabelledImage], variants: int, *, train: bool, seed: int, desc: str
) -> list[presets.QualityCrop]:
    """`variants` degraded crops per image, reproducible from (seed, image index, variant)."""
    jobs = [(index, variant, image) for index, image in enumerate(images) for variant in range(variants)]
    return parallel_map(partial(_pool_item, train=train, seed=seed), jobs, desc)


def _pool_item(job: tuple[int, int, LabelledImage], *, train: bool, seed: int) -> presets.QualityCrop:
    index, variant, image = job
    rng = np.random.default_rng((seed, index, variant, int(train)))
    return presets.quality_crop(image, rng, train=train)


def evaluate(model: torch.nn.Module, pool: list[presets.QualityCrop], args: argparse.Namespace) -> dict:
    """Predictions, targets and the classical focus measures on the same held-out crops."""
    dataset = engine.SampleDataset(pool, lambda item, _rng: presets.quality_sample(item, None), args.seed)
    out = engine.predict(
        model, engine.loader(dataset, args.batch_size, shuffle=False, seed=args.seed, workers=0)
    )
    out["p_sharp"] = 1.0 / (1.0 + np.exp(-out["sharp_logit"][:, 0]))
    out["blur_extent"] = np.array([c.blur_extent for c in pool])
    for name, measure in FOCUS_MEASURES.items():
        out[f"focus_{name}"] = np.array([measure(c.fitted) for c in pool])
    return out


def new_model() -> QualityNet:
    return QualityNet(len(BLUR_KINDS), len(EXAM_STAGES))


def fit(
    pool: list[presets.QualityCrop],
    args: argparse.Namespace,
    base: QualityNet | None = None,
    *,
    pretraining: bool = False,
) -> QualityNet:
    """Synthetic pretraining (`pretraining=True`), or a fit on real crops starting from `base`."""
    dataset = engine.SampleDataset(pool, presets.quality_sample, args.seed)
    return common.fit_stage(new_model, base, dataset, loss_fn, args, TASK, pretraining=pretraining)


def main(args: argparse.Namespace) -> dict[str, object]:
    common.configure_torch(args)
    real = common.real_data(TASK, args)
    count, synthetic_split = common.synthetic_split(TASK, args)
    synthetic = synthetic_subjects(0, count, EXAM_STAGES)
    per_subject = len(EXAM_STAGES)
    synthetic_train = [
        synthetic[i * per_subject + s] for i in synthetic_split.train for s in range(per_subject)
    ]
    synthetic_test = [
        synthetic[i * per_subject + s] for i in synthetic_split.test for s in range(per_subject)
    ]

    real_train_pool = make_pool(
        real.images, args.train_variants, train=True, seed=args.seed, desc="real pool"
    )
    real_eval_pool = make_pool(
        real.images, args.eval_variants, train=False, seed=args.seed, desc="held-out pool"
    )
    synthetic_pool = make_pool(
        synthetic_train, args.synthetic_variants, train=True, seed=args.seed, desc="synth pool"
    )
    # Pretraining sees synthetic subjects only, so every real fold may start from it.
    base = fit(synthetic_pool, args, pretraining=True) if args.pretrain_epochs else None

    def with_replay(real_crops: list[presets.QualityCrop]) -> list[presets.QualityCrop]:
        return real_crops + common.replay(synthetic_pool, args.replay, len(real_crops), args.seed)

    def real_items(pool: list[presets.QualityCrop], indices: tuple[int, ...], variants: int) -> list:
        return [pool[i * variants + v] for i in indices for v in range(variants)]

    held_out = []
    for fold in common.folds_to_run(args, len(real.folds)):
        split = real.folds[fold]
        model = fit(with_replay(real_items(real_train_pool, split.train, args.train_variants)), args, base)
        out = evaluate(model, real_items(real_eval_pool, split.val, args.eval_variants), args)
        out["fold"] = np.full(len(out["p_sharp"]), fold)
        held_out.append(out)

    model = fit(with_replay(real_train_pool), args, base)
    synthetic_eval = evaluate(
        model,
        make_pool(synthetic_test, args.synthetic_variants, train=False, seed=args.seed, desc="synth test"),
        args,
    )
    engine.save_checkpoint(args.output_dir / "model.pth", model, args, command=common.command_line(args))
    common.save_predictions(args.output_dir, held_out=held_out, synthetic_test=synthetic_eval)
    summary = summarise(
        held_out,
        synthetic_eval,
        args,
        real_split=common.split_family(real.folds),
        synthetic_split=synthetic_split.name,
    )
    engine.write_json(args.output_dir / "metrics.json", summary)
    return summary


def _gate_metrics(out: dict[str, np.ndarray], score: np.ndarray, threshold: float) -> dict:
    """Metrics of the gate with "not sharp" as the positive class, on samples with a definite label."""
    known = ~np.isnan(out["sharp"])
    return metrics.binary_metrics(
        1 - out["sharp"][known], score[known], threshold, positive_class="not sharp"
    )


def summarise(
    held_out: list[dict[str, np.ndarray]],
    synthetic_eval: dict[str, np.ndarray],
    args: argparse.Namespace,
    *,
    real_split: str,
    synthetic_split: str,
) -> dict[str, object]:
    """The CNN gate and each classical focus measure, thresholds chosen by one rule on the same data."""
    summary: dict[str, object] = {"real_split": real_split, "synthetic_split": synthetic_split}
    scores = {"cnn": lambda o: 1.0 - o["p_sharp"]} | {
        name: (lambda o, n=name: -np.log1p(o[f"focus_{n}"])) for name in FOCUS_MEASURES
    }  # every score: higher = more likely not sharp
    if held_out:
        pooled = {k: np.concatenate([h[k] for h in held_out]) for k in held_out[0]}
        known = ~np.isnan(pooled["sharp"])
        for name, score_of in scores.items():
            threshold = metrics.threshold_for_sensitivity(
                1 - pooled["sharp"][known], score_of(pooled)[known], args.target_sensitivity
            )
            summary[f"{name}_threshold"] = threshold
            summary[f"{name}_real_held_out"] = metrics.mean_sd_over_folds(
                [_gate_metrics(h, score_of(h), threshold) for h in held_out]
            )
            summary[f"{name}_real_pooled"] = _gate_metrics(pooled, score_of(pooled), threshold)
        summary["threshold_rule"] = (
            f"highest 'not sharp' score threshold with sensitivity >= {args.target_sensitivity} "
            "on the pooled held-out real folds (the same rule for the CNN and each classical measure)"
        )
        balanced = metrics.threshold_for_sensitivity(
            1 - pooled["sharp"][known], scores["cnn"](pooled)[known], args.balanced_sensitivity
        )
        summary["cnn_threshold_balanced"] = balanced
        summary["cnn_real_held_out_balanced"] = metrics.mean_sd_over_folds(
            [_gate_metrics(h, scores["cnn"](h), balanced) for h in held_out]
        )
        summary["cnn_real_pooled_balanced"] = _gate_metrics(pooled, scores["cnn"](pooled), balanced)
        summary["threshold_rule_balanced"] = (
            f"highest 'not sharp' score threshold with sensitivity >= {args.balanced_sensitivity} "
            "on the pooled held-out real folds"
        )
        summary.update(_not_acetic_summary(pooled, args.max_acetic_recapture))
        summary["blur_kind_real_held_out"] = _blur_kind_metrics(pooled)
        summary["exam_stage_real_held_out"] = metrics.multiclass_metrics(
            pooled["stage"][pooled["stage"] >= 0],
            _softmax(pooled["stage_logits"][pooled["stage"] >= 0]),
            list(EXAM_STAGES),
        )
    threshold = float(summary.get("cnn_threshold", 0.5))  # type: ignore[arg-type]
    if (~np.isnan(synthetic_eval["sharp"])).any():  # tiny smoke runs may hold out only ambiguous blur
        summary["cnn_synthetic_test"] = _gate_metrics(
            synthetic_eval, 1.0 - synthetic_eval["p_sharp"], threshold
        )
    return summary


def _not_acetic_summary(pooled: dict[str, np.ndarray], max_acetic_recapture: float) -> dict[str, object]:
    """Threshold on P(acetic) below which a crop is called "not acetic", and what it does per stage.

    Saline and acetic-acid photos look alike to this head (68 % stage accuracy), so an argmax rule would
    send back a third of good acetic-acid photos; a threshold bounded on the acetic ones keeps that rare
    while iodine and green-filter photos, which the head separates well, are still caught.
    """
    labelled = pooled["stage"] >= 0
    p_acetic = _softmax(pooled["stage_logits"][labelled])[:, EXAM_STAGES.index("acetic")]
    stage = pooled["stage"][labelled]
    acetic = np.sort(p_acetic[stage == EXAM_STAGES.index("acetic")])
    if acetic.size == 0:
        return {}
    # Calling "not acetic" when P(acetic) < t: t = the k-th lowest acetic score flags fewer than k of them.
    allowed = int(np.floor(max_acetic_recapture * acetic.size))
    threshold = float(acetic[min(allowed, acetic.size - 1)])
    flagged = {
        name: float(np.mean(p_acetic[stage == index] < threshold))
        for index, name in enumerate(EXAM_STAGES)
        if np.any(stage == index)
    }
    return {
        "not_acetic_threshold": threshold,
        "not_acetic_flagged_real_pooled": flagged,
        "not_acetic_rule": (
            f"not acetic when P(acetic) < threshold; the highest threshold that calls at most "
            f"{max_acetic_recapture:.0%} of pooled held-out acetic-acid crops not acetic"
        ),
    }


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _blur_kind_metrics(out: dict[str, np.ndarray]) -> dict:
    """Defocus vs motion on the not-sharp samples: the advice given depends on it."""
    blurred = out["blur_kind"] > 0
    probabilities = _softmax(out["blur_kind_logits"][blurred][:, 1:])
    return metrics.multiclass_metrics(out["blur_kind"][blurred] - 1, probabilities, list(BLUR_KINDS[1:]))


CHANGELOG = (
    "1.0.0: first release.",
    "1.1.0: same network; adds the balanced focus operating point (not_sharp_balanced) and the "
    "not_acetic threshold, both chosen on held-out real folds.",
    "1.1.1: same network and thresholds; the manifest now records what the exposure and glare thresholds "
    "are measured over (extra.exposure_measure), and the service reads it from there.",
)
get_step_parser = partial(common.get_step_parser, version=CHANGELOG[-1].split(":")[0])

OUTPUTS = (
    OutputSpec(name="sharp_logit", shape=("batch", 1), description="logit of P(sharp enough to assess)"),
    OutputSpec(
        name="blur_kind_logits", shape=("batch", len(BLUR_KINDS)), description="none, defocus, motion"
    ),
    OutputSpec(name="stage_logits", shape=("batch", len(EXAM_STAGES)), description="exam stage"),
)


def report(args: argparse.Namespace) -> dict[str, Path]:
    run_dir: Path = args.run_dir
    summary = json.loads((run_dir / "metrics.json").read_text())
    predictions = common.load_predictions(run_dir)
    figures: dict[str, reports.FigureSpec] = {}
    real = predictions.get("held_out")
    if real is not None:
        known = ~np.isnan(real["sharp"])
        not_sharp, score = 1 - real["sharp"][known], 1 - real["p_sharp"][known]
        if len(np.unique(not_sharp)) == 2:
            figures["roc_not_sharp_real_held_out"] = partial(
                reports.plot_roc, not_sharp, score, summary["cnn_threshold"], title="Not sharp, held-out real"
            )
            figures["calibration_not_sharp"] = partial(
                reports.plot_calibration,
                metrics.calibration(not_sharp, score),
                title="Calibration (not sharp)",
            )
        figures["confusion_not_sharp"] = partial(
            reports.plot_confusion,
            summary["cnn_real_pooled"]["confusion_matrix"],
            ["sharp", "not sharp"],
            title="Focus gate, held-out real",
        )
        figures["confusion_exam_stage"] = partial(
            reports.plot_confusion,
            summary["exam_stage_real_held_out"]["confusion_matrix"],
            list(EXAM_STAGES),
            title="Exam stage, held-out real",
        )
        figures["focus_vs_blur"] = partial(_plot_focus_vs_blur, real)
    figures["examples_synthetic_test"] = partial(_plot_examples, run_dir)
    return reports.write_report(
        run_dir / "report",
        "Quality model",
        summary,
        split=summary.get("real_split", "synthetic"),
        figures=figures,
        notes=(
            "Real figures: degraded copies of held-out atlas cases (grouped 5-fold); 'not sharp' is "
            "the positive class. Classical focus measures are scored on the very same crops.",
        ),
    )


def _plot_examples(run_dir: Path, path: Path) -> Path:
    """The final model on degraded photos of held-out synthetic subjects (it never saw them)."""
    model, checkpoint = common.load_final(run_dir, new_model)
    args = argparse.Namespace(**checkpoint["args"])
    _, split = common.synthetic_split(TASK, args)
    photos = [
        synthetic_subjects(seed, 1, (EXAM_STAGES[seed % len(EXAM_STAGES)],))[0] for seed in split.test[:12]
    ]
    pool = [_pool_item((i, 0, photo), train=False, seed=args.seed + 1) for i, photo in enumerate(photos)]
    out = evaluate(model, pool, args)
    captions = []
    for i, item in enumerate(pool):
        truth = (
            "ambiguous" if np.isnan(item.sharp) else ("sharp" if item.sharp else BLUR_KINDS[item.blur_kind])
        )
        stage = EXAM_STAGES[int(np.argmax(out["stage_logits"][i]))]
        captions.append(f"P(sharp) {out['p_sharp'][i]:.2f}, truth {truth}; stage {stage}")
    return reports.plot_examples([item.fitted for item in pool], captions, path)


def _plot_focus_vs_blur(real: dict[str, np.ndarray], path: Path) -> Path:
    """Median P(sharp) and normalised classical measures per blur-extent bin on held-out real crops."""
    edges = np.array([0, 0.001, 0.0025, 0.004, 0.005, 0.0075, 0.01, 0.02, 1.0])
    bins = np.digitize(real["blur_extent"], edges) - 1
    centres = [float((edges[i] + min(edges[i + 1], 0.03)) / 2) for i in range(len(edges) - 1)]
    curves: dict[str, list] = {"CNN P(sharp)": []}
    curves |= {name: [] for name in FOCUS_MEASURES}
    for b in range(len(centres)):
        chosen = bins == b
        curves["CNN P(sharp)"].append(float(np.median(real["p_sharp"][chosen])) if chosen.any() else None)
        for name in FOCUS_MEASURES:
            values = real[f"focus_{name}"]
            scale = np.median(values[real["blur_extent"] <= 0.001]) or 1.0
            curves[name].append(float(np.median(values[chosen]) / scale) if chosen.any() else None)
    return reports.plot_metric_curve(
        centres,
        curves,
        path,
        "Focus scores vs blur (held-out real)",
        "blur extent (PSF radius / short side)",
        "median score (relative)",
    )


def export(args: argparse.Namespace) -> export_step.ExportResult:
    return common.export_task(args, TASK, new_model, describe)


def describe(summary: dict, checkpoint: dict) -> common.TaskDescription:
    from service import measures

    return common.TaskDescription(
        outputs=OUTPUTS,
        labels={"blur_kind_logits": list(BLUR_KINDS), "stage_logits": list(EXAM_STAGES)},
        thresholds={
            "not_sharp": float(summary.get("cnn_threshold", 0.5)),  # on 1 - P(sharp)
            "not_sharp_balanced": float(summary.get("cnn_threshold_balanced", 0.5)),
            "not_acetic": float(summary.get("not_acetic_threshold", 0.0)),  # on P(acetic)
            "dark_max": measures.DARK_MAX,
            "over_min": measures.OVER_MIN,
            "white_luma": measures.WHITE_LUMA,
            "over_white_max": measures.OVER_WHITE_MAX,
            "glare_max": measures.GLARE_MAX,
        },
        extra={
            "crop_margin": presets.CROP_MARGIN,
            "exposure_measure": {
                "tissue_semi_axes": list(measures.TISSUE_SEMI_AXES),
                "saturated_level": measures.SATURATED_LEVEL,
                "rule": "service.measures: Rec. 601 luma and clipped-white fraction of the central ellipse "
                "(semi-axes as fractions of the crop's W, H); a pixel is clipped when every channel >= "
                "saturated_level",
            },
            "not_sharp_score": (
                "1 - sigmoid(sharp_logit); not sharp when >= thresholds.not_sharp (high-sensitivity "
                "operating point) or thresholds.not_sharp_balanced (the service's default)"
            ),
            "not_acetic_score": "softmax(stage_logits)[acetic]; not acetic when < thresholds.not_acetic",
        },
        intended_use=(
            "Decide at capture time whether a cervix crop is sharp enough to assess, whether "
            "blur is defocus or motion (the advice differs), and the exam stage."
        ),
        limitations=(
            "Blur is learned from simulated degradations of 45 atlas cases and synthetic "
            "scenes; real field blur, unusual devices or lighting may differ. Exposure and glare "
            "use the classical measures whose thresholds are listed here."
        ),
        changelog=list(CHANGELOG),
    )
