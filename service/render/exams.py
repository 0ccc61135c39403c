"""An exam's answer: every photo in request order, what to retake and why, the photo to review, the exam's
CIN2+ probability, and on request a contact sheet."""

from __future__ import annotations

from typing import Literal

from service.pipeline.exams import Exam, ExamPhoto
from service.render import review
from service.render.problems import TITLES
from service.render.reasons import ADVICE, MESSAGES
from service.render.schemas import (
    AssessmentOut,
    ExamDiagnosisOut,
    ExamOut,
    ExamPhotoOut,
    PartProblemOut,
    ReasonOut,
    RetakeOut,
)

Outcome = Literal["used", "accepted", "retake", "problem"]


def photo_outcome(exam: Exam, photo: ExamPhoto) -> Outcome:
    """used: the diagnosis comes from it; accepted: usable, another stage; retake; problem: not assessed."""
    if photo.problem is not None:
        return "problem"
    if exam.diagnosis is not None and photo.index in exam.diagnosis.photos_used:
        return "used"
    return "accepted" if photo.usable else "retake"


def exam_response(
    exam: Exam,
    assessments: dict[int, AssessmentOut],
    *,
    request_id: str,
    language: str,
    versions: dict[str, str],
    contact_sheet: bool,
    seconds: float,
) -> ExamOut:
    retake = [_retake(exam.photos[i], language) for i in exam.retake]
    d = exam.diagnosis
    return ExamOut(
        id=request_id,
        decision=exam.decision,
        reasons=[ReasonOut(code=r, message=MESSAGES[language][r]) for r in exam.reasons],
        advice=_advice(exam, retake, language),
        photos=[_photo(p, assessments.get(p.index)) for p in exam.photos],
        retake=retake,
        review_index=exam.review,
        diagnosis=None
        if d is None
        else ExamDiagnosisOut(
            label=d.label,
            probability=round(d.probability, 4),
            referral=d.referral,
            method=d.method,
            photos_used=d.photos_used,
        ),
        contact_sheet_jpeg=_contact_sheet(exam) if contact_sheet else None,
        models=versions,
        timings_ms={"total": round(seconds * 1000.0, 2)},
    )


def _photo(photo: ExamPhoto, assessment: AssessmentOut | None) -> ExamPhotoOut:
    stage = photo.assessment.stage if photo.assessment else None
    problem = photo.problem
    return ExamPhotoOut(
        index=photo.index,
        stage=stage,  # type: ignore[arg-type]  # one of the quality manifest's stage labels
        stage_source="hint" if photo.stage_hint else "model",
        assessment=assessment,
        problem=None
        if problem is None
        else PartProblemOut(
            status=problem.status,
            code=problem.code,
            title=TITLES.get(problem.code, "Error"),
            detail=problem.detail,
        ),
    )


def _retake(photo: ExamPhoto, language: str) -> RetakeOut:
    if photo.problem is not None:
        return RetakeOut(
            index=photo.index, reasons=[], problem=photo.problem.code, advice=photo.problem.detail
        )
    assert photo.assessment is not None  # a photo is assessed unless it had a problem
    reasons = photo.assessment.reasons
    return RetakeOut(
        index=photo.index,
        reasons=[ReasonOut(code=r, message=MESSAGES[language][r]) for r in reasons],
        problem=None,
        advice=ADVICE[language][reasons[0]],
    )


def _advice(exam: Exam, retake: list[RetakeOut], language: str) -> str | None:
    """What to do next when the exam cannot be diagnosed yet: the exam's own reason, else the first retake."""
    if exam.diagnosis is not None:
        return None
    if exam.reasons:
        return ADVICE[language][exam.reasons[0]]
    return retake[0].advice if retake else None


def _contact_sheet(exam: Exam) -> str:
    tiles = []
    for photo in exam.photos:
        outcome = photo_outcome(exam, photo)
        stage = photo.assessment.stage if photo.assessment and photo.assessment.stage else "?"
        tiles.append(
            review.SheetTile(
                crop_rgb=photo.assessment.crop_rgb if photo.assessment else None,
                caption=f"#{photo.index} {stage}: {outcome}",
                verdict="retake" if outcome == "problem" else outcome,
            )
        )
    return review.contact_sheet_jpeg(tiles)
