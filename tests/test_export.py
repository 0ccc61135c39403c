"""The generic export step: ONNX file, parity, dynamic batch, manifest and model card, on tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import pytest
import torch

from service.inference.manifest import (
    MANIFEST_FILENAME,
    MODEL_FILENAME,
    InputSpec,
    ModelIntegrityError,
    OutputSpec,
    read_manifest,
    sha256_of,
)
from service.inference.preprocess import prepare
from training import export as export_mod
from training.export import (
    CARD_FILENAME,
    ExportParityError,
    ExportResult,
    ExportSpec,
    export_onnx,
    ort_session,
)

WIDTH, HEIGHT = 48, 40  # not square, so a swapped H/W shows up
FAST = {"latency_warmup": 2, "latency_runs": 5}
COMMAND = "python -m training.tiny export --out models/tiny"


class TwoHeads(torch.nn.Module):
    """Two convs, global pool, a 1-logit head and a 4-box head; returns outputs in non-manifest order."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, 8, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Dropout(0.5),  # must be off in the export: eval() is the exporter's job
        )
        self.logit = torch.nn.Linear(16, 1)
        self.box = torch.nn.Linear(16, 4)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.body(image)
        return {"box": torch.sigmoid(self.box(pooled)), "cervix_logit": self.logit(pooled)}


class TinySeg(torch.nn.Module):
    """Segmentation-style: a logit map at input resolution (Bx1xHxW)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.out = torch.nn.Conv2d(8, 1, 1)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.out(torch.relu(self.down(image)))
        size = (image.shape[-2], image.shape[-1])
        return {"lesion_logits": torch.nn.functional.interpolate(low, size=size, mode="bilinear")}


def _input_spec(channels: tuple[str, ...], resize: Literal["stretch", "letterbox"]) -> InputSpec:
    n = len(channels)
    return InputSpec(
        name="image",
        width=WIDTH,
        height=HEIGHT,
        channels=channels,
        resize=resize,
        pad_value=114,
        scale=1 / 255,
        value_range=(0.0, 1.0),
        mean=(0.485, 0.456, 0.406, 0.5)[:n],
        std=(0.229, 0.224, 0.225, 0.5)[:n],
    )


def _spec(input_spec: InputSpec, outputs: tuple[OutputSpec, ...], **changes: object) -> ExportSpec:
    fields: dict[str, object] = {
        "name": "tiny",
        "version": "0.1.0",
        "input": input_spec,
        "outputs": outputs,
        "labels": {},
        "thresholds": {"cervix_present": 0.5},
        "extra": {"crop_margin": 0.1},
        "metrics": {"test": {"auroc": 0.91, "n": 120}, "val": {"auroc": 0.93}},
        "training_data": {"source": "synthetic", "images": 64},
        "command": COMMAND,
        "intended_use": "Unit test of the export step.",
        "limitations": "Random weights.",
        "changelog": ["0.1.0: first export"],
    }
    fields.update(changes)
    return ExportSpec(**fields)  # type: ignore[arg-type]


def _images(channels: int) -> list[np.ndarray]:
    """Synthetic 'photos' of other sizes and aspects than the model input, so fit() really resizes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:130]
    smooth = np.stack([(xx * 2) % 256, (yy * 3) % 256, (xx + yy) % 256, (xx * yy) % 256], axis=-1)
    noisy = rng.integers(0, 256, size=(61, 37, 4))
    return [smooth[..., :channels].astype(np.uint8), noisy[..., :channels].astype(np.uint8)]


def _prepared(spec: InputSpec) -> list[np.ndarray]:
    return [prepare(image, spec)[0] for image in _images(len(spec.channels))]


TWO_HEAD_OUTPUTS = (
    OutputSpec(name="cervix_logit", shape=("batch", 1), description="cervix-present logit"),
    OutputSpec(name="box", shape=("batch", 4), description="cx, cy, w, h in 0..1 of the input"),
)
SEG_OUTPUTS = (
    OutputSpec(name="lesion_logits", shape=("batch", 1, HEIGHT, WIDTH), description="lesion logit map"),
)


