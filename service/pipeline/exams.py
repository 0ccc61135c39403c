"""A patient's exam: several photos of one cervix (saline, acetic acid, iodine, green filter) judged together.

Each photo goes through the single-photo pipeline, told which stage it should show (the client's hint, or
the quality model's stage when there is none). The exam then says which photos to retake, which photo a
clinician should review, and gives one CIN2+ probability for the patient: the case model
(`service.pipeline.case_risk`) on the per-stage means of its usable acetic-acid, saline and iodine photos'
measures, as it was fitted on atlas cases. It is a patient, not a photo, who is referred.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.pipeline.case_risk import MEASURED_STAGES, METHOD, CaseModel
from service.pipeline.rules import ACETIC
from service.pipeline.stages import Assessment, Diagnosis
from service.render.reasons import Reason


@dataclass(frozen=True)
class PartProblem:
    """Why one photo of an exam could not be assessed; it becomes that photo's problem in the answer."""

    status: int
    code: str
    detail: str


@dataclass(frozen=True)
class ExamPhoto:
    """One photo of the exam: its assessment (and review images), or the problem that stopped it."""

    index: int  # position in the request, from 0
    stage_hint: str | None  # the stage the client said it shows; None: the quality model decides
    assessment: Assessment | None = None
    review_images: dict[str, str] = field(default_factory=dict)
    problem: PartProblem | None = None

    @property
    def usable(self) -> bool:
        return self.assessment is not None and not self.assessment.reasons

    @property
    def probability(self) -> float | None:
        """This photo's P(CIN2+), when it was diagnosed."""
        diagnosis = self.assessment.diagnosis if self.assessment else None
        return diagnosis.probability if diagnosis else None

    @property
    def sharpness(self) -> float:
        quality = self.assessment.quality if self.assessment else None
        return quality.sharpness if quality else 0.0


@dataclass(frozen=True)
class ExamDiagnosis(Diagnosis):
    """The patient's diagnosis: the photos it comes from and how they were combined."""

    photos_used: list[int]
    method: str = METHOD


@dataclass
class Exam:
    photos: list[ExamPhoto]
    retake: list[int] = field(default_factory=list)  # indices of photos to take again
    review: int | None = None  # index of the photo to show a clinician
    diagnosis: ExamDiagnosis | None = None
    reasons: list[Reason] = field(default_factory=list)  # the exam's own: no photo after acetic acid

    @property
    def decision(self) -> Literal["recapture", "diagnosis"]:
        return "diagnosis" if self.diagnosis is not None else "recapture"


def measured_by_stage(photos: list[ExamPhoto]) -> dict[str, dict[int, np.ndarray]]:
    """Stage -> {photo index: measures} of the usable photos the case model reads (acetic acid only when
    diagnosed); a retaken photo never counts."""
    found: dict[str, dict[int, np.ndarray]] = {stage: {} for stage in MEASURED_STAGES}
    for p in photos:
        a = p.assessment
        if not (p.usable and a is not None and a.measures is not None and a.stage in found):
            continue
        if a.stage != ACETIC or a.diagnosis is not None:
            found[a.stage][p.index] = a.measures
    return found


def summarise(photos: list[ExamPhoto], case_model: CaseModel, cin2plus_threshold: float) -> Exam:
    """Retakes, the review photo and the exam's CIN2+ probability, from the photos' own verdicts."""
    exam = Exam(photos=photos, retake=[p.index for p in photos if not p.usable])
    measured = measured_by_stage(photos)
    votes = measured[ACETIC]  # a diagnosis needs at least one usable acetic-acid photo
    if votes:
        probability = case_model.probability({s: list(m.values()) for s, m in measured.items()})
        used = sorted(i for m in measured.values() for i in m)
        exam.diagnosis = ExamDiagnosis(probability, probability >= cin2plus_threshold, used)
    elif not any(p.assessment is not None and p.assessment.stage == ACETIC for p in photos):
        # No retake of these photos would help: none shows the acetic-acid stage a diagnosis needs.
        exam.reasons = [Reason.NOT_ACETIC]
    candidates = [p for p in photos if p.index in votes] or [p for p in photos if p.usable]
    exam.review = max(candidates, key=lambda p: p.sharpness).index if candidates else None
    return exam
