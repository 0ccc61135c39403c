"""The generic export step: PyTorch model -> `model.onnx` + `manifest.json` + `MODEL_CARD.md`.

Every model's `export` command ends here, so the checks live in one place:

1. export with the torch.export-based ONNX exporter (`torch.onnx.export(dynamo=True)`), input named
   as the manifest says, outputs named and ordered as the manifest says, a dynamic batch axis, weights
   embedded in the one file;
2. `onnx.checker.check_model(full_check=True)` and a check that the graph's inputs and outputs have
   the shapes the manifest promises;
3. parity: PyTorch and ONNX Runtime (CPU) on every caller-prepared input and on a stacked batch of 2,
   max abs diff <= atol for every output, else `ExportParityError`;
4. latency in ONNX Runtime at batch 1 (1 thread and ORT's default), reported, never asserted;
5. the manifest (sha256 of the file, export facts under `extra["export"]`), re-read with
   `read_manifest` exactly as the service does, and a model card rendered from it.

Why the dynamo exporter: the TorchScript exporter (`dynamo=False`) warns it is deprecated and "will be
removed" in torch 2.14, and leaves `Identity`/`Constant` clutter and anonymous output dims behind; the
dynamo exporter, after its own onnxscript optimisation pass, gives a smaller graph (BatchNorm folded into
Conv, no Identity nodes), static output dims and the same ONNX Runtime latency. Its lowest native opset
is 18: asking it for 17 makes onnxscript's down-conversion fail (logged, not raised) and it silently
keeps 18, so opset 17 is refused here rather than misreported.

Int8: no quantisation here on purpose. Whether dynamic/static int8 keeps each model's metrics is measured
by the evaluation/benchmark step on the exported float model; this step only ships what parity proves.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from service.inference.manifest import (
    MODEL_FILENAME,
    InputSpec,
    Manifest,
    OutputSpec,
    read_manifest,
    sha256_of,
    write_manifest,
)

log = logging.getLogger(__name__)

CARD_FILENAME = "MODEL_CARD.md"
MIN_OPSET = 18  # the dynamo exporter's lowest native opset; see the module docstring
DEFAULT_OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"
_BATCH_DIM = "batch"
_PLACEHOLDER_SHA = "0" * 64


class ExportParityError(AssertionError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the allowed tolerance."""


@dataclass(frozen=True, kw_only=True)
class ExportSpec:
    """Everything the manifest needs that the export step cannot measure itself (keyword-only)."""

    name: str
    version: str
    input: InputSpec
    outputs: tuple[OutputSpec, ...]
    labels: dict[str, list[str]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)
    metrics: dict[str, object] = field(default_factory=dict)
    training_data: dict[str, object] = field(default_factory=dict)
    command: str
    intended_use: str
    limitations: str
    changelog: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExportResult:
    model_path: Path
    manifest_path: Path
    card_path: Path
    manifest: Manifest
    sha256: str
    opset: int
    parity_max_abs_diff: dict[str, float]
    latency_ms: dict[str, dict[str, float]]  # {"threads_1" | "threads_default": {"median", "p90"}}
    export_seconds: float


