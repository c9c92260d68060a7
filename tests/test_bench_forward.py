"""bench/bench_forward.py's ViT path on a small torchvision ViT (64 x 64, two encoder layers, random
weights): the layer and reshape_transform it gives pytorch-grad-cam, and its attention reference,
give gradmap's maps; so the speed table compares the same computation on both sides."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from test_timm import require

torch = require("torch")
torchvision = require("torchvision")
require("pytorch_grad_cam")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_forward  # noqa: E402

from gradmap.contract import Preprocessing  # noqa: E402
from gradmap.export import export_module  # noqa: E402
from gradmap.runtime.methods import MethodSpec, attribute  # noqa: E402
from gradmap.runtime.model import SaliencyModel  # noqa: E402

SIZE = 64


def _vit():
    from gradmap.export._torchvision import _fill_zero_weights

    torch.manual_seed(0)
    module = torchvision.models.vit_b_16(weights=None, image_size=SIZE, num_classes=10)
    module.encoder.layers = module.encoder.layers[:2]  # the lookup is what is checked, not the depth
    _fill_zero_weights(module)
    return module.eval()


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_vit")
    files = {}
    _, _, layer = bench_forward.reference_cam_layer(_vit())
    for name, options in {"cam": {"cam_layer": "auto"}, "named": {"cam_layer": layer},
                          "attention": {"attention": True}}.items():
        files[name] = folder / f"{name}.onnx"
        export_module(_vit(), files[name], preprocessing=Preprocessing(crop=(SIZE, SIZE), resize=None),
                      verify=False, **options)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    return {name: SaliencyModel(path, provider="cpu", threads=1) for name, path in files.items()}, image


def test_the_reference_layer_is_the_one_cam_layer_auto_finds(vit):
    models, _ = vit
    _, _, name = bench_forward.reference_cam_layer(_vit())
    assert name == "encoder.layers.encoder_layer_1.ln_1", name
    # the metadata names the graph value: "auto (VALUE, ...)" and "MODULE (VALUE)"
    auto, named = (models[k].metadata.cam_layer.split("(")[1].split(",")[0].rstrip(")") for k in ("cam", "named"))
    assert auto == named, \
        f"--cam-layer auto took {models['cam'].metadata.cam_layer}, the bench's layer is {models['named'].metadata.cam_layer}"


@pytest.mark.parametrize("method", ["hirescam", "xgrad-cam", "layer-cam", "eigen-cam", "score-cam"])
def test_pytorch_grad_cam_with_the_bench_reshape_gives_gradmaps_map(vit, method):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    models, image = vit
    model = models["cam"]
    target = int(model.run_outputs(image, None, ("target_index",))["target_index"][0])
    module = _vit().double().requires_grad_(True)  # float64: the reference's own rounding out of the way
    expected = bench_forward.reference_cam(module, method)(
        input_tensor=torch.from_numpy(image).double(), targets=[ClassifierOutputTarget(target)])
    ours = attribute(model, bench_forward.cam_spec(method), image, np.array([target]))[2][:, 0]
    assert ours.shape == expected.shape, f"{method}: {ours.shape} != {expected.shape}"
    assert ours.max() > ours.min(), f"{method}: gradmap's map is flat"
    err = float(np.abs(bench_forward._scaled(ours) - expected).max())
    assert err <= 1e-4, f"{method}: max |difference| {err:.3g} of maps in [0, 1]"


@pytest.mark.parametrize("method", ["attention-rollout", "attention-relevance"])
def test_the_attention_reference_gives_gradmaps_map(vit, method):
    models, image = vit
    model = models["attention"]
    targets = np.array([int(model.run_outputs(image, None, ("target_index",))["target_index"][0])])
    grid, upsampled = bench_forward.reference_attention(_vit(), method, (SIZE, SIZE))(torch.from_numpy(image),
                                                                                     int(targets[0]))
    ours = bench_forward.gradmap_attention_grid(model, method, image, targets)
    assert ours.shape == grid.shape == (4, 4), f"{method}: {ours.shape}, {tuple(grid.shape)}"
    expected = grid.detach().numpy()
    err = float(np.abs(ours - expected).max() / np.abs(expected).max())
    assert err <= 1e-4, f"{method}: max |difference| / max |reference| {err:.3g}"
    # and what the bench times: the method's map at the input size, as the reference's
    timed = attribute(model, MethodSpec(method), image, targets)[2][0, 0]
    assert timed.shape == tuple(upsampled.shape) == (SIZE, SIZE)
