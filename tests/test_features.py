"""Frozen-feature extraction (training.features): what ONNX Runtime computes is what the module computes."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from service.inference.manifest import InputSpec
from training.features import FeatureExtractor

SPEC = InputSpec(
    name="image",
    width=16,
    height=16,
    channels=("R", "G", "B"),
    resize="stretch",
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
)


class _Pooled(nn.Module):
    """A conv and a BatchNorm whose running statistics differ from any batch's own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.norm.running_mean.fill_(0.3)
            self.norm.running_var.fill_(4.0)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": self.norm(self.conv(image)).mean(dim=(2, 3))}


def test_the_extracted_module_stays_in_eval_mode_and_matches_onnx() -> None:
    torch.manual_seed(0)
    module = _Pooled().eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    features = FeatureExtractor(module, ("pooled",), SPEC).extract(images)["pooled"]
    # The exporter restores the mode it found; a module left training would normalise by batch statistics.
    assert not module.training and not module.norm.training
    with torch.no_grad():
        expected = module(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)["pooled"]
    np.testing.assert_allclose(features, expected.numpy(), atol=2e-3)
