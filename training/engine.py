"""What every task script shares: seeding, per-sample RNGs, datasets over prepared samples,
batched prediction and checkpoints that carry their args (as torchvision's references do)."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.data.records import LabelledImage

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A generator per (run seed, epoch, sample): augmentation is reproducible and order-independent."""
    return np.random.default_rng((seed, epoch, index))


class SampleDataset(Dataset, Generic[T]):
    """LabelledImages turned into task samples by `transform(image, rng)`; `set_epoch` reseeds."""

    def __init__(
        self,
        images: Sequence[LabelledImage],
        transform: Callable[[LabelledImage, np.random.Generator], T],
        seed: int,
    ) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> T:
        return self.transform(self.images[index], sample_rng(self.seed, self.epoch, index))


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
