"""Evaluation reports: `report.json` + `report.md` + PNG figures in one folder per model and split.

Reports carry no timestamps, versions or absolute paths, so rerunning an evaluation gives byte-identical JSON
and Markdown and `git diff` shows only real changes. Every report names the held-out split its numbers
come from.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global backend
switch), so this module is safe to import anywhere, including from tests and worker processes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from training.metrics import apply_threshold

# A figure for write_report: a callable given the PNG path to write (it may instead return a Figure), a
# ready Figure, an RGB image array, or the path of an existing PNG to copy in.
FigureSpec = Callable[[Path], Any] | Figure | np.ndarray | Path | str

_DPI = 120
_PNG_METADATA = {"Software": None}  # no matplotlib version in the file: reruns stay byte-identical
_THUMB = 256  # longest side of an example thumbnail, pixels


# ----------------------------------------------------------------------------------------------- JSON


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinity become null (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return value.as_posix()
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot write {type(value).__name__} to a report: {value!r}")


# ------------------------------------------------------------------------------------------- Markdown


def _is_fold_summary(value: Any) -> bool:
    return isinstance(value, Mapping) and {"mean", "sd", "folds"} <= value.keys()


def _is_interval(value: Any) -> bool:
    return isinstance(value, Mapping) and {"estimate", "low", "high"} <= value.keys()


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def format_value(value: Any) -> str:
    """One Markdown cell: `0.912 ± 0.031 (5 folds)` for a `mean_sd_over_folds` entry, `0.850 (95 % CI
    0.790–0.900)` for a `bootstrap_ci` result, 3 decimals for floats, `n/a` for None."""
    if _is_fold_summary(value):
        n_total = len(value["folds"])
        n_used = value.get("n_folds", sum(v is not None for v in value["folds"]))
        folds = (
            f"{n_used} fold{'s' if n_used != 1 else ''}"
            if n_used == n_total
            else f"{n_used} of {n_total} folds"
        )
        if value["mean"] is None:
            return f"n/a ({folds})"
        # Counts (n, support) get one decimal: their mean is a fraction of a sample, not a 3-digit score.
        counts = all(isinstance(v, int | np.integer) for v in value["folds"] if v is not None)
        fmt = "{:.1f}".format if counts else "{:.3f}".format
        if value["sd"] is None:
            return f"{fmt(value['mean'])} ({folds})"
        return f"{fmt(value['mean'])} ± {fmt(value['sd'])} ({folds})"
    if _is_interval(value):
        level = value.get("level", 0.95)
        if value["low"] is None or value["high"] is None:
            return f"{_fmt(value['estimate'])} (CI n/a)"
        unit = f", resampling {value['unit']}s" if value.get("unit") else ""
        interval = f"{_fmt(value['low'])}–{_fmt(value['high'])}"
        return f"{_fmt(value['estimate'])} ({level * 100:g} % CI {interval}{unit})"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return _fmt(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(metric, formatted value) rows in insertion order; nested dicts become dotted names. Lists of lists
    (confusion matrices, calibration bins) and long lists are left to their own section or report.json."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if _is_fold_summary(value) or _is_interval(value):
            rows.append((name, format_value(value)))
        elif isinstance(value, Mapping):
            rows += _rows(value, f"{name}.")
        elif isinstance(value, list | tuple | np.ndarray):
            flat = list(np.asarray(value, dtype=object).ravel()) if isinstance(value, np.ndarray) else value
            if len(flat) <= 10 and all(not isinstance(v, Mapping | list | tuple) for v in flat):
                rows.append((name, format_value(list(flat))))
        else:
            rows.append((name, format_value(value)))
    return rows


def _confusion_sections(metrics: Mapping[str, Any], prefix: str = "") -> list[str]:
    """A Markdown table for every `confusion_matrix` in `metrics` (rows true, columns predicted)."""
    sections: list[str] = []
    cm = metrics.get("confusion_matrix")
    if isinstance(cm, list | np.ndarray) and np.asarray(cm).ndim == 2:
        cm = np.asarray(cm)
        labels = metrics.get("labels")
        if not isinstance(labels, list | tuple) or len(labels) != len(cm):
            positive = metrics.get("positive_class")
            binary = (
                [f"not {positive} (0)", f"{positive} (1)"] if positive else ["negative (0)", "positive (1)"]
            )
            labels = binary if len(cm) == 2 else [str(i) for i in range(len(cm))]
        where = f" ({prefix.rstrip('.')})" if prefix else ""
        lines = [
            f"### Confusion matrix{where}",
            "",
            "Rows: true class; columns: predicted class.",
            "",
            "| true \\ predicted | " + " | ".join(_cell(str(x)) for x in labels) + " |",
            "|---|" + "---:|" * len(labels),
        ]
        lines += [
            f"| {_cell(str(label))} | " + " | ".join(str(int(c)) for c in row) + " |"
            for label, row in zip(labels, cm, strict=True)
        ]
        sections.append("\n".join(lines))
    for key, value in metrics.items():
        if isinstance(value, Mapping) and not (_is_fold_summary(value) or _is_interval(value)):
            sections += _confusion_sections(value, f"{prefix}{key}.")
    return sections


def render_markdown(
    name: str,
    metrics: Mapping[str, Any],
    *,
    split: str,
    figures: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The text of report.md (see `write_report`)."""
    lines = [f"# {name}", "", f"Held-out cases only: {split}", ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    lines += ["| metric | value | split |", "|---|---|---|"]
    lines += [f"| {_cell(metric)} | {_cell(value)} | {_cell(split)} |" for metric, value in _rows(metrics)]
    lines += ["", "Full detail, including per-fold values and calibration bins: `report.json`.", ""]
    for section in _confusion_sections(metrics):
        lines += [section, ""]
    if figures:
        lines += ["## Figures", ""]
        for key, file in figures.items():
            lines += [f"![{key}]({file})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------- writing


def _figure_file_name(key: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", key) or key.endswith(".png"):
        raise ValueError(f"figure name {key!r}: use letters, digits, '_', '-', '.' and no .png suffix")
    return f"{key}.png"


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # Agg explicitly, whatever backend pyplot may be using elsewhere
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, metadata=_PNG_METADATA)
    return path


def _write_figure(spec: FigureSpec, path: Path) -> None:
    if isinstance(spec, Figure):
        _save(spec, path)
    elif isinstance(spec, np.ndarray):
        Image.fromarray(np.asarray(spec, dtype=np.uint8)).save(path)
    elif isinstance(spec, str | Path):
        source = Path(spec)
        if not source.is_file():
            raise FileNotFoundError(f"figure {source} does not exist")
        if source.resolve() != path.resolve():
            shutil.copyfile(source, path)
    elif callable(spec):
        result = spec(path)
        if isinstance(result, Figure):
            _save(result, path)
        elif not path.is_file():
            raise ValueError(f"figure callable {spec!r} neither wrote {path} nor returned a Figure")
    else:
        raise TypeError(f"cannot make a figure from {type(spec).__name__}")


def write_report(
    out_dir: Path,
    name: str,
    metrics: Mapping[str, Any],
    *,
    split: str,
    figures: Mapping[str, FigureSpec] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write `out_dir/report.json`, `out_dir/report.md` and one `out_dir/<key>.png` per entry of `figures`.

    `metrics` is any nesting of dicts of numbers, strings, None and lists: the dicts from `training.metrics`,
    `mean_sd_over_folds` entries (rendered `0.912 ± 0.031 (5 folds)`) and `bootstrap_ci` results (rendered
    with their interval). `split` names the held-out cases (`iarc-gkf5-s0`, `synthetic-holdout-s0`) and heads
    the Markdown as "Held-out cases only: <split>". `figures` maps a file stem to a `FigureSpec`, e.g.
    `{"roc": lambda p: plot_roc(y, s, t, p, "CIN2+ ROC")}`. `notes` are caveats quoted under the header
    ("synthetic images only"). Returns the path of every file written, keyed "json", "md" and figure keys.
    Nothing written depends on time or machine, so reruns are diffable; PNGs from figures no longer produced
    are not deleted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    files: dict[str, str] = {}
    for key, spec in (figures or {}).items():
        path = out_dir / _figure_file_name(key)
        _write_figure(spec, path)
        written[key] = path
        files[key] = path.name
    report = {
        "name": name,
        "split": split,
        "notes": list(notes),
        "metrics": _jsonable(metrics),
        "figures": files,
    }
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )
    md_path.write_text(
        render_markdown(name, metrics, split=split, figures=files, notes=notes), encoding="utf-8"
    )
    return {"json": json_path, "md": md_path, **written}


# ---------------------------------------------------------------------------------------------- plots


def plot_roc(
    y_true: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    operating_threshold: float,
    path: Path,
    title: str = "ROC",
) -> Path:
    """ROC curve with the operating point (rule `score >= operating_threshold`) marked and its sensitivity and
    specificity written beside it. Needs both classes."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if y.all() or not y.any():
        raise ValueError("a ROC curve needs both classes")
    fpr, tpr, _ = roc_curve(y, s)
    auc = roc_auc_score(y, s)
    pred = apply_threshold(s, operating_threshold)
    sens = float(np.sum(pred & y) / y.sum())
    spec = float(np.sum(~pred & ~y) / (~y).sum())

    fig = _new_figure((5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    ax.plot(fpr, tpr, color="C0", linewidth=2, label=f"AUC {auc:.3f} (n={len(y)}, {int(y.sum())} positive)")
    ax.plot([1 - spec], [sens], "o", color="C3", markersize=8, label="operating point")
    ax.annotate(
        f"threshold {operating_threshold:.3g}\nsensitivity {sens:.3f}\nspecificity {spec:.3f}",
        xy=(1 - spec, sens),
        xytext=(0.45, 0.25),
        textcoords="axes fraction",
        arrowprops={"arrowstyle": "->", "color": "C3"},
        fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "C3"},
    )
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity (false positive rate)")
    ax.set(ylabel="sensitivity (true positive rate)", title=title, aspect="equal")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(
    cm: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str], path: Path, title: str
) -> Path:
    """Confusion matrix (rows true, columns predicted): counts and row percentages, shaded by row share."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(labels):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(labels)} labels")
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    k = len(labels)
    fig = _new_figure((1.4 * k + 2.2, 1.2 * k + 1.6))
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=10,
                color="white" if share[i, j] > 0.6 else "black",
            )
    ax.set_xticks(
        range(k), [str(x) for x in labels], rotation=30 if k > 2 else 0, ha="right" if k > 2 else "center"
    )
    ax.set_yticks(range(k), [str(x) for x in labels])
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return _save(fig, path)