def ort_session(model_path: Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU ONNX Runtime session with every graph optimisation; `threads=None` keeps ORT's default."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def export_onnx(
    model: torch.nn.Module,
    spec: ExportSpec,
    out_dir: Path,
    *,
    parity_inputs: list[np.ndarray],
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
    latency_warmup: int = 10,
    latency_runs: int = 50,
) -> ExportResult:
    """Export, check, prove parity, time, and write model.onnx + manifest.json + MODEL_CARD.md to out_dir.

    `parity_inputs` are 1xCxHxW float32 arrays already made by `service.inference.preprocess.prepare` (include
    real images). The model may return a dict keyed by output name (preferred: matched by name), a
    tensor (one output) or a tuple/list (matched by position). Nothing in out_dir is replaced unless
    every check passes.
    """
    started = time.perf_counter()
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} < {MIN_OPSET}: the dynamo exporter cannot target it (see module doc)"
        )
    inputs = _check_parity_inputs(parity_inputs, spec.input)
    output_names = [o.name for o in spec.outputs]
    _check_spec(spec)
    _build_manifest(spec, _PLACEHOLDER_SHA, {})  # fail on a bad version/field before minutes of work

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    wrapped = _NamedOutputs(model, output_names).eval()
    try:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
            staged = Path(tmp) / MODEL_FILENAME
            proto = _export(wrapped, inputs[0], spec, opset)
            onnx.save_model(proto, str(staged))
            onnx.checker.check_model(str(staged), full_check=True)
            actual_opset = _check_graph(onnx.load(str(staged)), spec, opset)

            parity = _parity(wrapped, staged, inputs, spec, output_names, atol)
            latency = {
                "threads_1": _latency(
                    ort_session(staged, 1), spec.input.name, inputs[0], latency_warmup, latency_runs
                ),
                "threads_default": _latency(
                    ort_session(staged), spec.input.name, inputs[0], latency_warmup, latency_runs
                ),
            }
            model_path = out_dir / MODEL_FILENAME
            os.replace(staged, model_path)
    finally:
        model.train(was_training)

    digest = sha256_of(model_path)
    export_info: dict[str, object] = {
        "exporter": EXPORTER,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "opset": actual_opset,
        "file_bytes": model_path.stat().st_size,
        "parity_atol": atol,
        "parity_inputs": len(inputs),
        "parity_max_abs_diff": parity,
        "latency_ms_batch1": latency,
        "latency_warmup_and_runs": [latency_warmup, latency_runs],
        "latency_host": {"machine": platform.machine(), "cpu_count": os.cpu_count()},
    }
    manifest_path = write_manifest(out_dir, _build_manifest(spec, digest, export_info))
    manifest = read_manifest(out_dir)  # exactly what the service will do: validates and checks the hash
    card_path = out_dir / CARD_FILENAME
    card_path.write_text(render_model_card(manifest))
    elapsed = time.perf_counter() - started
    log.info(
        "exported %s %s to %s in %.1f s: opset %d, parity %s, latency(1 thread) %.2f ms median",
        spec.name,
        spec.version,
        model_path,
        elapsed,
        actual_opset,
        parity,
        latency["threads_1"]["median"],
    )
    return ExportResult(
        model_path=model_path,
        manifest_path=manifest_path,
        card_path=card_path,
        manifest=manifest,
        sha256=digest,
        opset=actual_opset,
        parity_max_abs_diff=parity,
        latency_ms=latency,
        export_seconds=elapsed,
    )


class _NamedOutputs(torch.nn.Module):
    """Returns the model's outputs as a tuple in manifest order, so ONNX names match by key, not by luck."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        if isinstance(out, Mapping):
            missing = [n for n in self.names if n not in out]
            if missing or len(out) != len(self.names):
                raise ValueError(
                    f"model returns {sorted(out)} but the manifest lists outputs {list(self.names)}"
                )
            return tuple(out[n] for n in self.names)
        if isinstance(out, torch.Tensor):
            out = (out,)
        out = tuple(out)
        if len(out) != len(self.names):
            raise ValueError(f"model returns {len(out)} outputs but the manifest lists {list(self.names)}")
        return out


def _check_spec(spec: ExportSpec) -> None:
    names = [o.name for o in spec.outputs]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"outputs must be non-empty with unique names, got {names}")
    if spec.input.name in names:
        raise ValueError(f"input name {spec.input.name!r} is also an output name")
    for o in spec.outputs:
        if not o.shape or not isinstance(o.shape[0], str):
            raise ValueError(
                f"output {o.name!r}: the first dim must be the symbolic batch dim, got {o.shape}"
            )
    unknown = set(spec.labels) - set(names)
    if unknown:
        raise ValueError(f"labels for unknown outputs {sorted(unknown)}; outputs are {names}")
    blank = [f for f in ("command", "intended_use", "limitations") if not getattr(spec, f).strip()]
    if blank:
        raise ValueError(f"{blank} must not be empty: the model card and the service show them")
    if "export" in spec.extra:
        raise ValueError('extra["export"] is reserved for the facts the export step measures')


def _check_parity_inputs(arrays: Sequence[np.ndarray], spec: InputSpec) -> list[np.ndarray]:
    if not arrays:
        raise ValueError("parity_inputs is empty: pass prepare()d inputs, including real images")
    want = (1, len(spec.channels), spec.height, spec.width)
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != want:
            got = (getattr(a, "dtype", type(a)), getattr(a, "shape", None))
            raise ValueError(
                f"parity_inputs[{i}] is {got}; expected float32 {want} "
                "from service.inference.preprocess.prepare"
            )
    return [np.ascontiguousarray(a) for a in arrays]


def _export(wrapped: torch.nn.Module, example: np.ndarray, spec: ExportSpec, opset: int) -> onnx.ModelProto:
    # Trace with a batch of 2: torch.export specialises size-1 dims, and 2 keeps the batch axis honest.
    sample = torch.from_numpy(np.concatenate([example, example]))
    batch = torch.export.Dim(_BATCH_DIM, min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapped,
            (sample,),
            input_names=[spec.input.name],
            output_names=[o.name for o in spec.outputs],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: batch},),
            external_data=False,
            optimize=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover - only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
    proto = program.model_proto
    _strip_metadata(proto)
    proto.producer_name = "cervigate"
    proto.producer_version = spec.version
    proto.doc_string = f"{spec.name} {spec.version}"
    return proto


def _strip_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's debug metadata (stack traces with absolute paths): smaller, reproducible."""

    def graphs(graph: onnx.GraphProto):
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(attr.g)
                for g in attr.graphs:
                    yield from graphs(g)

    del proto.metadata_props[:]
    for graph in graphs(proto.graph):
        del graph.metadata_props[:]  # ExportedProgram signature and range constraints
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        for info in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            del info.metadata_props[:]
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in value.type.tensor_type.shape.dim
    ]


