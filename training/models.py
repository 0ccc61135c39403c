"""The segmenter and severity networks. The severity network is torchvision's MobileNetV3-Small trained
from scratch; the segmenter is a light FPN decoder over the stride 4-32 feature maps of the frozen ImageNet
EfficientNet-Lite0 the detector and quality models also sit on (training/backbones.py).

Each model returns a dict of named tensors whose names are the ONNX output names, so the export
step, the manifest and the service all speak the same names.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import mobilenet_v3_small

from training import backbones


def _small_backbone(in_channels: int, width_mult: float) -> tuple[nn.Module, int]:
    """MobileNetV3-Small features (1.9 ms at 224 in ONNX Runtime on this machine) for `in_channels` inputs."""
    net = mobilenet_v3_small(width_mult=width_mult)
    if in_channels != 3:
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(
            in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False
        )
    return net.features, net.classifier[0].in_features


def _conv_bn(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# Lite0 maps the decoder reads, finest first; the coarsest is `top` (s16: blocks 0-10, the default; s32 adds
# blocks 11-15, 2.4 M more weights, 9 MB of ONNX).
SEGMENTER_TOPS = ("s16", "s32")


def segmenter_taps(top: str = "s16") -> tuple[str, ...]:
    if top not in SEGMENTER_TOPS:
        raise ValueError(f"top tap {top!r}: choose one of {SEGMENTER_TOPS}")
    return ("s4", "s8", "s16", "s32")[: 3 + SEGMENTER_TOPS.index(top)]


class LesionDecoder(nn.Module):
    """FPN-style decoder: {s4, s8, s16[, s32] feature maps} -> lesion logits at 4x the s4 map (input size).

    Top-down: 1x1 laterals of the coarse maps (s8 and up) to `width` channels, each upsampled and added to
    the next finer one, one 3x3 conv at stride 8; then upsampled to stride 4 and fused with a narrow s4
    lateral (edges of the acetowhite border) by one 3x3 conv; a 1x1 logit, bilinearly upsampled 4x. About
    60 M multiply-adds at 224 px, so it trains on cached frozen features in seconds per epoch on two cores.
    """

    def __init__(self, taps: tuple[str, ...] = segmenter_taps(), width: int = 48, fine: int = 24) -> None:
        super().__init__()
        self.taps = tuple(taps)
        channels = {tap: backbones.TAPS[tap][1] for tap in self.taps}
        self.coarse = self.taps[1:][::-1]  # coarsest first, ending with s8
        self.lateral = nn.ModuleDict({tap: _conv_bn(channels[tap], width, 1) for tap in self.coarse})
        self.smooth8 = _conv_bn(width, width, 3)
        self.lateral4 = _conv_bn(channels["s4"], fine, 1)
        self.fuse4 = _conv_bn(width + fine, fine, 3)
        self.logit = nn.Conv2d(fine, 1, 1)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.lateral[self.coarse[0]](features[self.coarse[0]])
        for tap in self.coarse[1:]:
            x = self._up(x, features[tap]) + self.lateral[tap](features[tap])
        x = self.smooth8(x)
        fine = self.lateral4(features["s4"])
        x = self.fuse4(torch.cat([self._up(x, fine), fine], dim=1))
        return F.interpolate(self.logit(x), scale_factor=4.0, mode="bilinear", align_corners=False)


class LesionSegmenter(nn.Module):
    """Cervix crop -> acetowhite lesion logit map at input resolution: the frozen ImageNet EfficientNet-Lite0
    trunk up to the `top` tap (no head) and `LesionDecoder`. `pretrained=False` builds the same network with
    random trunk weights, to be filled from a checkpoint."""

    def __init__(
        self, trunk: backbones.LiteTrunk | None = None, *, top: str = "s16", pretrained: bool = False
    ) -> None:
        super().__init__()
        taps = segmenter_taps(top)
        self.trunk = trunk or backbones.LiteTrunk(taps, head=False, pretrained=pretrained)
        self.decoder = LesionDecoder(taps)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"lesion_logits": self.decoder(self.trunk(image))}


class SeverityNet(nn.Module):
    """Crop RGB + lesion-probability channel -> CIN2+ logit (the SegNet + ResNet paper's 4-channel input)."""

    def __init__(self, width_mult: float = 1.0, dropout: float = 0.3) -> None:
        super().__init__()
        self.features, channels = _small_backbone(4, width_mult)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, 1))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cin2plus_logit": self.head(self.pool(self.features(image)))}
