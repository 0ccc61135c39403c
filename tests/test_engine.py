"""The shared training loop: reproducible, and its models behave the same in eval mode as in training."""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from training import engine


class _Sample:
    def __init__(self, tensor: np.ndarray, target: float) -> None:
        self.tensor = tensor
        self.target = target


def _dataset(seed: int) -> engine.SampleDataset:
    # Inputs far from zero mean / unit variance: BatchNorm's initial running stats are wrong for them.
    items = list(range(64))

    def make(index: int, rng: np.random.Generator) -> _Sample:
        x = (rng.normal(5.0, 3.0, (3, 8, 8))).astype(np.float32)
        return _Sample(x, float(index % 2))

    return engine.SampleDataset(items, make, seed)


def _model() -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.ReLU())
            self.head = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logit": self.head(self.body(x).mean((2, 3)))}

    return Net()


def _loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(outputs["logit"][:, 0], batch["target"].float())


def _args() -> argparse.Namespace:
    return argparse.Namespace(seed=0, epochs=1, lr=1e-2, weight_decay=0.0, batch_size=16, workers=0)


def test_fit_leaves_batchnorm_statistics_of_the_final_weights() -> None:
    torch.manual_seed(0)
    model = engine.fit(_model(), _dataset(0), _loss, _args(), "test")
    batch = engine.collate_dataclasses([_dataset(1)[i] for i in range(32)])
    bn = model.body[1]
    with torch.no_grad():
        features = model.body[0](batch["tensor"])
    assert torch.allclose(bn.running_mean, features.mean((0, 2, 3)), atol=0.3)
    assert not model.training


def test_fit_is_reproducible_from_its_args() -> None:
    weights = []
    for _ in range(2):
        torch.manual_seed(123)  # fit reseeds from args.seed, whatever the global state was
        model = engine.fit(_model(), _dataset(0), _loss, _args(), "test")
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