def _check_graph(proto: onnx.ModelProto, spec: ExportSpec, opset: int) -> int:
    """The graph must match the manifest: names, symbolic batch, fixed dims, opset, embedded weights."""
    actual_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if actual_opset != opset:
        raise RuntimeError(f"asked for opset {opset}, the exporter wrote {actual_opset}")
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer):
        raise RuntimeError("model.onnx refers to external weight data; weights must be embedded")
    graph_inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if [i.name for i in graph_inputs] != [spec.input.name]:
        raise RuntimeError(
            f"graph inputs {[i.name for i in graph_inputs]}, manifest says [{spec.input.name!r}]"
        )
    in_dims = _dims(graph_inputs[0])
    want_in = [len(spec.input.channels), spec.input.height, spec.input.width]
    if len(in_dims) != 4 or not isinstance(in_dims[0], str) or in_dims[1:] != want_in:
        raise RuntimeError(f"graph input dims {in_dims}, want [batch, *{want_in}] with a symbolic batch")
    if [o.name for o in proto.graph.output] != [o.name for o in spec.outputs]:
        raise RuntimeError(
            f"graph outputs {[o.name for o in proto.graph.output]}, manifest says {spec.outputs}"
        )
    for value, out in zip(proto.graph.output, spec.outputs, strict=True):
        dims = _dims(value)
        ok = len(dims) == len(out.shape) and all(
            (isinstance(w, str) and isinstance(d, str)) or (isinstance(w, int) and d == w)
            for d, w in zip(dims, out.shape, strict=True)
        )
        if not ok:
            raise RuntimeError(
                f"output {out.name!r} has dims {dims} in the graph, manifest says {list(out.shape)}"
            )
    return actual_opset


def _parity(
    wrapped: torch.nn.Module,
    model_path: Path,
    inputs: list[np.ndarray],
    spec: ExportSpec,
    names: list[str],
    atol: float,
) -> dict[str, float]:
    session = ort_session(model_path)
    # A batch of 2 proves the dynamic axis and that rows do not leak into each other; with a single
    # parity input the second row is its mirror image, so the two rows still differ.
    second = inputs[1] if len(inputs) > 1 else np.ascontiguousarray(inputs[0][..., ::-1])
    cases = [(f"parity_inputs[{i}]", x) for i, x in enumerate(inputs)]
    cases.append(("stacked batch of 2", np.concatenate([inputs[0], second])))
    worst = dict.fromkeys(names, 0.0)
    for label, x in cases:
        with torch.inference_mode():
            expected = [t.detach().cpu().numpy() for t in wrapped(torch.from_numpy(x.copy()))]
        actual = session.run(names, {spec.input.name: x})
        for name, e, a in zip(names, expected, actual, strict=True):
            if e.shape != a.shape:
                raise ExportParityError(
                    f"output {name!r} on {label}: torch shape {e.shape}, onnx shape {a.shape}"
                )
            diff = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)))) if e.size else 0.0
            if not diff <= atol:  # also catches NaN
                raise ExportParityError(
                    f"output {name!r} on {label}: max abs diff {diff:.3g} between PyTorch and ONNX Runtime "
                    f"exceeds atol {atol:g}"
                )
            worst[name] = max(worst[name], diff)
    return worst


