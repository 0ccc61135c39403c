"""The segmenter and severity networks, built from torchvision and trained from scratch (the detector and
quality models sit on a frozen pretrained backbone: training/tasks/detector.py, quality.py).

Each model returns a dict of named tensors whose names are the ONNX output names, so the export
step, the manifest and the service all speak the same names.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenet_v3_small
from torchvision.models.segmentation.lraspp import _lraspp_mobilenetv3


def _small_backbone(in_channels: int, width_mult: float) -> tuple[nn.Module, int]:
    """MobileNetV3-Small features (1.9 ms at 224 in ONNX Runtime on this machine) for `in_channels` inputs."""
    net = mobilenet_v3_small(width_mult=width_mult)
    if in_channels != 3:
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(
            in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False
        )
    return net.features, net.classifier[0].in_features


class LesionSegmenter(nn.Module):
    """Cervix crop -> acetowhite lesion logit map at input resolution (LR-ASPP on MobileNetV3-Small).

    torchvision ships LR-ASPP on the Large backbone only; on this 2-core CPU a training step of the
    Small one takes 0.70 s vs 1.6 s (batch 16 at 224), which buys the epochs `make models` can afford.
    Its builder is the one torchvision's own `lraspp_mobilenet_v3_large` calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = _lraspp_mobilenetv3(mobilenet_v3_small(dilated=True), num_classes=1)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"lesion_logits": self.net(image)["out"]}


class SeverityNet(nn.Module):
    """Crop RGB + lesion-probability channel -> CIN2+ logit (the SegNet + ResNet paper's 4-channel input)."""

    def __init__(self, width_mult: float = 1.0, dropout: float = 0.3) -> None:
        super().__init__()
        self.features, channels = _small_backbone(4, width_mult)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, 1))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cin2plus_logit": self.head(self.pool(self.features(image)))}
