"""--method on the linear fixture, whose gradient is known exactly: dS/dx = W[target] everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import LINEAR_MODEL  # noqa: I001
from gradmap.cli import main
from gradmap.runtime.methods import MethodSpec, attribute


@pytest.fixture()
def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 3, 32, 32)).astype(np.float32), np.array([-1, 2], dtype=np.int64)


def test_methods_on_a_linear_model(linear_model, linear_weights, batch):
    W, _ = linear_weights
    images, targets = batch
    logits, index, vanilla, _ = attribute(linear_model, MethodSpec("vanilla"), images, targets)
    expected = W[index].reshape(2, 3, 32, 32)
    np.testing.assert_allclose(vanilla, expected, rtol=1e-6, atol=1e-7)
    # the gradient of a linear model does not depend on the input: SmoothGrad averages constants
    _, _, smooth, _ = attribute(linear_model, MethodSpec("smoothgrad", samples=4), images, targets)
    np.testing.assert_allclose(smooth, expected, rtol=1e-5, atol=1e-6)
    _, _, squared, _ = attribute(linear_model, MethodSpec("smoothgrad", samples=4, variant="squared"), images, targets)
    np.testing.assert_allclose(squared, expected ** 2, rtol=1e-5, atol=1e-9)
    _, _, var, _ = attribute(linear_model, MethodSpec("smoothgrad", samples=4, variant="vargrad"), images, targets)
    assert np.abs(var).max() <= 1e-9
    # integrated gradients of a linear model: (x - x0) * W exactly, and a zero completeness gap
    _, _, ig, gap = attribute(linear_model, MethodSpec("integrated-gradients", steps=3, baseline="blurred"),
                              images, targets)
    from gradmap.runtime.methods import baseline_image

    pre = linear_model.metadata.preprocessing
    x0 = baseline_image(images, "blurred", pre.mean, pre.std)
    np.testing.assert_allclose(ig, (images - x0) * expected, rtol=1e-4, atol=1e-6)
    assert np.all(gap <= 1e-3 * np.abs(logits).max()), gap
    _, _, gxi, _ = attribute(linear_model, MethodSpec("gradient-x-input"), images, targets)
    np.testing.assert_allclose(gxi, images * expected, rtol=1e-5, atol=1e-7)
    _, _, negative, _ = attribute(linear_model, MethodSpec("vanilla", modifier="negative"), images, targets)
    np.testing.assert_allclose(negative, np.maximum(-expected, 0), rtol=1e-6, atol=1e-7)


def test_unsupported_method_names_what_to_export(linear_model, batch):
    with pytest.raises(ValueError, match="export it with --cam-layer auto"):
        attribute(linear_model, MethodSpec("grad-cam"), *batch)


def test_cli_method_and_unsupported_method(tmp_path, photo_files):
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(tmp_path / "o"),
                                  "--method", "integrated-gradients", "--steps", "4", "--json", "--format", "npy"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (saliency,) = doc["images"][0]["maps"]
    assert saliency["method"] == "integrated-gradients" and saliency["completeness_gap"] is not None
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(tmp_path / "p"),
                                  "--method", "guided-backprop"])
    assert result.exit_code == 2
    assert "does not support guided-backprop" in result.output
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").rglob("*.png"))


@pytest.mark.parametrize("method, kind", [("vanilla", "gradient"), ("smoothgrad", "gradient"),
                                          ("integrated-gradients", "attribution"), ("gradient-x-input", "attribution")])
def test_saved_arrays_are_named_for_what_they_hold(tmp_path, photo_files, method, kind):
    out = tmp_path / "out"
    args = ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(out), "--method", method, "--steps", "3",
            "--samples", "2", "--json", "--format", "npy"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["images"][0]["maps"][0]["files"]
    assert set(files) == {kind, "map"} and files[kind].endswith(f".{kind}.npy"), files
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{photo_files[0].name}.{k}.npy" for k in (kind, "map"))
    again = CliRunner().invoke(main, args + ["--skip-existing"])
    assert again.exit_code == 0 and "skipped 1 of 1" in again.output, again.output


def test_class_activation_maps_are_saved_as_cam(tmp_path):
    from gradmap.demo import demo_assets

    model = demo_assets().joinpath("shapes.onnx")
    if not model.is_file():
        pytest.skip("demo model not generated (python models/make_demo.py)")
    picture = demo_assets().joinpath("images", "star_0.png")
    result = CliRunner().invoke(main, ["run", str(model), str(picture), "--out", str(tmp_path), "--method", "grad-cam",
                                       "--json", "--format", "npy"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["images"][0]["maps"][0]["files"]
    assert set(files) == {"cam", "map"} and np.load(files["cam"]).shape == (1, 64, 64)