def _latency(
    session: onnxruntime.InferenceSession, input_name: str, x: np.ndarray, warmup: int, runs: int
) -> dict[str, float]:
    feed = {input_name: x}
    for _ in range(max(0, warmup)):
        session.run(None, feed)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": round(float(np.median(times)), 3), "p90": round(float(np.percentile(times, 90)), 3)}


def _build_manifest(spec: ExportSpec, digest: str, export_info: dict[str, object]) -> Manifest:
    extra = dict(spec.extra)
    if export_info:
        extra["export"] = export_info
    return Manifest(
        name=spec.name,
        version=spec.version,
        sha256=digest,
        input=spec.input,
        outputs=spec.outputs,
        labels=spec.labels,
        thresholds=spec.thresholds,
        extra=extra,
        metrics=spec.metrics,
        training_data=spec.training_data,
        command=spec.command,
        intended_use=spec.intended_use,
        limitations=spec.limitations,
        changelog=spec.changelog,
    )


# ---------------------------------------------------------------------------------------------------------
# Model card


def _cell(value: object) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}" if math.isfinite(value) else str(value)
    elif isinstance(value, list | tuple):
        text = ", ".join(_cell(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ").strip() or "—"


def _flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, Mapping):
        rows: list[tuple[str, object]] = []
        for key, sub in value.items():
            rows += _flatten(sub, f"{prefix}.{key}" if prefix else str(key))
        return rows
    return [(prefix, value)]


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _kv_section(title: str, value: Mapping[str, object], empty: str, key_name: str = "key") -> list[str]:
    lines = [f"## {title}", ""]
    rows = _flatten(value)
    lines += _table([key_name, "value"], rows) if rows else [empty]
    return [*lines, ""]


def render_model_card(manifest: Manifest) -> str:
    """A human-readable card with everything in the manifest; regenerated on every export."""
    spec = manifest.input
    lines = [
        f"# {manifest.name} {manifest.version}",
        "",
        "Generated by `training/export.py` from `manifest.json`; do not edit by hand.",
        "",
        f"- **sha256 of {MODEL_FILENAME}:** `{manifest.sha256}`",
        "",
        "## Intended use",
        "",
        manifest.intended_use or "—",
        "",
        "## Limitations",
        "",
        manifest.limitations or "—",
        "",
        "## Input",
        "",
        f"ONNX input `{spec.name}`: float32 NCHW "
        f"`[batch, {len(spec.channels)}, {spec.height}, {spec.width}]`.",
        "",
    ]
    resize = {
        "stretch": "stretch to width x height, ignoring aspect ratio",
        "letterbox": f"letterbox: keep aspect ratio, pad with {spec.pad_value} (uint8) to width x height",
    }[spec.resize]
    lines += _table(
        ["setting", "value"],
        [
            ("size (width x height)", f"{spec.width} x {spec.height}"),
            ("resize rule", resize),
            ("interpolation", spec.interpolation),
            ("scale (applied to uint8 before mean/std)", spec.scale),
            ("value range after scale", spec.value_range),
            ("normalisation", "(pixel * scale - mean) / std, per channel"),
        ],
    )
    lines += ["", "Channels, in order:", ""]
    lines += _table(
        ["index", "channel", "mean", "std"],
        [(i, c, m, s) for i, (c, m, s) in enumerate(zip(spec.channels, spec.mean, spec.std, strict=True))],
    )
    lines += ["", "## Outputs", ""]
    lines += _table(
        ["name", "shape", "description", "labels"],
        [
            (
                o.name,
                "[" + ", ".join(str(d) for d in o.shape) + "]",
                o.description,
                manifest.labels.get(o.name, []),
            )
            for o in manifest.outputs
        ],
    )
    lines += [""]
    lines += _kv_section("Thresholds", manifest.thresholds, "No thresholds.", "threshold")
    lines += _kv_section("Metrics", manifest.metrics, "No metrics recorded.", "split.metric")
    lines += _kv_section("Training data", manifest.training_data, "Not recorded.")
    settings = {k: v for k, v in manifest.extra.items() if k != "export"}
    if settings:
        lines += _kv_section("Model-specific settings", settings, "")
    export = manifest.extra.get("export")
    if isinstance(export, Mapping):
        lines += _kv_section("Export", export, "")
    lines += ["## Reproduce", "", "```", manifest.command, "```", "", "## Changelog", ""]
    lines += [f"- {entry}" for entry in manifest.changelog] or ["- (none)"]
    return "\n".join(lines) + "\n"