@pytest.fixture(scope="module")
def two_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[TwoHeads, ExportSpec, ExportResult]:
    torch.manual_seed(0)
    model = TwoHeads(3)
    model.train()  # the exporter must switch it to eval
    spec = _spec(
        _input_spec(("R", "G", "B"), "letterbox"), TWO_HEAD_OUTPUTS, labels={"cervix_logit": ["cervix"]}
    )
    result = export_onnx(
        model, spec, tmp_path_factory.mktemp("two_head"), parity_inputs=_prepared(spec.input), **FAST
    )
    return model, spec, result


def test_export_writes_a_checked_self_contained_model(
    two_head: tuple[TwoHeads, ExportSpec, ExportResult],
) -> None:
    model, _, result = two_head
    out_dir = result.model_path.parent
    onnx.checker.check_model(str(result.model_path), full_check=True)
    proto = onnx.load(str(result.model_path))
    assert result.opset >= 18
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [MODEL_FILENAME, MANIFEST_FILENAME, CARD_FILENAME]
    )
    # no debug metadata (stack traces with absolute paths) left in the shipped file
    assert not any(node.metadata_props for node in proto.graph.node)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["cervix_logit", "box"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert model.training  # the caller's mode is restored


def test_manifest_validates_and_matches_the_file(two_head: tuple[TwoHeads, ExportSpec, ExportResult]) -> None:
    _, spec, result = two_head
    manifest = read_manifest(result.model_path.parent)
    assert manifest == result.manifest
    assert manifest.sha256 == sha256_of(result.model_path) == result.sha256
    assert manifest.input == spec.input and manifest.outputs == spec.outputs
    assert manifest.command == COMMAND and manifest.extra["crop_margin"] == 0.1
    info = manifest.extra["export"]
    assert isinstance(info, dict)
    assert info["opset"] == result.opset and info["exporter"] == "torch.onnx.export(dynamo=True)"
    assert info["parity_max_abs_diff"] == result.parity_max_abs_diff
    assert set(info["latency_ms_batch1"]) == {"threads_1", "threads_default"}
    for stats in result.latency_ms.values():
        assert 0 < stats["median"] <= stats["p90"]


def test_parity_and_dynamic_batch_with_prepared_images(
    two_head: tuple[TwoHeads, ExportSpec, ExportResult],
) -> None:
    model, spec, result = two_head
    assert set(result.parity_max_abs_diff) == {"cervix_logit", "box"}
    assert all(d <= 1e-4 for d in result.parity_max_abs_diff.values())
    # batch 3: two prepare()d images and a mirrored one, named outputs in manifest order
    first, second = _prepared(spec.input)
    batch = np.concatenate([first, second, first[..., ::-1]])
    logit, box = ort_session(result.model_path, threads=1).run(["cervix_logit", "box"], {"image": batch})
    model.eval()
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch))
    model.train()
    assert logit.shape == (3, 1) and box.shape == (3, 4)
    np.testing.assert_allclose(logit, expected["cervix_logit"].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(box, expected["box"].numpy(), rtol=0, atol=1e-4)
    assert not np.allclose(box[0], box[1])  # rows really differ: the batch is not broadcast


def test_model_card_renders_the_manifest(two_head: tuple[TwoHeads, ExportSpec, ExportResult]) -> None:
    _, _, result = two_head
    card = result.card_path.read_text()
    assert card.startswith("# tiny 0.1.0")
    for needle in (
        COMMAND,
        "| 0 | R | 0.485 | 0.229 |",
        "| 2 | B | 0.406 | 0.225 |",
        "letterbox",
        "pad with 114",
        "48 x 40",
        "cervix_logit",
        "cx, cy, w, h",
        "| test.auroc | 0.91 |",
        "| val.auroc | 0.93 |",
        "cervix_present",
        "synthetic",
        "Random weights.",
        "0.1.0: first export",
        result.sha256,
    ):
        assert needle in card, needle


def test_four_channel_segmentation_export(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TinySeg(4)
    spec = _spec(_input_spec(("R", "G", "B", "lesion_probability"), "stretch"), SEG_OUTPUTS, thresholds={})
    result = export_onnx(model, spec, tmp_path, parity_inputs=_prepared(spec.input), **FAST)
    assert result.parity_max_abs_diff["lesion_logits"] <= 1e-4
    assert read_manifest(tmp_path).input.channels[-1] == "lesion_probability"
    batch = np.concatenate([*_prepared(spec.input), _prepared(spec.input)[0]])
    (maps,) = ort_session(result.model_path).run(None, {"image": batch})
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch))["lesion_logits"].numpy()
    assert maps.shape == (3, 1, HEIGHT, WIDTH)
    np.testing.assert_allclose(maps, expected, rtol=0, atol=1e-4)
    card = result.card_path.read_text()
    assert "| 3 | lesion_probability | 0.5 | 0.5 |" in card and "stretch" in card


