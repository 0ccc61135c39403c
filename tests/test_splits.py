from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data.adapters import iarc_atlas
from training.data.splits import assert_disjoint, grouped_kfold, holdout

# Random datasets: 6-60 subjects with 1-5 images each and a per-subject binary stratum.
subjects_strategy = st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=6, max_size=60).map(
    lambda rows: [(f"s{i}", label) for i, (count, label) in enumerate(rows) for _ in range(count)]
)


@settings(max_examples=60, deadline=None)
@given(subjects_strategy, st.integers(2, 5), st.integers(0, 1000))
def test_grouped_kfold_never_puts_a_subject_on_two_sides(
    rows: list[tuple[str, bool]], k: int, seed: int
) -> None:
    subjects = [s for s, _ in rows]
    strata = [label for _, label in rows]
    k = min(k, len(set(subjects)))
    folds = grouped_kfold(subjects, k, seed=seed, strata=strata)
    held_out = [i for fold in folds for i in fold.val]
    assert sorted(held_out) == list(range(len(subjects))), "every image is held out exactly once"
    for fold in folds:
        assert_disjoint(fold, subjects)
        assert set(fold.train) | set(fold.val) == set(range(len(subjects)))


@settings(max_examples=60, deadline=None)
@given(subjects_strategy, st.integers(0, 1000))
def test_holdout_never_puts_a_subject_on_two_sides(rows: list[tuple[str, bool]], seed: int) -> None:
    subjects = [s for s, _ in rows]
    if len(set(subjects)) < 7:
        return  # fewer subjects than parts: covered by test_holdout_rejects_too_few_subjects
    split = holdout(subjects, seed=seed, strata=[label for _, label in rows])
    assert_disjoint(split, subjects)
    assert sorted(split.train + split.val + split.test) == list(range(len(subjects)))
    assert split.val and split.test


def test_holdout_rejects_too_few_subjects() -> None:
    with pytest.raises(ValueError, match="number of subjects"):
        holdout(["a", "a", "b"], seed=0)


def test_assert_disjoint_catches_a_leak() -> None:
    folds = grouped_kfold(["a", "b", "c", "d"], 2, seed=0)
    leaky = type(folds[0])("leaky", train=(0, 1), val=(1, 2))
    with pytest.raises(AssertionError, match="subjects on both"):
        assert_disjoint(leaky, ["a", "b", "c", "d"])


def test_subject_with_two_strata_is_a_data_error() -> None:
    with pytest.raises(ValueError, match="strata"):
        grouped_kfold(["a", "a", "b", "c"], 2, strata=[0, 1, 0, 1])


def test_splits_are_reproducible_and_seed_dependent() -> None:
    subjects = [f"s{i // 3}" for i in range(90)]
    first = grouped_kfold(subjects, 5, seed=3)
    assert first == grouped_kfold(subjects, 5, seed=3)
    assert first != grouped_kfold(subjects, 5, seed=4)
    assert first[0].name == "data-gkf5-s3-f0"


def test_atlas_kfold_holds_out_whole_cases_with_both_grades(atlas_root) -> None:
    records = [r for r in iarc_atlas(atlas_root) if r.labels.severity is not None]
    subjects = [r.subject for r in records]
    strata = [int(r.labels.severity) for r in records]  # type: ignore[arg-type]
    folds = grouped_kfold(subjects, 5, seed=0, strata=strata, dataset="iarc")
    for fold in folds:
        assert_disjoint(fold, subjects)
        held_grades = {strata[i] for i in fold.val}
        assert held_grades == {1, 2}, f"{fold.name} holds out only grades {held_grades}"
