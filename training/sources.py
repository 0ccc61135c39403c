"""Decoded, labelled images for training, loaded once per run and kept in memory.

Real sources come through the adapters (atlas marks already inpainted); synthetic scenes are
rendered from consecutive seeds, so a run is reproducible from its arguments alone.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import TypeVar

from tqdm import tqdm

from training.data.records import ImageRecord, LabelledImage
from training.data.synthetic import generate_scene, generate_subject

# Atlas frames are 800x600; synthetic scenes are rendered with the same 4:3 shape at this size.
SYNTHETIC_SIZE = (640, 480)
# Rendering and degrading are pure numpy/PIL per item: spread them over every core (the results do not
# depend on the number of processes: each item is seeded by itself).
DATA_PROCESSES = os.cpu_count() or 1

A = TypeVar("A")
B = TypeVar("B")


def parallel_map(
    fn: Callable[[A], B], items: Sequence[A], desc: str, processes: int = DATA_PROCESSES
) -> list[B]:
    """`[fn(x) for x in items]`, in order, over `processes` forked processes with a progress bar.

    Fork, not spawn: children inherit the loaded data instead of re-importing; they run no torch code.
    """
    bar = partial(tqdm, total=len(items), desc=desc, leave=False, disable=len(items) < 20)
    if processes <= 1 or len(items) < 8:
        return [fn(x) for x in bar(items)]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        return list(bar(pool.map(fn, items, chunksize=4)))


def load_all(records: Sequence[ImageRecord], desc: str = "decoding") -> list[LabelledImage]:
    return parallel_map(ImageRecord.load, records, desc)


def synthetic_scenes(
    first_seed: int, count: int, size: tuple[int, int] = SYNTHETIC_SIZE
) -> list[LabelledImage]:
    """One scene per seed (random stage, ~15 % without a cervix)."""
    return parallel_map(
        partial(generate_scene, size=size), range(first_seed, first_seed + count), "rendering"
    )


def synthetic_subjects(
    first_seed: int, count: int, stages: tuple[str, ...], size: tuple[int, int] = SYNTHETIC_SIZE
) -> list[LabelledImage]:
    """`count` subjects, each photographed at `stages`."""
    render = partial(generate_subject, size=size, stages=stages)
    return [image for photos in parallel_map(render, range(first_seed, first_seed + count), "rendering")
            for image in photos]  # fmt: skip