def test_broken_parity_raises_and_leaves_out_dir_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(2)
    model = TwoHeads(3)
    spec = _spec(_input_spec(("R", "G", "B"), "letterbox"), TWO_HEAD_OUTPUTS)
    real_export = export_mod._export

    def export_then_change_the_model(*args: Any) -> onnx.ModelProto:
        proto = real_export(*args)
        with torch.no_grad():
            model.box.bias.add_(0.5)  # the ONNX file no longer matches the PyTorch model
        return proto

    monkeypatch.setattr(export_mod, "_export", export_then_change_the_model)
    with pytest.raises(ExportParityError, match=r"output 'box' on parity_inputs\[0\]: max abs diff"):
        export_onnx(model, spec, tmp_path, parity_inputs=_prepared(spec.input), **FAST)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no staging dir left


def test_tampered_model_is_refused(
    two_head: tuple[TwoHeads, ExportSpec, ExportResult], tmp_path: Path
) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(two_head[2].model_path.parent, copy)
    read_manifest(copy)
    data = bytearray((copy / MODEL_FILENAME).read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    (copy / MODEL_FILENAME).write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        read_manifest(copy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parity_inputs": []}, "parity_inputs is empty"),
        ({"parity_inputs": [np.zeros((1, 3, WIDTH, HEIGHT), np.float32)]}, r"parity_inputs\[0\]"),
        ({"parity_inputs": [np.zeros((1, 3, HEIGHT, WIDTH), np.float64)]}, r"parity_inputs\[0\]"),
        ({"opset": 17}, "opset 17"),
    ],
)
def test_bad_arguments_fail_before_exporting(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    spec = _spec(_input_spec(("R", "G", "B"), "letterbox"), TWO_HEAD_OUTPUTS)
    arguments: dict[str, object] = {"parity_inputs": _prepared(spec.input), **kwargs}
    with pytest.raises(ValueError, match=message):
        export_onnx(TwoHeads(3), spec, tmp_path, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": "1.0"}, "version"),
        ({"labels": {"nope": ["a"]}}, "unknown outputs"),
        ({"command": " "}, "command"),
        ({"extra": {"export": {}}}, "reserved"),
    ],
)
def test_bad_spec_fails_before_exporting(changes: dict[str, object], message: str, tmp_path: Path) -> None:
    spec = _spec(_input_spec(("R", "G", "B"), "letterbox"), TWO_HEAD_OUTPUTS, **changes)
    with pytest.raises(ValueError, match=message):
        export_onnx(TwoHeads(3), spec, tmp_path, parity_inputs=_prepared(spec.input), **FAST)


def test_export_is_reproducible(tmp_path: Path) -> None:
    """Same weights, same bytes: a re-export does not churn the committed model.onnx or its sha256."""
    spec = _spec(_input_spec(("R", "G", "B"), "letterbox"), TWO_HEAD_OUTPUTS)
    digests = []
    for run in ("a", "b"):
        torch.manual_seed(3)
        result = export_onnx(TwoHeads(3), spec, tmp_path / run, parity_inputs=_prepared(spec.input), **FAST)
        digests.append(result.sha256)
    assert digests[0] == digests[1]
    assert Path(__file__).name.encode() not in (tmp_path / "a" / MODEL_FILENAME).read_bytes()  # stack traces
