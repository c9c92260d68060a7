"""Blur IG, Guided IG and XRAI (gradmap/runtime/paths.py), torch-free.

- against the paper authors' implementation, the ``saliency`` package (PAIR), on the demo model
  (a 64 x 64 CNN), PAIR's gradients coming from the same exported model (its gradient output),
  so that the comparison is of the methods' arithmetic: skipped when ``saliency`` is absent;
- exact answers on the linear fixture model and on hand-made attributions and regions;
- settings through the method table, the CLI, the Python API and ``gradmap evaluate``, and the
  errors bad settings get.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import LINEAR_MODEL
from gradmap import contract
from gradmap.cli import main
from gradmap.runtime import SaliencyModel, paths
from gradmap.runtime.methods import MethodSpec, _alphas, attribute, baseline_image, gradient_function, path_gradients

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
TOLERANCE = 1e-5  # max|gradmap - PAIR| / max|PAIR|


def rel(actual, expected):
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def demo():
    """The demo model's gradient function, two demo pictures (preprocessed) and their top classes."""
    model = SaliencyModel(DEMO / "shapes.onnx", provider="cpu", threads=1)
    fn = gradient_function(model, batch_size=64)
    data = np.load(DEMO / "eval_set.npz")
    from gradmap.runtime.preprocess import preprocess
    from PIL import Image

    pre = model.metadata.preprocessing
    images = np.stack([preprocess(Image.fromarray(data["images"][i]), pre)[0] for i in (0, 7)])
    _, target_index, _ = fn(images, np.full(2, -1, np.int64))
    return model, fn, images, target_index


# -- against PAIR's saliency package -----------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    core = pytest.importorskip("saliency.core")
    from saliency.core import guided_ig

    # saliency 0.2.1 calls np.quantile(..., interpolation=...), a keyword numpy 2.4 no longer takes
    # (it is numpy's `method` now): its module gets numpy with that one function translated
    class _Numpy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def quantile(a, q, interpolation="linear", **kwargs):
            return np.quantile(a, q, method=interpolation, **kwargs)

    original = guided_ig.np
    guided_ig.np = _Numpy()
    yield core
    guided_ig.np = original


def _call_model(core, fn, target):
    """PAIR's call_model_function: HWC float64 batches in, the demo model's gradient output out."""
    def call(batch, call_model_args=None, expected_keys=None):
        images = np.moveaxis(np.asarray(batch), -1, 1).astype(np.float32)
        _, _, gradient = fn(images, np.full(len(images), target, np.int64))
        return {core.INPUT_OUTPUT_GRADIENTS: np.moveaxis(gradient, 1, -1)}
    return call


def _hwc(image):
    return np.moveaxis(image, 0, -1).astype(np.float64)


def test_blur_ig_matches_pair(demo, pair):
    _, fn, images, target_index = demo
    ours = paths.blur_ig(fn, images, target_index, steps=12, max_sigma=20, grad_step=0.05, batch_size=7)
    for i in range(2):
        expected = pair.BlurIG().GetMask(_hwc(images[i]), _call_model(pair, fn, target_index[i]), max_sigma=20,
                                         steps=12, grad_step=0.05, batch_size=5)
        err = rel(_hwc(ours.values[i]), expected)
        print(f"vs PAIR: Blur IG, picture {i}: {err:.3g}")
        assert err <= TOLERANCE, f"Blur IG, picture {i}: {err:.3g}"


@pytest.mark.parametrize("max_dist", [0.02, 0.3])
def test_guided_ig_matches_pair(demo, pair, max_dist):
    model, fn, images, target_index = demo
    pre = model.metadata.preprocessing
    baselines = baseline_image(images, "black", pre.mean, pre.std)
    ours = paths.guided_ig(fn, images, target_index, baselines, steps=16, fraction=0.1, max_dist=max_dist)
    for i in range(2):
        expected = pair.GuidedIG().GetMask(_hwc(images[i]), _call_model(pair, fn, target_index[i]),
                                           x_baseline=_hwc(baselines[i]), x_steps=16, fraction=0.1, max_dist=max_dist)
        err = rel(_hwc(ours.values[i]), expected)
        print(f"vs PAIR: Guided IG (max_dist {max_dist}), picture {i}: {err:.3g}")
        assert err <= TOLERANCE, f"Guided IG (max_dist {max_dist}), picture {i}: {err:.3g}"


