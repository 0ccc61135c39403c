"""The one label vocabulary every data source speaks: synthetic scenes, the IARC atlas and user adapters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

# Exam stages, in the order the quality model's stage head outputs them.
EXAM_STAGES: tuple[str, ...] = ("acetic", "saline", "iodine", "green")


class Severity(IntEnum):
    """Histology grade. CIN2+ (HSIL or worse) is what the severity model separates from the rest."""

    NORMAL = 0
    LOW_GRADE = 1  # LSIL / CIN1
    HIGH_GRADE = 2  # HSIL / CIN2, CIN3 or worse

    @property
    def is_cin2plus(self) -> bool:
        return self is Severity.HIGH_GRADE


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the image it belongs to


@dataclass(frozen=True)
class Labels:
    """What is known about one image. `None` always means "unknown", never "absent"."""

    cervix_present: bool | None = None
    cervix_box: Box | None = None
    lesion_mask: np.ndarray | None = field(default=None, compare=False)  # HxW uint8 in {0, 1}
    severity: Severity | None = None
    exam_stage: str | None = None  # one of EXAM_STAGES
    transformation_zone: int | None = None  # TZ type 1, 2 or 3 where a dataset says it
    # Blur already in the picture, as PSF radius / short side (training.data.degrade's unit); None for
    # real photos, which count as the reference for "sharp".
    blur_extent: float | None = None

    def __post_init__(self) -> None:
        if self.exam_stage is not None and self.exam_stage not in EXAM_STAGES:
            raise ValueError(f"exam_stage {self.exam_stage!r} is not one of {EXAM_STAGES}")
        if self.cervix_box is not None and not self.cervix_present:
            raise ValueError("a cervix box needs cervix_present=True")


@dataclass(frozen=True)
class LabelledImage:
    """Pixels plus labels. `image` is HxWx3 uint8 RGB, upright."""

    image: np.ndarray = field(compare=False)
    labels: Labels
    subject: str  # the patient/case: every split groups by this
    source: str  # "synthetic", "iarc-atlas", "csv", ...

    def with_image(self, image: np.ndarray, **label_changes: Any) -> LabelledImage:
        return replace(self, image=image, labels=replace(self.labels, **label_changes))


@dataclass(frozen=True)
class ImageRecord:
    """A not-yet-decoded image from an adapter: labels are known up front, pixels load on demand."""

    path: Path
    labels: Labels
    subject: str
    source: str
    mask_path: Path | None = None
    loader: Callable[[ImageRecord], LabelledImage] | None = field(default=None, compare=False, repr=False)

    def load(self) -> LabelledImage:
        if self.loader is not None:
            return self.loader(self)
        from training.data.adapters import load_record  # local import: adapters import this module

        return load_record(self)
