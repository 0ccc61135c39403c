"""Which data feeds which model, and how it is split. `python -m training.data summary` prints it.

The real atlas is small (45 cases), so every task is evaluated on held-out atlas cases by grouped
k-fold, and synthetic scenes (exact labels, unlimited) carry what the atlas cannot label.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from training.data.adapters import (
    BUNDLED_NEGATIVES,
    DEFAULT_ATLAS,
    bundled_negative_subject,
    bundled_negatives,
    iarc_atlas,
    lesion_outlines,
    skimage_negatives,
)
from training.data.records import ImageRecord
from training.data.splits import Split, grouped_kfold

TASKS = ("detector", "quality", "segmenter", "severity")
ATLAS_FOLDS = 5
SPLIT_SEED = 0


@dataclass(frozen=True)
class TaskData:
    task: str
    real: list[ImageRecord]
    synthetic_subjects: int  # each synthetic subject renders one image per exam stage
    uses: str  # what the task takes from each source, for reports and the README


# Synthetic subject counts per task: enough to train the small models on this 2-core machine in
# the `make models` budget; the synthetic holdout keeps 2/7 of them (val + test) out of training.
SYNTHETIC_SUBJECTS = {"detector": 600, "quality": 400, "segmenter": 800, "severity": 0}
# Atlas cases that show one cervix (near-identical photos, each with its own outline and histology): a task
# whose photos they share must hold them out together. Each maps to the case whose fold it joins.
SAME_CERVIX = {"iarc-AACG": "iarc-AAHO"}


def outlines_root(atlas_root: Path = DEFAULT_ATLAS) -> Path:
    """The lesion outlines live beside the atlas they trace (`../shared/data/lesion-outlines`)."""
    return atlas_root.parent / "lesion-outlines"


def task_data(task: str, atlas_root: Path = DEFAULT_ATLAS) -> TaskData:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    atlas = iarc_atlas(atlas_root) if atlas_root.is_dir() else []
    synthetic = SYNTHETIC_SUBJECTS[task]
    if task == "detector":
        return TaskData(
            task,
            atlas + skimage_negatives() + bundled_negatives(),
            synthetic,
            "atlas: cervix present/absent (no boxes); scikit-image, scikit-learn, matplotlib and mahotas "
            "photos: real negatives; synthetic: boxes, no-cervix scenes and surrounds; every photo also "
            "redrawn as other devices take it (training.data.device)",
        )
    if task == "quality":
        staged = [r for r in atlas if r.labels.exam_stage is not None]
        return TaskData(
            task,
            staged,
            synthetic,
            "atlas: sharp sources degraded on the fly + exam stage; synthetic: the same, with exact geometry",
        )
    if task == "segmenter":
        root = outlines_root(atlas_root)
        outlines = lesion_outlines(root, atlas_root) if atlas and (root / "index.csv").is_file() else []
        return TaskData(
            task,
            outlines,
            synthetic,
            "atlas: clinician polygon outlines of 65 photos of 27 cases (acetic acid, green filter, Lugol's "
            "iodine), marks inpainted; synthetic: acetic-acid views with exact lesion masks",
        )
    # Case level: every staged photo of a graded case (its acetic-acid, saline and iodine views feed the
    # case's features); no synthetic data, since nothing is learned from pixels (training.case_severity).
    staged = [r for r in atlas if r.labels.exam_stage is not None and r.labels.severity is not None]
    return TaskData(
        task,
        staged,
        0,
        "atlas: each case's staged photos, measured and pooled per case, with the case's histology",
    )


def real_fold_of_subject(atlas_root: Path = DEFAULT_ATLAS) -> dict[str, int]:
    """Each real subject's held-out fold, fixed once over all real data so every task holds out the
    same cases (a case held out by the severity model is held out by the detector too).

    Stratified by case histology; a case's grade applies to all its images (its vulva photo too).
    Subjects with no grade, the scikit-image negatives, form their own stratum and are spread too.
    """
    records = (iarc_atlas(atlas_root) if atlas_root.is_dir() else []) + skimage_negatives()
    subjects = [r.subject for r in records]
    grade = {r.subject: r.labels.severity.name for r in records if r.labels.severity is not None}
    folds = grouped_kfold(
        subjects,
        ATLAS_FOLDS,
        seed=SPLIT_SEED,
        strata=[grade.get(s, "none") for s in subjects],
        dataset="real",
    )
    fold_of = {subjects[i]: fold for fold, split in enumerate(folds) for i in split.val}
    # Negatives added later take folds in turn, after the split above: the atlas cases keep their folds,
    # so every figure reported on real-gkf5-s0 holds out the same cases it always did.
    # An entry's fold is its place in the table, not in what is installed: a missing wheel moves no photo.
    for index, (package, relative) in enumerate(BUNDLED_NEGATIVES):
        fold_of[bundled_negative_subject(package, relative)] = index % ATLAS_FOLDS
    return fold_of


# Tasks whose folds hold the SAME_CERVIX cases out together. The severity task must split its cases as the
# segmenter does: its held-out lesion maps come from the segmenter's outer-fold models
# (`--segmenter-folds`), and a case in another fold than the segmenter's would be mapped by a model that
# learned its outline.
CERVIX_GROUPED_TASKS = ("segmenter", "severity")


def fold_of_subject_for(task: str, atlas_root: Path = DEFAULT_ATLAS) -> dict[str, int]:
    """`real_fold_of_subject`, except that the segmenter and severity tasks (CERVIX_GROUPED_TASKS), whose
    photos include both cases of one cervix (SAME_CERVIX), hold them out together: each joins its partner's
    fold. Every other atlas case keeps its fold, so their held-out cases are the other tasks' (AACG moves
    from fold 2 to 3). The one definition of each task's folds."""
    fold_of = real_fold_of_subject(atlas_root)
    if task in CERVIX_GROUPED_TASKS:
        for subject, partner in SAME_CERVIX.items():
            if partner in fold_of:
                fold_of[subject] = fold_of[partner]
    return fold_of


def real_folds(records: list[ImageRecord], fold_of: dict[str, int]) -> list[Split]:
    """The grouped k-fold every real-data metric is reported on, restricted to `records`."""
    folds = [fold_of[r.subject] for r in records]
    return [
        Split(
            f"real-gkf{ATLAS_FOLDS}-s{SPLIT_SEED}-f{k}",
            train=tuple(i for i, f in enumerate(folds) if f != k),
            val=tuple(i for i, f in enumerate(folds) if f == k),
        )
        for k in range(ATLAS_FOLDS)
    ]


def describe(data: TaskData) -> dict[str, object]:
    sources = Counter(r.source for r in data.real)
    real_subjects = len({r.subject for r in data.real})
    summary: dict[str, object] = {
        "task": data.task,
        "real_images": dict(sources),
        "real_subjects": real_subjects,
        "synthetic_subjects": data.synthetic_subjects,
        "uses": data.uses,
    }
    if data.real:
        subjects = [r.subject for r in data.real]
        summary["real_folds"] = [
            {"split": s.name, "train_images": len(s.train), "held_out_images": len(s.val),
             "held_out_subjects": len(s.subjects(subjects, "val"))}
            for s in real_folds(data.real, fold_of_subject_for(data.task))
        ]  # fmt: skip
    return summary
