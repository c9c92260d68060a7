"""End to end: export torchvision's resnet18 (random weights), run `gradmap run` on real photos, and
compare the saved map with one computed independently from torch autograd and the ResNet-50 recipe.

Needs torch, torchvision and a working ``gradmap.export``; skipped otherwise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import image_info, assert_close
from gradmap.cli import main

pytestmark = [pytest.mark.export, pytest.mark.slow]

# The ONNX graph and torch differ by float32 rounding through 18 layers and their backward pass; on
# the min-max normalized map (values in [0, 1]) that stays far below 1e-4 -- except where a max-pool
# window holds a near-tie. On rocket.png one window of the stem's MaxPool has its two largest values
# 0.05271689 and 0.05271687 (relative gap 4e-7, a few ulp): onnxruntime's convolution rounds them in
# the other order, the gradient goes to the other input position, and a ~10x10 block (89 of 50,176
# pixels) differs by up to 0.015. No tolerance fixes an argmax flip, so the test requires 1e-4 on all
# but MAX_TIE_FRACTION of the pixels, and a median difference at float32 rounding level.
MAP_TOLERANCE = 1e-4
MAX_TIE_FRACTION = 0.005
MEDIAN_TOLERANCE = 1e-6
PROBABILITY_TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def resnet18_export(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    try:
        from gradmap.export import export_torchvision
        from gradmap.export._torchvision import load_torchvision
    except ImportError as e:
        pytest.skip(f"gradmap.export is not available: {e}")
    path = tmp_path_factory.mktemp("e2e") / "resnet18.onnx"
    try:
        export_torchvision("resnet18", path, weights="none", seed=0, verify=False)
    except Exception as e:  # the exporter is developed concurrently; do not fail the runtime's tests on it
        pytest.skip(f"gradmap.export cannot export resnet18 yet: {type(e).__name__}: {e}")
    module, _ = load_torchvision("resnet18", "none", seed=0)
    torch.set_num_threads(2)
    return path, module.eval()


def _recipe_map(module, picture: Image.Image) -> tuple[np.ndarray, np.ndarray, int]:
    """The ResNet-50 recipe, written out: torchvision preprocessing, autograd, abs, max, min-max."""
    import torch
    from torchvision import transforms

    preprocess = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    img_tensor = preprocess(picture).unsqueeze(0)
    img_tensor.requires_grad_(True)
    outputs = module(img_tensor)
    score, index = torch.max(outputs, 1)
    module.zero_grad()
    score.backward()
    gradients = img_tensor.grad.data.abs().squeeze().numpy()
    gradients = np.max(gradients, axis=0)
    gradients_raw = (gradients - gradients.min()) / (gradients.max() - gradients.min())
    probabilities = torch.softmax(outputs.detach().double(), dim=1)[0].numpy()
    return gradients_raw, probabilities, int(index)


def test_run_matches_torch_autograd_and_recipe(resnet18_export, photos, tmp_path):
    model_path, module = resnet18_export
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = {"chelsea.jpg": photos["chelsea"], "rocket.png": photos["rocket"]}
    for name, pixels in files.items():
        Image.fromarray(pixels).save(inputs / name, quality=95)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(model_path), str(inputs), "--out", str(out), "--json",
                                       "--format", "heatmap,overlay,figure,npy", "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["failed"] == 0 and len(doc["images"]) == 2
    for record in doc["images"]:
        name = record["path"].rsplit("/", 1)[-1]
        with Image.open(inputs / name) as opened:
            picture = opened.convert("RGB")
        expected_map, probabilities, index = _recipe_map(module, picture)
        (saliency,) = record["maps"]
        assert saliency["target"]["index"] == index, f"{name}: top-1 differs from torch"
        top = record["predictions"]
        assert [p["index"] for p in top] == np.argsort(-probabilities)[:5].tolist(), f"{name}: top-5 differs"
        assert_close(np.array([p["probability"] for p in top]), np.sort(probabilities)[::-1][:5],
                     PROBABILITY_TOLERANCE, f"{name} probabilities")
        saved = np.load(out / f"{name}.map.npy")
        assert saved.shape == expected_map.shape == (224, 224), f"{name}: map shape {saved.shape}"
        diff = np.abs(saved.astype(np.float64) - expected_map)
        off = float(np.mean(diff > MAP_TOLERANCE))
        assert off <= MAX_TIE_FRACTION, (f"{name}: {off:.2%} of map pixels differ from torch autograd + recipe by "
                                         f"more than {MAP_TOLERANCE} (max {diff.max():.3g})")
        assert np.median(diff) <= MEDIAN_TOLERANCE, f"{name}: median difference {np.median(diff):.3g}"
        assert np.load(out / f"{name}.gradient.npy").shape == (3, 224, 224)
        width, height = picture.size
        assert image_info(out / f"{name}.heatmap.png")[0] == (width, height)
        assert image_info(out / f"{name}.overlay.png")[0] == (width, height)
        (figure_width, figure_height), _ = image_info(out / f"{name}.figure.png")
        assert figure_width > 2 * figure_height, "the figure has four panels side by side"