@pytest.mark.parametrize("search", paths.XRAI_SEARCHES)
def test_xrai_matches_pair(demo, pair, search):
    """PAIR's defaults: its segmentation, baselines at the input's min and max, its Riemann sum
    (equal weights at evenly spaced points, both ends included)."""
    model, fn, images, target_index = demo
    pre = model.metadata.preprocessing
    baselines = paths._xrai_baselines(images, "input-range", pre.mean, pre.std, pre.value_range)
    ours = paths.xrai(fn, images, target_index, baselines, steps=6, rule="equal-weights", search=search)
    for i in range(2):
        parameters = pair.XRAIParameters(steps=6, algorithm=search)
        expected = pair.XRAI().GetMask(_hwc(images[i]), _call_model(pair, fn, target_index[i]), batch_size=6,
                                       extra_parameters=parameters)
        err = rel(ours.values[i, 0], expected)
        print(f"vs PAIR: XRAI ({search}), picture {i}: {err:.3g}")
        assert err <= TOLERANCE, f"XRAI ({search}), picture {i}: {err:.3g}"


def test_xrai_segments_match_pair(demo, pair):
    from saliency.core import xrai

    _, _, images, _ = demo
    ours = paths.xrai_segments(images[1])
    expected = xrai._get_segments_felzenszwalb(_hwc(images[1]))
    assert len(ours) == len(expected)
    for region, mask in zip(ours, expected):
        np.testing.assert_array_equal(np.sort(region), np.flatnonzero(mask))


def test_xrai_area_matches_pair(demo, pair):
    """With area < 1 the search stops early and what is left is one region, as in PAIR."""
    _, fn, images, target_index = demo
    rng = np.random.default_rng(3)
    attr = rng.standard_normal((64, 64))
    regions = paths.xrai_segments(images[0])
    ours, ranks = paths.xrai_regions(attr, regions, area=0.3)
    masks = [np.isin(np.arange(64 * 64), r).reshape(64, 64) for r in regions]
    expected, expected_ranks = pair.XRAI._xrai(attr, masks, area_perc_th=0.3)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ranks, expected_ranks)


# -- exact answers -----------------------------------------------------------------------------------
def test_blur_matches_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 3, 20, 28))
    for sigma in (0.0, 0.7, 3.0, 40.0):
        expected = ndimage.gaussian_filter(image, sigma=(0, 0, sigma, sigma), mode="constant")
        np.testing.assert_allclose(paths._blur(image, sigma), expected, rtol=0, atol=1e-12)


