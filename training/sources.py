"""Decoded, labelled images for training, loaded once per run and kept in memory.

Real sources come through the adapters (atlas marks already inpainted); synthetic scenes are
rendered from consecutive seeds, so a run is reproducible from its arguments alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from training.data.records import ImageRecord, LabelledImage
from training.data.synthetic import generate_scene, generate_subject

# Atlas frames are 800x600; synthetic scenes are rendered with the same 4:3 shape at this size.
SYNTHETIC_SIZE = (640, 480)


def load_all(records: Sequence[ImageRecord], desc: str = "decoding") -> list[LabelledImage]:
    return [record.load() for record in tqdm(records, desc=desc, leave=False, disable=len(records) < 20)]


def synthetic_scenes(
    first_seed: int, count: int, size: tuple[int, int] = SYNTHETIC_SIZE
) -> list[LabelledImage]:
    """One scene per seed (random stage, ~15 % without a cervix)."""
    seeds = range(first_seed, first_seed + count)
    return [
        generate_scene(seed, size) for seed in tqdm(seeds, desc="rendering", leave=False, disable=count < 20)
    ]


def synthetic_subjects(
    first_seed: int, count: int, stages: tuple[str, ...], size: tuple[int, int] = SYNTHETIC_SIZE
) -> list[LabelledImage]:
    """`count` subjects, each photographed at `stages`."""
    seeds = range(first_seed, first_seed + count)
    images: list[LabelledImage] = []
    for seed in tqdm(seeds, desc="rendering", leave=False, disable=count < 20):
        images.extend(generate_subject(seed, size, stages))
    return images