def plot_calibration(calib_dict: Mapping[str, Any], path: Path, title: str) -> Path:
    """Reliability diagram from `training.metrics.calibration`: observed frequency against mean predicted
    probability per bin (the diagonal is perfect calibration), with the bin counts underneath."""
    bins = calib_dict["bins"]
    used = [b for b in bins if b["count"]]
    fig = _new_figure((5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfect calibration")
    top.plot(
        [b["mean_predicted"] for b in used],
        [b["observed_frequency"] for b in used],
        "o-",
        color="C0",
        label=f"model (ECE {calib_dict['ece']:.3f})",
    )
    top.set(ylim=(-0.02, 1.02), ylabel="observed frequency of class 1", title=title)
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(
        [(b["lower"] + b["upper"]) / 2 for b in bins],
        [b["count"] for b in bins],
        width=[b["upper"] - b["lower"] for b in bins],
        color="C0",
        alpha=0.6,
        edgecolor="white",
    )
    bottom.set(xlim=(0, 1), xlabel="mean predicted probability", ylabel="count")
    fig.tight_layout()
    return _save(fig, path)


def plot_examples(images: Sequence[np.ndarray], captions: Sequence[str], path: Path, cols: int = 6) -> Path:
    """A grid of example images (HxWx3 or HxW uint8, any sizes; each is thumbnailed to 256 px on its longest
    side) with a caption under each. An empty list gives a figure saying there are no examples."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    if cols < 1:
        raise ValueError("cols must be >= 1")
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = _new_figure((2.4 * cols, 2.7 * rows))
    if n == 0:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no examples", ha="center", va="center")
        ax.axis("off")
        return _save(fig, path)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, image, caption in zip(axes, images, captions, strict=False):
        thumb = Image.fromarray(np.asarray(image, dtype=np.uint8))
        thumb.thumbnail((_THUMB, _THUMB))
        ax.imshow(np.asarray(thumb), cmap="gray" if thumb.mode == "L" else None)
        ax.set_title("\n".join(textwrap.wrap(caption, 28)) or " ", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_metric_curve(
    x: Sequence[float],
    ys: Mapping[str, Sequence[float | None]],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """One line per series in `ys` against `x` (e.g. focus measure against blur strength); None is a gap."""
    fig = _new_figure((6, 4))
    ax = fig.add_subplot()
    for label, y in ys.items():
        if len(y) != len(x):
            raise ValueError(f"series {label!r} has {len(y)} values for {len(x)} x values")
        ax.plot(x, [np.nan if v is None else v for v in y], "o-", markersize=3, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ys:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
