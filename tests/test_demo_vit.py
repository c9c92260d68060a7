"""The committed demo vision transformer (models/demo_vit, ``models/make_demo_vit.py``): its file
holds what the attention methods and the token-map CAMs read, and its attention maps on the
evaluation pictures are the ones ``models/evaluate_demo.py --vit`` measured (quality.json).
torch-free: the runtime alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from gradmap import contract
from gradmap.runtime import SaliencyModel
from gradmap.runtime.evaluate import load_evaluation_data, saliency_maps
from gradmap.runtime.methods import MethodSpec
from gradmap.runtime.metrics import energy_pointing_game, pointing_game

ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / "models" / "demo_vit"
ATTENTION_METHODS = [m.name for m in contract.METHOD_TABLE if contract.OUTPUT_ATTENTION in m.outputs]


@pytest.fixture(scope="module")
def model():
    return SaliencyModel(VIT / "shapes_vit.onnx", provider="cpu", threads=1)


@pytest.fixture(scope="module")
def quality():
    return json.loads((VIT / "quality.json").read_text())


def test_the_file_holds_the_attention_and_the_token_map(model):
    meta = model.metadata
    assert meta.attention is not None, "exported without --attention"
    assert (meta.attention["layers"], meta.attention["tokens"], list(meta.attention["grid"])) == (4, 65, [8, 8])
    assert meta.attention["prefix_tokens"] == 1 and list(meta.attention["readout"]) == [0]
    assert meta.cam_layer is not None and "8x8 patch grid" in meta.cam_layer, meta.cam_layer
    assert set(ATTENTION_METHODS) <= set(meta.methods)
    assert meta.labels == ("circle", "square", "triangle", "cross", "star")


@pytest.mark.parametrize("name", ATTENTION_METHODS)
def test_attention_maps_score_what_quality_json_records(model, quality, name):
    """All 200 evaluation pictures (an attention map is one forward and backward pass): the pointing
    games of the maps computed now equal the table's, up to one picture whose maximum a float
    rounding could move."""
    recorded = quality["methods"][name]
    tolerance_px = quality["settings"]["pointing_tolerance_px"]
    data = load_evaluation_data(ROOT / quality["data"], model.metadata.preprocessing, model.metadata.labels)
    assert len(data.images) == quality["images"] == recorded["pointing_game"]["n"]
    maps, targets = saliency_maps(model, MethodSpec(name), data.images, data.labels)
    assert maps.shape == data.masks.shape and np.isfinite(maps).all()
    assert (targets == data.labels).all()
    within = [ndimage.distance_transform_edt(~m) <= tolerance_px for m in data.masks]
    strict = np.mean([pointing_game(m, k) for m, k in zip(maps, data.masks)])
    tolerant = np.mean([pointing_game(m, w) for m, w in zip(maps, within)])
    energy = np.mean([energy_pointing_game(m, k) for m, k in zip(maps, data.masks)])
    one_picture = 1 / len(maps)
    assert abs(strict - recorded["pointing_game"]["mean"]) <= one_picture + 1e-12, (strict, recorded["pointing_game"])
    assert abs(tolerant - recorded["pointing_game_tolerance"]["mean"]) <= one_picture + 1e-12, tolerant
    assert abs(energy - recorded["energy_pointing_game"]["mean"]) <= 1e-4, (energy, recorded["energy_pointing_game"])
