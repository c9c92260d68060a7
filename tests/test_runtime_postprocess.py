"""Postprocessing and colormaps against independent computations (the recipes' own code)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.ndimage import zoom
from skimage import exposure

from conftest import assert_close
from gradmap.runtime import (
    CropGeometry,
    NonFiniteGradientError,
    apply_colormap,
    clip_percentile,
    colormap_table,
    equalize_histogram,
    map_to_original,
    normalize_min_max,
    reduce_channels,
    render_overlay,
    softmax,
    top_k,
)


@pytest.fixture()
def gradient() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1e-3, size=(3, 24, 20)).astype(np.float32)


def test_reduce_max_matches_resnet50_recipe(gradient):
    # gradients.abs().squeeze().numpy(); np.max(gradients, axis=0)
    expected = np.max(np.abs(gradient), axis=0)
    assert_close(reduce_channels(gradient, "max"), expected, 0.0, "max reduction")


def test_reduce_sum_matches_tensorflow_recipe(gradient):
    # normalize_image: img[:,:,0] + img[:,:,1] + img[:,:,2] on the HWC gradient, signed
    hwc = gradient.transpose(1, 2, 0)
    expected = hwc[:, :, 0] + hwc[:, :, 1] + hwc[:, :, 2]
    assert_close(reduce_channels(gradient, "sum"), expected, 1e-9, "sum reduction")


def test_reduce_l2(gradient):
    expected = np.linalg.norm(gradient.astype(np.float64), axis=0)
    assert_close(reduce_channels(gradient, "l2"), expected, 1e-9, "l2 reduction")


def test_reduce_batched_channel_axis(gradient):
    batch = np.stack([gradient, -2 * gradient])
    out = reduce_channels(batch, "max", channel_axis=1)
    assert_close(out[1], 2 * np.abs(gradient).max(axis=0), 1e-12, "batched max")


def test_reduce_unknown_method(gradient):
    with pytest.raises(ValueError, match="unknown channel reduction"):
        reduce_channels(gradient, "mean")


def test_normalize_matches_recipe(gradient):
    g = np.max(np.abs(gradient), axis=0)
    expected = (g - g.min()) / (g.max() - g.min())
    assert_close(normalize_min_max(g), expected, 1e-7, "min-max")


def test_flat_maps_give_zeros_not_nan():
    flat = np.full((5, 7), 3.5, np.float32)
    assert np.array_equal(normalize_min_max(flat), np.zeros((5, 7), np.float32))
    assert np.array_equal(equalize_histogram(flat), np.zeros((5, 7), np.float32))


def test_equalize_matches_skimage(gradient):
    g = np.max(np.abs(gradient), axis=0)
    assert_close(equalize_histogram(g), exposure.equalize_hist(g), 1e-7, "equalize_hist")


def test_clip_percentile(gradient):
    g = np.max(np.abs(gradient), axis=0)
    lo, hi = np.percentile(g, [2, 98])
    expected = np.minimum(np.maximum(g, lo), hi)
    assert_close(clip_percentile(g, 2, 98), expected, 1e-9, "percentile clip")
    assert clip_percentile(g, 0, 90).max() < g.max()
    with pytest.raises(ValueError):
        clip_percentile(g, 50, 10)


@pytest.mark.parametrize("fn", [normalize_min_max, equalize_histogram, clip_percentile])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_raises(fn, bad):
    m = np.ones((4, 4), np.float32)
    m[1, 2] = bad
    with pytest.raises(NonFiniteGradientError, match="NaN|infinite"):
        fn(m)


def test_non_finite_gradient_raises_in_reduce(gradient):
    gradient[0, 0, 0] = np.nan
    with pytest.raises(NonFiniteGradientError, match="1 NaN"):
        reduce_channels(gradient)


def test_stretch_placement_matches_recipe_zoom():
    rng = np.random.default_rng(2)
    m = rng.random((224, 224)).astype(np.float32)
    geometry = CropGeometry((300, 451), (256, 384), 16, 80, (224, 224))
    # the recipe: zoom_factors = [original_size[1] / h, original_size[0] / w]; zoom(..., order=1)
    expected = zoom(m, [300 / 224, 451 / 224], order=1)
    values, covered = map_to_original(m, geometry, "stretch")
    assert_close(values, expected, 0.0, "stretch placement")
    assert covered.all()


def test_crop_placement_puts_map_on_the_crop_window():
    m = np.zeros((32, 32), np.float32)
    m[:16, :16] = 1.0  # top-left quadrant of the crop
    # picture 100x200 (HxW) resized to 36x72, crop 32x32 at top 2, left 20
    geometry = CropGeometry((100, 200), (36, 72), 2, 20, (32, 32))
    top, left, bottom, right = geometry.box_in_original
    assert (top, left, bottom, right) == pytest.approx((100 * 2 / 36, 200 * 20 / 72, 100 * 34 / 36, 200 * 52 / 72))
    values, covered = map_to_original(m, geometry, "crop")
    assert values.shape == covered.shape == (100, 200)
    rows, cols = np.nonzero(covered)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (round(top), round(bottom), round(left), round(right))
    assert np.all(values[~covered] == 0)
    t, l = round(top), round(left)
    assert_close(values[t:round(bottom), l:round(right)],
                 zoom(m, ((round(bottom) - t) / 32, (round(right) - l) / 32), order=1), 0.0, "zoomed window")
    assert values[t + 2, l + 2] == 1.0 and values[round(bottom) - 2, round(right) - 2] == 0.0


def test_crop_placement_clips_padding_outside_picture():
    # 20x10 picture, crop 32x32 without resize: padded 11 left / 6 top
    geometry = CropGeometry((20, 10), (20, 10), -6, -11, (32, 32))
    values, covered = map_to_original(np.ones((32, 32), np.float32), geometry, "crop")
    assert covered.all() and values.shape == (20, 10)


def test_unknown_placement():
    with pytest.raises(ValueError, match="placement"):
        map_to_original(np.zeros((2, 2)), CropGeometry((2, 2), (2, 2), 0, 0, (2, 2)), "center")


def test_softmax_and_top_k():
    logits = np.array([1.0, 3.0, 3.0, -2.0], np.float32)
    p = softmax(logits)
    e = np.exp(logits.astype(np.float64))
    assert_close(p, e / e.sum(), 1e-15, "softmax")
    assert top_k(p, 3).tolist() == [1, 2, 0]  # tie goes to the lower index
    assert np.isfinite(softmax(np.array([1e4, -1e4]))).all()


@pytest.mark.parametrize("name", ["hot", "jet", "viridis", "gray"])
def test_colormaps_match_matplotlib(name):
    mpl = pytest.importorskip("matplotlib")
    cmap = mpl.colormaps[name]
    assert_close(colormap_table(name), cmap(np.arange(256))[:, :3], 1e-12, f"{name} table")
    x = np.concatenate([np.linspace(0, 1, 1001), [0.0, 1.0, 0.5, 255.5 / 256]]).astype(np.float32)
    assert np.array_equal(apply_colormap(x, name), cmap(x, bytes=True)[:, :3]), f"{name} bytes differ"


def test_unknown_colormap():
    with pytest.raises(ValueError, match="unknown colormap"):
        colormap_table("rainbow")


def test_overlay_blends_like_matplotlib_alpha():
    from PIL import Image

    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    values = rng.random((6, 5)).astype(np.float32)
    covered = np.ones((6, 5), bool)
    covered[0] = False
    out = np.asarray(render_overlay(Image.fromarray(picture), values, covered, "hot", 0.5))
    colour = apply_colormap(values, "hot").astype(np.float64)
    expected = np.rint(0.5 * colour + 0.5 * picture)
    assert np.array_equal(out[1:], expected[1:].astype(np.uint8))
    assert np.array_equal(out[0], picture[0]), "uncovered pixels must show the picture unchanged"


def test_weighted_overlay_opacity_grows_with_the_value():
    from PIL import Image

    rng = np.random.default_rng(4)
    picture = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    values = np.array([[0.0, 0.25, 0.5, 0.75, 1.0, 2.0]] * 4, dtype=np.float32)
    out = np.asarray(render_overlay(Image.fromarray(picture), values, None, "hot", 0.8, weighted=True))
    colour = apply_colormap(values, "hot").astype(np.float64)
    a = 0.8 * np.clip(values, 0, 1)[..., None]
    assert np.array_equal(out, np.rint(a * colour + (1 - a) * picture).astype(np.uint8))
    assert np.array_equal(out[:, 0], picture[:, 0]), "a zero value must leave the picture as it is"


def test_scale_to_percentile_saturates_the_top_and_keeps_the_rest():
    from gradmap.runtime.postprocess import scale_to_percentile

    m = np.linspace(0, 1, 1001, dtype=np.float32).reshape(7, 143)
    out = scale_to_percentile(m, 99)
    level = np.percentile(m.astype(np.float64), 99)
    assert out.dtype == np.float32 and out.max() == 1.0
    assert np.mean(out == 1.0) == pytest.approx(0.01, abs=0.002), "the top 1 % saturates"
    assert_close(out[m < level], (m[m < level] / level).astype(np.float32), 1e-7, "below the percentile")
    sparse = np.zeros((40, 40), np.float32)
    sparse[0, :3] = [0.5, 1.0, 0.25]
    assert_close(scale_to_percentile(sparse, 99), sparse, 0, "a 99th percentile of 0: divided by the maximum")
    assert not scale_to_percentile(np.zeros((3, 3), np.float32)).any()
    with pytest.raises(ValueError, match="percentile"):
        scale_to_percentile(m, 0)


maps = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
    elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=150, deadline=None)
@given(maps)
def test_normalize_and_equalize_properties(m):
    for fn in (normalize_min_max, equalize_histogram):
        out = fn(m)
        assert out.shape == m.shape, f"{fn.__name__} changed the shape"
        assert np.isfinite(out).all(), f"{fn.__name__} produced non-finite values"
        assert out.min() >= 0.0 and out.max() <= 1.0, f"{fn.__name__} left [0, 1]"
        if m.max() == m.min():
            assert not out.any(), f"{fn.__name__} of a constant map must be zeros"
    normalized = normalize_min_max(m)
    if m.max() > m.min():
        assert normalized.max() == 1.0 and normalized.min() == 0.0


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=8),
                  elements=st.floats(allow_nan=False, allow_infinity=False, width=32)),
       st.sampled_from(["max", "sum", "l2"]))
def test_reduce_then_normalize_properties(g, method):
    out = normalize_min_max(reduce_channels(g, method))
    assert out.shape == g.shape[1:]
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)),
                  elements=st.floats(0, 1, width=32)),
       st.integers(1, 60), st.integers(1, 60))
def test_map_to_original_properties(m, height, width):
    geometry = CropGeometry((height, width), (height, width), 0, 0, (height, width))
    for placement in ("crop", "stretch"):
        values, covered = map_to_original(m, geometry, placement)
        assert values.shape == covered.shape == (height, width)
        assert np.isfinite(values).all() and values.min() >= -1e-6 and values.max() <= 1 + 1e-6


@pytest.mark.parametrize("method", ["max", "sum", "l2"])
def test_largest_float32_gradients_do_not_overflow(method):
    big = np.finfo(np.float32).max
    g = np.full((3, 2, 2), big, np.float32)
    g[:, 0, 0] = 0
    out = normalize_min_max(reduce_channels(g, method))
    assert np.isfinite(out).all(), "reduction overflowed"
    assert out[0, 0] == 0 and out[1, 1] == 1


def test_bilinear_zoom_is_scipys_bit_for_bit():
    """postprocess.zoom computes scipy.ndimage.zoom(order=1) itself (gradmap run then needs no scipy):
    the same float32 values and shape, on shrinking, growing, 1-pixel and odd-factor cases."""
    from gradmap.runtime.postprocess import zoom as own_zoom

    rng = np.random.default_rng(7)
    for h, w, fy, fx in [(224, 224, 300 / 224, 451 / 224), (1, 5, 3.0, 0.4), (7, 1, 1 / 7, 9.0), (13, 17, 0.5, 2.5),
                         (32, 32, 123 / 32, 77 / 32), (5, 9, 1.0, 1.0)]:
        m = (rng.standard_normal((h, w)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
        expected = zoom(m, (fy, fx), order=1)
        got = own_zoom(m, (fy, fx))
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert np.array_equal(got, expected), (h, w, fy, fx)


def test_the_run_path_does_not_import_scipy():
    """scipy (25 MB resident) is imported only by the methods that use it (blurred baselines,
    class activation map upsampling, evaluation metrics), not by gradmap run's default path."""
    import subprocess
    import sys

    code = ("import sys, gradmap.cli, gradmap.runtime.saliency, gradmap.runtime.jobs, gradmap.runtime.render, "
            "gradmap.runtime.postprocess, gradmap.runtime.methods, gradmap.runtime.cam; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
