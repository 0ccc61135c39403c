"""A fake camera for the capture app's browser tests and benchmark: a Y4M video that Chromium plays as its
camera (`--use-file-for-fake-video-capture`), built from atlas photos, one scene after another; it loops."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Scene:
    name: str
    image: Image.Image
    seconds: float


def _bt601_limited(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB to the studio-range BT.601 Y'CbCr that Chromium assumes for an I420 camera frame."""
    r, g, b = (rgb[..., i].astype(np.float32) / 255.0 for i in range(3))
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    y8, cb8, cr8 = (np.clip(np.round(c), 0, 255).astype(np.uint8) for c in (y, cb, cr))
    return y8, cb8, cr8


def _frame(image: Image.Image, size: tuple[int, int]) -> bytes:
    rgb = np.asarray(image.convert("RGB").resize(size, Image.Resampling.LANCZOS))
    y, cb, cr = _bt601_limited(rgb)
    # 4:2:0: each chroma sample is the mean of a 2x2 block.
    h, w = y.shape
    cb2 = cb.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).round().astype(np.uint8)
    cr2 = cr.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).round().astype(np.uint8)
    return b"FRAME\n" + y.tobytes() + cb2.tobytes() + cr2.tobytes()


def write_y4m(path: Path, scenes: list[Scene], size: tuple[int, int], fps: int) -> list[tuple[str, float]]:
    """Writes the scenes in order; returns each scene's (name, start second) in the video."""
    if size[0] % 2 or size[1] % 2:
        raise ValueError("Y4M 4:2:0 needs an even width and height")
    starts = []
    elapsed = 0.0
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{size[0]} H{size[1]} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for scene in scenes:
            frame = _frame(scene.image, size)
            count = max(1, round(scene.seconds * fps))
            out.write(frame * count)
            starts.append((scene.name, elapsed))
            elapsed += count / fps
    return starts
