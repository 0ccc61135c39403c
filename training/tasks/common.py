"""Argument groups and run plumbing shared by the four task scripts."""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from service.inference.manifest import InputSpec, OutputSpec
from service.inference.preprocess import prepare
from training import engine, presets
from training import export as export_step
from training.data import catalog
from training.data.adapters import DEFAULT_ATLAS
from training.data.records import ImageRecord, LabelledImage
from training.data.splits import Split, holdout

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """What every task takes: where the data is and which of it, where results go, seeds and threads."""
    parser.add_argument("--atlas", type=Path, default=DEFAULT_ATLAS, help="IARC atlas folder")
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints, predictions, reports")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic-subjects", type=int, default=None, help="default: training.data.catalog")
    parser.add_argument("--folds", type=int, nargs="*", default=None,
                        help="real-data CV folds to run (default: all); pass none to skip CV")  # fmt: skip
    parser.add_argument(
        "--max-real", type=int, default=0, help="use at most this many real images (smoke runs)"
    )


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    pretrain_epochs: int = 0,
    finetune_lr: float | None = None,
) -> None:
    """The data arguments plus those of the shared training loop (tasks that train a network end to end)."""
    add_data_arguments(parser)
    parser.add_argument(
        "--epochs", type=int, default=epochs, help="epochs on real data (after synthetic pretraining)"
    )
    parser.add_argument(
        "--pretrain-epochs", type=int, default=pretrain_epochs,
        help="epochs of the synthetic-only pretraining that every fold starts from (0: none)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (pretraining or only fit)")
    parser.add_argument(
        "--finetune-lr", type=float, default=finetune_lr or lr / 3,
        help="peak learning rate when fine-tuning the pretrained model on real data",
    )  # fmt: skip
    parser.add_argument(
        "--replay", type=float, default=1.0, help="synthetic samples mixed into fine-tuning, per real sample"
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")


def command_line(args: argparse.Namespace) -> str:
    """The exact command that ran, for the manifest and checkpoint (set by `python -m training`)."""
    command = getattr(args, "command", None)
    if command:
        return str(command)
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "training", *sys.argv[1:]])


