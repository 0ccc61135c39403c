"""Subject-grouped splits. No subject (patient, case, synthetic anatomy) ever sits on two sides.

Split names are part of every reported metric, so they encode how they were made:
`<dataset>-gkf<k>-s<seed>-f<fold>` for grouped k-fold and `<dataset>-holdout-s<seed>` for a
train/val/test holdout. Both stratify by a per-subject label through scikit-learn's
StratifiedGroupKFold (on the atlas' 45 cases it keeps each fold within one case of the class mix,
as well as a hand-written round-robin deal did, and it also balances image counts).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


@dataclass(frozen=True)
class Split:
    name: str
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...] = ()

    def subjects(self, subjects: Sequence[str], side: str) -> set[str]:
        return {subjects[i] for i in getattr(self, side)}


def _checked_strata(subjects: Sequence[str], strata: Sequence[Hashable] | None) -> list[str]:
    """Strata as strings, after checking each subject has one; disagreement is a data error."""
    if strata is None:
        return ["all"] * len(subjects)
    by_subject: dict[str, Hashable] = {}
    for subject, stratum in zip(subjects, strata, strict=True):
        if by_subject.setdefault(subject, stratum) != stratum:
            raise ValueError(
                f"subject {subject!r} has images in strata {by_subject[subject]!r} and {stratum!r}"
            )
    return [repr(s) for s in strata]


def _fold_of_each_image(
    subjects: Sequence[str], strata: Sequence[Hashable] | None, k: int, seed: int
) -> np.ndarray:
    n_subjects = len(set(subjects))
    if k < 2 or k > n_subjects:
        raise ValueError(f"k must be between 2 and the number of subjects ({n_subjects}), got {k}")
    labels = _checked_strata(subjects, strata)
    if max(labels.count(label) for label in set(labels)) < k:
        # No stratum can fill k folds (scikit-learn refuses): stratifying is impossible, so group only.
        labels = ["all"] * len(subjects)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of = np.empty(len(subjects), dtype=np.int64)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(subjects)), labels, list(subjects))):
        fold_of[held] = fold
    return fold_of


def grouped_kfold(
    subjects: Sequence[str],
    k: int,
    *,
    seed: int = 0,
    strata: Sequence[Hashable] | None = None,
    dataset: str = "data",
) -> list[Split]:
    """k folds over subjects, stratified by a per-subject label; fold i's `val` is its held-out part."""
    fold_of = _fold_of_each_image(subjects, strata, k, seed)
    return [
        Split(
            f"{dataset}-gkf{k}-s{seed}-f{fold}",
            train=tuple(np.flatnonzero(fold_of != fold).tolist()),
            val=tuple(np.flatnonzero(fold_of == fold).tolist()),
        )
        for fold in range(k)
    ]


def holdout(
    subjects: Sequence[str],
    *,
    parts: int = 7,
    seed: int = 0,
    strata: Sequence[Hashable] | None = None,
    dataset: str = "data",
) -> Split:
    """train/val/test by subject: `parts` stratified grouped folds, one for test, one for val.

    The default 7 parts gives about 71/14/14 % of subjects.
    """
    if parts < 3:
        raise ValueError("a holdout needs at least 3 parts (train, val, test)")
    fold_of = _fold_of_each_image(subjects, strata, parts, seed)
    return Split(
        f"{dataset}-holdout-s{seed}",
        train=tuple(np.flatnonzero(fold_of >= 2).tolist()),
        val=tuple(np.flatnonzero(fold_of == 1).tolist()),
        test=tuple(np.flatnonzero(fold_of == 0).tolist()),
    )


def assert_disjoint(split: Split, subjects: Sequence[str]) -> None:
    """Raise if any subject appears on two sides of a split."""
    sides = ("train", "val", "test")
    for a in range(len(sides)):
        for b in range(a + 1, len(sides)):
            shared = split.subjects(subjects, sides[a]) & split.subjects(subjects, sides[b])
            if shared:
                raise AssertionError(
                    f"{split.name}: subjects on both {sides[a]} and {sides[b]}: {sorted(shared)[:5]}"
                )
