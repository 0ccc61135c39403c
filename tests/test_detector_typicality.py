"""The detector's typicality gate (2.2.0): the network's `cervix_distance` is the training code's distance,
and the service and its start-up checks apply it as the manifest says."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.inference.manifest import Manifest, OutputSpec, read_manifest
from service.inference.runtime import ModelConfigurationError
from service.io.decoding import DecodeLimits, decode_upload
from service.pipeline.rules import _max_cervix_distance
from service.pipeline.stages import detect_cervix
from service.settings import Settings
from training import backbones
from training.tasks.detector import NEIGHBOUR_K, NeighbourBank, PretrainedDetector

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = backbones.HEAD_CHANNELS


def _with_bank(bank: NeighbourBank) -> PretrainedDetector:
    model = PretrainedDetector()  # random trunk: the distance is a function of whatever it pools
    model.bank_mean = torch.from_numpy(bank.mean.astype(np.float32))
    model.bank_scale = torch.from_numpy(bank.scale.astype(np.float32))
    model.bank = torch.from_numpy(bank.unit)
    return model.eval()


def test_the_networks_distance_is_the_training_codes() -> None:
    rng = np.random.default_rng(0)
    bank = NeighbourBank.fit(rng.normal(size=(40, CHANNELS)).astype(np.float32))
    model = _with_bank(bank)
    image = torch.from_numpy(rng.normal(size=(3, 3, 192, 192)).astype(np.float32))
    with torch.no_grad():
        pooled = model.trunk(image)["head"].mean(dim=(2, 3)).numpy()
        out = model(image)
    assert out["cervix_distance"].shape == (3, 1)
    np.testing.assert_allclose(out["cervix_distance"].numpy()[:, 0], bank.distance(pooled), atol=1e-5)


def test_the_distance_is_to_the_kth_nearest_view_not_the_nearest() -> None:
    rng = np.random.default_rng(1)
    photo = rng.normal(size=CHANNELS).astype(np.float32)
    others = rng.normal(size=(30, CHANNELS)).astype(np.float32)
    with_k = NeighbourBank.fit(np.vstack([others, np.repeat(photo[None], NEIGHBOUR_K, axis=0)]))
    one_fewer = NeighbourBank.fit(np.vstack([others, np.repeat(photo[None], NEIGHBOUR_K - 1, axis=0)]))
    assert with_k.distance(photo[None])[0] < 1e-4
    assert one_fewer.distance(photo[None])[0] > 0.5  # one look-alike view does not vouch for a photo


def test_a_saved_bank_of_any_size_loads_into_a_fresh_model() -> None:
    bank = NeighbourBank.fit(np.random.default_rng(2).normal(size=(17, CHANNELS)).astype(np.float32))
    state = _with_bank(bank).state_dict()
    fresh = PretrainedDetector()
    fresh.load_state_dict(state)
    assert fresh.bank.shape == (17, CHANNELS)
    assert torch.equal(fresh.bank, state["bank"])


class _FakeDetector:
    """The shipped detector's manifest with fixed outputs: a confident, centred cervix at `distance`."""

    def __init__(self, manifest: Manifest, distance: float | None) -> None:
        self.manifest = manifest
        self.distance = distance

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        out = {"cervix_logit": np.array([[4.0]], np.float32), "box": np.full((1, 4), 0.5, np.float32)}
        if self.distance is not None:
            out["cervix_distance"] = np.array([[self.distance]], np.float32)
        return out


def _photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((480, 640, 3), 128, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("distance", "max_distance", "found"),
    [
        (0.2, 0.3, True),
        (0.4, 0.3, False),  # a confident score does not make an atypical photo a cervix photo
        (0.4, None, True),  # gate off
        (None, 0.3, False),  # a gate without its output finds nothing rather than everything
    ],
)
def test_detect_cervix_applies_the_typicality_threshold(
    distance: float | None, max_distance: float | None, found: bool
) -> None:
    manifest = read_manifest(ROOT / "models" / "detector", verify=False)
    decoded = decode_upload(_photo(), DecodeLimits(max_pixels=50_000_000, min_side=64, decode_min_side=448))
    detection = detect_cervix(_FakeDetector(manifest, distance), decoded, 0.5, max_distance)
    assert detection.found is found
    assert detection.distance == (None if distance is None else pytest.approx(distance))
    assert (detection.box is not None) is found


def test_the_threshold_comes_from_the_manifest_unless_the_gate_is_turned_off() -> None:
    manifest = read_manifest(ROOT / "models" / "detector", verify=False)
    with_gate = manifest.model_copy(update={"thresholds": manifest.thresholds | {"cervix_distance": 0.25}})
    if "cervix_distance" not in {o.name for o in with_gate.outputs}:
        output = OutputSpec(name="cervix_distance", shape=("batch", 1), description="distance")
        with_gate = with_gate.model_copy(update={"outputs": [*with_gate.outputs, output]})
    assert _max_cervix_distance(with_gate, Settings()) == 0.25
    assert _max_cervix_distance(with_gate, Settings(cervix_typicality_gate=False)) is None
    without = with_gate.model_copy(update={"thresholds": {"cervix_present": 0.5}})
    assert _max_cervix_distance(without, Settings()) is None  # a 2.1.0-style detector: nothing to check


def test_a_threshold_without_its_output_is_refused_at_start_up() -> None:
    manifest = read_manifest(ROOT / "models" / "detector", verify=False)
    broken = manifest.model_copy(
        update={
            "thresholds": manifest.thresholds | {"cervix_distance": 0.25},
            "outputs": [o for o in manifest.outputs if o.name != "cervix_distance"],
        }
    )
    with pytest.raises(ModelConfigurationError, match="no cervix_distance output"):
        _max_cervix_distance(broken, Settings())