def test_lower_quantile_is_numpys():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 100, 12288):
        values = np.abs(rng.standard_normal(n))
        values[: n // 3] = np.inf
        for q in (0.01, 0.1, 0.25, 0.5, 0.999, 1.0):
            assert paths._lower_quantile(values, q) == np.quantile(values, q, method="lower")


def test_path_methods_on_a_linear_model(linear_model, linear_weights):
    """The gradient is constant, so a path's attribution is W * (x - start) whatever the path."""
    W, _ = linear_weights
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    logits, index, guided, gap = attribute(linear_model, MethodSpec("guided-ig", steps=7, baseline="blurred"),
                                           images, np.array([-1, 2]))
    pre = linear_model.metadata.preprocessing
    start = baseline_image(images, "blurred", pre.mean, pre.std)
    expected = W[index].reshape(2, 3, 32, 32)
    np.testing.assert_allclose(guided, (images - start) * expected, rtol=1e-4, atol=1e-6)
    assert np.all(gap <= 1e-4 * np.abs(logits).max()), gap
    # Blur IG: the blur path's end is the picture blurred with max_sigma; steps and grad_step only
    # discretize the path, so the sum of attributions is the score's change up to the discretization
    _, _, blur, gap = attribute(linear_model, MethodSpec("blur-ig", steps=64, max_sigma=4, grad_step=1e-4),
                                images, np.array([-1, 2]))
    fn = gradient_function(linear_model)
    blurred = paths._blur(images, 4.0)
    change = ((images - blurred).reshape(2, -1) * W[index]).sum(1)
    assert np.all(gap <= 0.03 * np.abs(change)), (gap, change)
    assert np.all(np.abs(blur.reshape(2, -1).sum(1) - change) <= 0.03 * np.abs(change))
    del fn


def test_guided_ig_without_deviation_is_integrated_gradients(demo):
    """max_dist 0 keeps the path straight: a left Riemann sum of integrated gradients."""
    model, fn, images, target_index = demo
    pre = model.metadata.preprocessing
    baselines = baseline_image(images, "black", pre.mean, pre.std)
    ours = paths.guided_ig(fn, images, target_index, baselines, steps=10, max_dist=0)
    alphas = np.arange(10) / 10
    expected = (images - baselines) * path_gradients(fn, images, baselines, target_index, alphas, np.full(10, 0.1))
    assert rel(ours.values, expected) <= 1e-5


def test_path_methods_ask_for_no_more_than_their_path(demo):
    """Guided IG takes one gradient per step and the picture's forward alone (its gradient is never on
    the path; the baseline's score comes from the first step, at the baseline); Blur IG takes the
    blurred end's forward before its gradients. The maps, scores and gaps equal those of the gradient
    function alone."""
    model, fn, images, target_index = demo
    calls = []

    def counted_fn(x, t):
        calls.append(("gradient", len(x)))
        return fn(x, t)

    def counted_logits(x):
        calls.append(("forward", len(x)))
        return model.logits(x)

    pre = model.metadata.preprocessing
    baselines = baseline_image(images, "black", pre.mean, pre.std)
    requested = np.array([-1, int(target_index[1])])
    alone = paths.guided_ig(fn, images, requested, baselines, steps=6)
    ours = paths.guided_ig(counted_fn, images, requested, baselines, steps=6, logits_fn=counted_logits)
    assert calls == [("forward", 2)] + [("gradient", 2)] * 6
    np.testing.assert_array_equal(ours.target_index, target_index)
    assert rel(ours.values, alone.values) <= 1e-5
    np.testing.assert_allclose(ours.completeness_gap, alone.completeness_gap, atol=1e-4)
    with pytest.raises(ValueError, match="targets must be 2 class indices below"):
        paths.guided_ig(fn, images, np.array([0, 99]), baselines, steps=6, logits_fn=model.logits)
    # a picture equal to its baseline takes no gradient and keeps its own logits
    calls.clear()
    same = paths.guided_ig(counted_fn, images, requested, np.stack([baselines[0], images[1]]), steps=3,
                           logits_fn=counted_logits)
    assert calls == [("forward", 2)] + [("gradient", 1)] * 3
    assert same.completeness_gap[1] == 0 and not same.values[1].any()

    calls.clear()
    alone = paths.blur_ig(fn, images, requested, steps=5, max_sigma=3, batch_size=4)
    ours = paths.blur_ig(counted_fn, images, requested, steps=5, max_sigma=3, batch_size=4, logits_fn=counted_logits)
    assert calls == [("forward", 2), ("gradient", 2), ("gradient", 4), ("gradient", 4)]
    assert rel(ours.values, alone.values) <= 1e-6
    np.testing.assert_allclose(ours.completeness_gap, alone.completeness_gap, atol=1e-4)


def test_xrai_regions_by_hand():
    """Three regions on a 10 x 10 attribution: the densest first, then what each adds, the rest last."""
    attr = np.zeros((10, 10))
    attr[:5, :5] = 4.0       # a: density 4
    attr[:5, 5:] = 1.0       # b
    attr[5:, :] = -1.0       # c
    index = np.arange(100).reshape(10, 10)
    a, ab, top = index[:5, :5].ravel(), index[:5, :].ravel(), index[:5, :].ravel()
    regions = [ab, a, top]   # ab's density 2.5 < a's 4: a first, then ab adds b (density 1), top adds nothing
    values, ranks = paths.xrai_regions(attr, regions, min_pixel_diff=1)
    np.testing.assert_array_equal(values[:5, :5], 4.0)
    np.testing.assert_array_equal(values[:5, 5:], 1.0)
    np.testing.assert_array_equal(values[5:], -1.0)  # no region: the mean of what is left
    np.testing.assert_array_equal(ranks[:5, :5], 1)
    np.testing.assert_array_equal(ranks[:5, 5:], 2)
    np.testing.assert_array_equal(ranks[5:], 3)
    # fast ranks once by each region's own density: a (4), then ab and top (2.5), ab first
    values, ranks = paths.xrai_regions(attr, regions, search="fast", min_pixel_diff=1)
    np.testing.assert_array_equal(values[:5, 5:], 1.0)
    # a region must add min_pixel_diff pixels: with 26, a (25) is out and ab (density 2.5) goes first
    values, _ = paths.xrai_regions(attr, regions, min_pixel_diff=26)
    np.testing.assert_array_equal(values[:5], 2.5)
    np.testing.assert_array_equal(values[5:], -1.0)
    # with 51 no region qualifies: the whole picture is one region, its mean
    values, _ = paths.xrai_regions(attr, regions, min_pixel_diff=51)
    np.testing.assert_allclose(values, attr.mean())
    # area 0: one region, then the rest
    values, ranks = paths.xrai_regions(attr, regions, area=0.0, min_pixel_diff=1)
    np.testing.assert_array_equal(ranks[:5, :5], 1)
    assert set(np.unique(ranks[5:])) == {2}


def test_equal_weights_rule():
    alphas, weights = _alphas(5, "equal-weights")
    np.testing.assert_allclose(alphas, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(weights, 0.2)


# -- the method table, the CLI, the API, gradmap evaluate ----------------------------------------------
PATH_METHODS = ("blur-ig", "guided-ig", "xrai")


def test_rows_and_defaults():
    for name in PATH_METHODS:
        row = contract.method(name)
        assert row.outputs == (contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_GRADIENT)
        assert row.web is None  # 100-200 gradients per map: beyond the page's budget
    assert contract.method("xrai").kind == contract.KIND_REGION
    assert MethodSpec("blur-ig").settings == {"steps": 100, "max_sigma": 50.0, "grad_step": 0.01, "modifier": "auto"}
    spec = MethodSpec("guided-ig")
    assert (spec.steps, spec.fraction, spec.max_dist, spec.baseline) == (200, 0.25, 0.02, "black")
    spec = MethodSpec("xrai")
    assert (spec.steps, spec.rule, spec.baselines, spec.search, spec.area) == (32, "gauss-legendre", "black-white",
                                                                               "full", 1.0)


@pytest.mark.parametrize("name,settings,message", [
    ("guided-ig", {"fraction": 0}, r"guided-ig setting 'fraction' must be a number in \[0.01, 1\], got 0"),
    ("guided-ig", {"max_dist": 1.5}, r"'max_dist' must be a number in \[0, 1\]"),
    ("guided-ig", {"steps": 1}, r"'steps' must be an integer >= 2"),
    ("blur-ig", {"max_sigma": 0}, r"'max_sigma' must be a number >= 0.01"),
    ("blur-ig", {"grad_step": "-1"}, r"'grad_step' must be a number in \[1e-06, 1\]"),
    ("xrai", {"area": 2}, r"'area' must be a number in \[0, 1\]"),
    ("xrai", {"search": "greedy"}, r"'greedy' is not one of full, fast"),
    ("xrai", {"baselines": "black"}, r"'black' is not one of black-white, input-range"),
    ("xrai", {"max_sigma": 3}, r"xrai has no setting 'max_sigma'"),
])
def test_bad_settings_name_the_setting(name, settings, message):
    with pytest.raises(contract.MethodSettingError, match=message):
        MethodSpec.from_request(name, settings)


def test_functions_refuse_bad_arguments(demo):
    _, fn, images, target_index = demo
    with pytest.raises(ValueError, match="max_sigma must be > 0"):
        paths.blur_ig(fn, images, target_index, max_sigma=0)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        paths.guided_ig(fn, images, target_index, images, fraction=0)
    with pytest.raises(ValueError, match="baselines"):
        paths.guided_ig(fn, images, target_index, images[:1])
    with pytest.raises(ValueError, match="at least 50 pixels"):
        paths.xrai(fn, images[:, :, :7, :7], target_index, [images[:, :, :7, :7]])
    with pytest.raises(ValueError, match="search 'greedy'"):
        paths.xrai_regions(np.zeros((8, 8)), [], search="greedy")


def test_cli_runs_each_method(tmp_path, photo_files):
    runner = CliRunner()
    for name, options in [("blur-ig", ["--steps", "6", "--max-sigma", "8"]),
                          ("guided-ig", ["--steps", "5", "--fraction", "0.5", "--max-dist", "0.1"]),
                          ("xrai", ["--steps", "4", "--search", "fast", "--baselines", "input-range"])]:
        out = tmp_path / name
        result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(out),
                                      "--method", name, *options, "--json", "--format", "npy"])
        assert result.exit_code == 0, result.output
        kind = contract.method(name).kind
        (saved,) = out.glob(f"*.{kind}.npy")
        values = np.load(saved)
        assert values.shape == ((1, 32, 32) if kind == contract.KIND_REGION else (3, 32, 32))
        assert np.isfinite(values).all() and np.abs(values).max() > 0
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(tmp_path / "bad"),
                                  "--method", "guided-ig", "--fraction", "0"])
    assert result.exit_code != 0 and "--fraction" in result.output and "0.01" in result.output


