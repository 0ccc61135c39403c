"""What every task script shares: seeding, per-sample RNGs, datasets over prepared samples,
batched prediction and checkpoints that carry their args (as torchvision's references do)."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

S = TypeVar("S")
T = TypeVar("T")
M = TypeVar("M", bound=torch.nn.Module)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A generator per (run seed, epoch, sample): augmentation is reproducible and order-independent."""
    return np.random.default_rng((seed, epoch, index))


class SampleDataset(Dataset, Generic[S, T]):
    """Items (LabelledImages, pooled crops) turned into samples by `transform(item, rng)`;
    `set_epoch` reseeds the augmentation."""

    def __init__(
        self, items: Sequence[S], transform: Callable[[S, np.random.Generator], T], seed: int
    ) -> None:
        self.items = items
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> T:
        return self.transform(self.items[index], sample_rng(self.seed, self.epoch, index))


def collate_dataclasses(batch: list[Any]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dataclasses field by field into tensors."""
    fields = vars(batch[0]).keys()
    return {name: torch.as_tensor(np.stack([np.asarray(getattr(s, name)) for s in batch])) for name in fields}


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_dataclasses,
        generator=generator,
        persistent_workers=workers > 0,
    )


@torch.inference_mode()
def predict(model: torch.nn.Module, batches: DataLoader) -> dict[str, np.ndarray]:
    """Run the model over a loader; returns every output and every target field, concatenated."""
    model.eval()
    collected: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        outputs = model(batch["tensor"])
        for name, value in {**outputs, **{k: v for k, v in batch.items() if k != "tensor"}}.items():
            collected.setdefault(name, []).append(value.detach().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def save_checkpoint(path: Path, model: torch.nn.Module, args: argparse.Namespace, **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "args": vars(args), **extra}, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


LossFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


def train_one_epoch(
    model: torch.nn.Module,
    batches: DataLoader,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    desc: str,
) -> float:
    """One pass over `batches`; returns the mean loss. Reseeds the dataset's augmentation per epoch."""
    model.train()
    dataset = batches.dataset
    if isinstance(dataset, SampleDataset):
        dataset.set_epoch(epoch)
    total, count = 0.0, 0
    for batch in tqdm(batches, desc=f"{desc} epoch {epoch}", leave=False):
        loss = loss_fn(model(batch["tensor"]), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(batch["tensor"])
        count += len(batch["tensor"])
    return total / max(count, 1)


def fit(
    model: M,
    dataset: Dataset,
    loss_fn: LossFn,
    args: argparse.Namespace,
    desc: str,
    *,
    epochs: int | None = None,
    lr: float | None = None,
) -> M:
    """AdamW with a one-cycle schedule: the recipe every task shares. `epochs` and `lr` default to
    `args.epochs` and `args.lr` (synthetic pretraining and real fine-tuning pass their own)."""
    seed_everything(args.seed)
    epochs = args.epochs if epochs is None else epochs
    lr = args.lr if lr is None else lr
    batches = loader(dataset, args.batch_size, shuffle=True, seed=args.seed, workers=args.workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, epochs * len(batches))
    )
    for epoch in range(epochs):
        loss = train_one_epoch(model, batches, loss_fn, optimizer, scheduler, epoch, desc)
        print(f"{desc}: epoch {epoch} loss {loss:.4f}", flush=True)
    recalibrate_batchnorm(model, batches)
    return model


def recalibrate_batchnorm(model: torch.nn.Module, batches: DataLoader, max_batches: int = 40) -> None:
    """Recompute BatchNorm running statistics with the final weights.

    torchvision's MobileNetV3 tracks them with momentum 0.01, so after a short from-scratch schedule they
    still describe early weights: measured on the first segmenter, P(lesion) peaked at 0.03 in eval
    mode and 0.9996 in train mode on the same crops. An equal-weight average over training batches
    with the final weights (torch's SWA `update_bn`) fixes eval mode.
    """
    update_bn((batch["tensor"] for batch in islice(batches, max_batches)), model)
    model.eval()