def configure_torch(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


@dataclass(frozen=True)
class RealData:
    records: list[ImageRecord]
    images: list[LabelledImage]
    folds: list[Split]

    def fold_of(self, index: int) -> int:
        """The fold that holds out image `index`."""
        return next(k for k, split in enumerate(self.folds) if index in split.val)


def real_data(task: str, args: argparse.Namespace) -> RealData:
    """The task's real images with the fixed real folds (see training.data.catalog)."""
    from training.sources import load_all

    records = catalog.task_data(task, args.atlas).real
    if args.max_real:
        keep = np.random.default_rng(args.seed).permutation(len(records))[: args.max_real]
        records = [records[i] for i in sorted(keep)]
    folds = catalog.real_folds(records, catalog.fold_of_subject_for(task, args.atlas))
    return RealData(records, load_all(records, desc=f"{task}: real"), folds)


def synthetic_split(task: str, args: argparse.Namespace) -> tuple[int, Split]:
    """How many synthetic subjects the task uses and their subject-level train/val/test split."""
    count = args.synthetic_subjects or catalog.SYNTHETIC_SUBJECTS[task]
    subjects = [f"synthetic-{seed}" for seed in range(count)]
    return count, holdout(subjects, seed=catalog.SPLIT_SEED, dataset="synthetic")


def folds_to_run(args: argparse.Namespace, n_folds: int) -> list[int]:
    return list(range(n_folds)) if args.folds is None else list(args.folds)


def replay(items: Sequence[T], per_real: float, n_real: int, seed: int) -> list[T]:
    """A fixed random subset of the synthetic training items, mixed into fine-tuning on real data so
    the model keeps what synthetic pretraining taught it (boxes, masks, rare degradations)."""
    count = min(len(items), round(per_real * n_real))
    chosen = np.random.default_rng((seed, 0x5E91)).permutation(len(items))[:count]
    return [items[i] for i in sorted(chosen)]


def fit_stage(
    make: Callable[[], M],
    base: M | None,
    dataset: Dataset,
    loss: engine.LossFn,
    args: argparse.Namespace,
    task: str,
    *,
    pretraining: bool = False,
) -> M:
    """One stage of the recipe: synthetic pretraining (`pretraining=True`, `--pretrain-epochs`), or a fit on
    real data fine-tuning a copy of `base` (`--finetune-lr`; `--lr` from scratch when there is no base)."""
    model = copy.deepcopy(base) if base is not None else make()  # each fold fine-tunes its own copy
    if pretraining:
        return engine.fit(model, dataset, loss, args, f"{task} pretrain", epochs=args.pretrain_epochs)
    return engine.fit(model, dataset, loss, args, task, lr=args.finetune_lr if base is not None else args.lr)


def load_final(run_dir: Path, make: Callable[[], M]) -> tuple[M, dict[str, Any]]:
    """The shipped model of a training run (eval mode) and its checkpoint (args, command)."""
    checkpoint = engine.load_checkpoint(run_dir / "model.pth")
    model = make()
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def pick(images: Sequence[T], indices: tuple[int, ...] | list[int]) -> list[T]:
    return [images[i] for i in indices]


def save_predictions(run_dir: Path, **groups: list[dict[str, np.ndarray]] | dict[str, np.ndarray]) -> Path:
    """Every prediction a report is made from, as `<group>.<field>` arrays in predictions.npz."""
    arrays: dict[str, np.ndarray] = {}
    for group, value in groups.items():
        parts = value if isinstance(value, list) else [value]
        if not parts:
            continue
        for name in parts[0]:
            arrays[f"{group}.{name}"] = np.concatenate([p[name] for p in parts])
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "predictions.npz"
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
    return path


def load_predictions(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    with np.load(run_dir / "predictions.npz") as data:
        for key in data.files:
            group, name = key.split(".", 1)
            groups.setdefault(group, {})[name] = data[key]
    return groups


def get_step_parser(step: str, version: str = "1.0.0", parity_atol: float = 1e-4) -> argparse.ArgumentParser:
    """Arguments of the `evaluate` and `export` steps, which work from a finished training run.

    `version` is the task's current release: the one its changelog ends with; `parity_atol` the task's
    default PyTorch vs ONNX Runtime tolerance."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True, help="the --output-dir of the training run")
    if step == "export":
        parser.add_argument("--models-dir", type=Path, default=Path("models"))
        parser.add_argument("--version", default=version, help="semantic version written to the manifest")
        parser.add_argument("--parity-atol", type=float, default=parity_atol,
                            help="max abs PyTorch vs ONNX Runtime difference")  # fmt: skip
    parser.add_argument("--atlas", type=Path, default=DEFAULT_ATLAS)
    return parser


def parity_images(atlas: Path, count: int = 2) -> list[LabelledImage]:
    """Fixed inputs for export parity: real atlas photos when present, plus a synthetic scene and a
    real non-cervix photo, so parity covers real pixel statistics and not only random noise."""
    from training.data.adapters import iarc_atlas, skimage_negatives
    from training.data.synthetic import generate_scene

    images = [generate_scene(7), skimage_negatives()[0].load()]
    if atlas.is_dir():
        images += [r.load() for r in iarc_atlas(atlas)[:count]]
    return images


@dataclass(frozen=True)
class TaskDescription:
    """What a task's manifest says that the export step cannot measure: outputs, thresholds, intent."""

    outputs: tuple[OutputSpec, ...]
    thresholds: dict[str, float]
    extra: dict[str, object]
    intended_use: str
    limitations: str
    changelog: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)


def default_parity_input(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    return prepare(rgb, spec)[0]


def export_task(
    args: argparse.Namespace,
    task: str,
    make: Callable[[], nn.Module],
    describe: Callable[[dict[str, Any], dict[str, Any]], TaskDescription],
    parity_input: Callable[[np.ndarray, InputSpec], np.ndarray] = default_parity_input,
    out_dir: Path | None = None,
) -> export_step.ExportResult:
    """The export step of every task: the run's final model, its metrics and the task's description become
    model.onnx + manifest.json + MODEL_CARD.md, after a PyTorch vs ONNX Runtime parity check.

    `describe(metrics, checkpoint)` gives the task's own manifest fields; `parity_input` turns a parity photo
    into a model input (the default is the task's deterministic preprocessing). The files go to `out_dir`
    (default `--models-dir`/TASK; the segmenter's outer-fold models go beside their checkpoints)."""
    model, checkpoint = load_final(args.run_dir, make)
    summary = json.loads((args.run_dir / "metrics.json").read_text())
    spec = presets.INPUT_SPECS[task]
    description = describe(summary, checkpoint)
    return export_step.export_onnx(
        model,
        export_step.ExportSpec(
            name=task,
            version=args.version,
            input=spec,
            outputs=description.outputs,
            labels=description.labels,
            thresholds=description.thresholds,
            extra=description.extra,
            metrics=summary,
            training_data=training_data_summary(task, checkpoint),
            command=str(checkpoint["command"]),
            intended_use=description.intended_use,
            limitations=description.limitations,
            changelog=description.changelog,
        ),
        out_dir or args.models_dir / task,
        parity_inputs=[parity_input(image.image, spec) for image in parity_images(args.atlas)],
        atol=args.parity_atol,
    )


def training_data_summary(task: str, checkpoint: dict[str, object]) -> dict[str, object]:
    """What the final model was trained on, for its manifest."""
    args = argparse.Namespace(**checkpoint["args"])  # type: ignore[arg-type]
    data = catalog.task_data(task, args.atlas)
    if not data.synthetic_subjects:  # a real-only task (severity)
        return {
            "real": catalog.describe(data)["real_images"],
            "real_subjects": len({r.subject for r in data.real}),
            "uses": data.uses,
            "final_model": "fitted on all real cases (nested CV fold models measured the real figures)",
        }
    _, split = synthetic_split(task, args)
    return {
        "real": catalog.describe(data)["real_images"],
        "real_subjects": len({r.subject for r in data.real}),
        "synthetic_subjects_train": len(split.train),
        "synthetic_split": split.name,
        "uses": data.uses,
        "final_model": "trained on all real subjects (CV fold models measured the real figures) and the "
        "synthetic train subjects",
    }


def split_family(folds: list[Split]) -> str:
    """`real-gkf5-s0` from fold names like `real-gkf5-s0-f3`."""
    return folds[0].name.rsplit("-f", 1)[0]