def test_region_maps_keep_their_sign(demo):
    """gradmap run's map of a region method is the region values min-max normalized, not |values|."""
    from gradmap.runtime.saliency import iter_saliency

    model, _, _, _ = demo
    pictures = sorted((DEMO / "images").glob("*.png"))[:1]
    (result,) = iter_saliency(model, pictures, method=MethodSpec("xrai", steps=4))
    (m,) = result.maps
    region = m.attribution[0]
    expected = (region - region.min()) / (region.max() - region.min())
    np.testing.assert_allclose(m.saliency_map, expected, atol=1e-6)
    # a negative region is the least important, whatever --reduce says (|values| would rank it first)
    from gradmap.runtime.saliency import _make_map

    signed = np.array([[[-3.0, -3.0], [1.0, 2.0]]], np.float32)
    for reduce in ("max", "sum", "l2"):
        made = _make_map(signed, 0, ["a"], None, reduce, None, "xrai")
        np.testing.assert_allclose(made.saliency_map, [[0, 0], [0.8, 1]], atol=1e-6)


def test_evaluate_runs_the_path_methods(tmp_path):
    out = tmp_path / "quality.json"
    args = ["evaluate", str(DEMO / "shapes.onnx"), "--data", str(DEMO / "eval_set.npz"), "--limit", "2",
            "--curve-steps", "4", "--random-repeats", "1", "--threads", "1", "--json", str(out),
            "--steps", "4", "--max-sigma", "10"]
    for name in PATH_METHODS:
        args += ["--method", name]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert set(PATH_METHODS) <= set(doc["methods"])
    for name in PATH_METHODS:
        assert 0 <= doc["methods"][name]["pointing_game"]["mean"] <= 1, doc["methods"][name]
