"""Saliency quality metrics: hand-made maps with known answers, and cross-checks against Quantus."""

from __future__ import annotations

import numpy as np
import pytest

from gradmap.runtime.errors import NonFiniteGradientError
from gradmap.runtime.metrics import (
    PerturbationCurve,
    blurred_image,
    deletion_curve,
    energy_pointing_game,
    insertion_curve,
    pointing_game,
    random_order_curve,
    rank_correlation,
    saliency_order,
)


def _box_mask(shape=(8, 8), top=2, left=3, height=3, width=2) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + height, left:left + width] = True
    return mask


# --------------------------------------------------------------------------------------------
# Pointing game
# --------------------------------------------------------------------------------------------

def test_pointing_game_hit_and_miss():
    mask = _box_mask()
    inside = np.zeros((8, 8))
    inside[3, 4] = 1.0
    outside = np.zeros((8, 8))
    outside[7, 7] = 1.0
    assert pointing_game(inside, mask) == 1.0, "a maximum inside the mask is a hit"
    assert pointing_game(outside, mask) == 0.0, "a maximum outside the mask is a miss"


def test_pointing_game_ties_score_the_share_of_maxima_on_the_object():
    mask = _box_mask()
    m = np.zeros((8, 8))
    m[3, 4] = m[0, 0] = 2.0  # one maximum on the object, one off it
    assert pointing_game(m, mask) == 0.5, "two tied maxima, one inside: expected hit 0.5"
    m[7, 7] = 2.0
    assert pointing_game(m, mask) == pytest.approx(1 / 3), "three tied maxima, one inside"


def test_pointing_game_flat_map_scores_chance():
    mask = _box_mask()
    assert pointing_game(np.ones((8, 8)), mask) == pytest.approx(mask.mean()), \
        "a flat map must score the mask's area fraction, not a hit"


def test_pointing_game_tolerance_is_euclidean_distance_to_the_mask():
    mask = _box_mask()  # rows 2-4, columns 3-4
    m = np.zeros((8, 8))
    m[3, 7] = 1.0  # 3 px right of column 4
    assert pointing_game(m, mask) == 0.0
    assert pointing_game(m, mask, tolerance=2.9) == 0.0, "3 px away is outside a 2.9 px tolerance"
    assert pointing_game(m, mask, tolerance=3.0) == 1.0, "3 px away is inside a 3 px tolerance"


@pytest.mark.parametrize("tolerance", [1, 2, 3])
def test_pointing_game_tolerance_matches_skimage_disk_dilation(tolerance):
    """Within ``tolerance`` px of the object = the mask dilated by skimage's disk of that radius."""
    from skimage.morphology import dilation, disk

    rng = np.random.default_rng(tolerance)
    mask = np.zeros((24, 24), dtype=bool)
    mask[9:14, 8:12] = True
    mask[14, 10] = True
    dilated = dilation(mask, disk(tolerance))
    for _ in range(200):
        m = rng.random((24, 24))
        expected = float(dilated.ravel()[m.argmax()])
        assert pointing_game(m, mask, tolerance=tolerance) == expected


def test_pointing_game_uses_signed_values():
    mask = _box_mask()
    m = np.zeros((8, 8))
    m[3, 4] = 1.0
    m[0, 0] = -5.0  # larger magnitude, but negative: not the maximum
    assert pointing_game(m, mask) == 1.0
    assert pointing_game(np.abs(m), mask) == 0.0, "with absolute values the -5 pixel is the maximum"


@pytest.mark.parametrize("metric", [pointing_game, energy_pointing_game], ids=["pointing", "energy"])
def test_localisation_rejects_bad_input(metric):
    m = np.ones((8, 8))
    with pytest.raises(ValueError, match="empty"):
        metric(m, np.zeros((8, 8), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        metric(m, np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="2-D"):
        metric(np.ones((3, 8, 8)), np.ones((8, 8), dtype=bool))
    bad = m.copy()
    bad[1, 1] = np.nan
    with pytest.raises(NonFiniteGradientError, match="NaN"):
        metric(bad, _box_mask())


# --------------------------------------------------------------------------------------------
# Energy-based pointing game
# --------------------------------------------------------------------------------------------

def test_energy_pointing_game_known_values():
    mask = _box_mask()
    m = np.zeros((8, 8))
    m[mask] = 1.0 / mask.sum()  # total 1 inside
    m[0, 0] = 3.0               # 3 outside
    m[7, 7] = -10.0             # negative: ignored
    assert energy_pointing_game(m, mask) == pytest.approx(0.25), "1 of 4 units of positive mass inside"
    assert energy_pointing_game(np.where(mask, 2.0, 0.0), mask) == 1.0
    assert energy_pointing_game(np.ones((8, 8)), mask) == pytest.approx(mask.mean()), \
        "a uniform map puts the area fraction of its mass on the object"


def test_energy_pointing_game_without_positive_mass_is_zero():
    assert energy_pointing_game(np.zeros((8, 8)), _box_mask()) == 0.0
    assert energy_pointing_game(-np.ones((8, 8)), _box_mask()) == 0.0


# --------------------------------------------------------------------------------------------
# Deletion and insertion: a model whose probability is the share of object pixels still intact.
# --------------------------------------------------------------------------------------------

OBJECT = _box_mask(top=0, left=0, height=2, width=8)  # 16 of 64 pixels


def _object_share(batch: np.ndarray) -> np.ndarray:
    """p(class 1) = mean of channel 0 over the object; images are 1 there, the baseline 0."""
    p = batch[:, 0][:, OBJECT].mean(axis=1)
    return np.stack([1.0 - p, p], axis=1)


def _object_image() -> np.ndarray:
    return np.ones((2, 8, 8), dtype=np.float32)


def test_saliency_order_is_decreasing_and_stable_on_ties():
    m = np.array([[0.0, 2.0], [2.0, 1.0]])
    assert saliency_order(m).tolist() == [1, 2, 3, 0], "ties (the two 2.0) keep raster order"


def test_deletion_of_a_perfect_map_is_a_triangle():
    curve = deletion_curve(_object_image(), OBJECT.astype(float), _object_share, 1, steps=64)
    assert isinstance(curve, PerturbationCurve)
    assert curve.fractions[0] == 0.0 and curve.fractions[-1] == 1.0 and len(curve.scores) == 65
    expected = np.clip(1.0 - curve.fractions * 4.0, 0.0, None)  # the object is gone after 1/4 of the pixels
    np.testing.assert_allclose(curve.scores, expected, atol=1e-12, err_msg="deletion curve of the ideal order")
    assert curve.auc == pytest.approx(0.125), "triangle of height 1 and base 1/4"


def test_deletion_of_the_reversed_map_keeps_the_object_to_the_end():
    curve = deletion_curve(_object_image(), (~OBJECT).astype(float), _object_share, 1, steps=64)
    assert curve.auc == pytest.approx(0.75 + 0.125), "flat at 1 for 3/4, then a triangle"


def test_insertion_of_a_perfect_map():
    curve = insertion_curve(_object_image(), OBJECT.astype(float), _object_share, 1, steps=64, baseline=0.0)
    np.testing.assert_allclose(curve.scores, np.clip(curve.fractions * 4.0, None, 1.0), atol=1e-12)
    assert curve.auc == pytest.approx(0.125 + 0.75)


def test_curves_do_not_depend_on_batching_and_accept_array_baselines():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.5, 1.0, (2, 8, 8)).astype(np.float32)
    m = rng.random((8, 8))
    baseline = rng.uniform(0, 0.1, (2, 8, 8)).astype(np.float32)
    one = deletion_curve(image, m, _object_share, 1, steps=10, baseline=baseline, batch_size=3)
    all_at_once = deletion_curve(image, m, _object_share, 1, steps=10, baseline=baseline, batch_size=100)
    np.testing.assert_array_equal(one.scores, all_at_once.scores)
    assert one.scores[0] == pytest.approx(_object_share(image[None])[0, 1]), "first point: unchanged image"
    assert one.scores[-1] == pytest.approx(_object_share(baseline[None])[0, 1]), "last point: all baseline"
    # 64 pixels in 10 steps: boundaries round(6.4 k), so the fractions are not all equal.
    assert one.fractions.tolist() == [b / 64 for b in (0, 6, 13, 19, 26, 32, 38, 45, 51, 58, 64)]


def test_insertion_defaults_to_the_blurred_image():
    rng = np.random.default_rng(1)
    image = rng.random((2, 8, 8)).astype(np.float32)
    m = rng.random((8, 8))
    default = insertion_curve(image, m, _object_share, 1, steps=8)
    explicit = insertion_curve(image, m, _object_share, 1, steps=8, baseline=blurred_image(image))
    np.testing.assert_array_equal(default.scores, explicit.scores)
    assert default.scores[0] == pytest.approx(_object_share(blurred_image(image)[None])[0, 1])


def test_blurred_image_blurs_space_not_channels():
    image = np.zeros((3, 9, 9))
    image[1, 4, 4] = 1.0
    blurred = blurred_image(image, sigma=1.0)
    assert blurred[0].max() == 0.0 and blurred[2].max() == 0.0, "channels must not mix"
    assert blurred[1].sum() == pytest.approx(1.0) and blurred[1, 4, 4] < 1.0


def test_random_order_averages_to_the_diagonal():
    # A random order deletes object pixels at the overall rate: E[p(f)] = 1 - f, AUC 1/2. The AUC
    # of one order has a standard deviation near 0.06 here, of the mean of 100 orders near 0.006.
    curve = random_order_curve("deletion", _object_image(), _object_share, 1, steps=64, baseline=0.0,
                               repeats=100, seed=0)
    assert curve.auc == pytest.approx(0.5, abs=0.03)
    np.testing.assert_allclose(curve.scores, 1.0 - curve.fractions, atol=0.1)
    again = random_order_curve("deletion", _object_image(), _object_share, 1, steps=64, baseline=0.0,
                               repeats=100, seed=0)
    np.testing.assert_array_equal(curve.scores, again.scores, err_msg="a seed must reproduce the orders")
    insertion = random_order_curve("insertion", _object_image(), _object_share, 1, steps=64, baseline=0.0,
                                   repeats=100, seed=0)
    assert insertion.auc == pytest.approx(0.5, abs=0.03)


def test_perturbation_curves_reject_bad_input():
    image = _object_image()
    with pytest.raises(ValueError, match="differs"):
        deletion_curve(image, np.ones((4, 4)), _object_share, 1)
    with pytest.raises(ValueError, match="steps"):
        deletion_curve(image, np.ones((8, 8)), _object_share, 1, steps=65)
    with pytest.raises(ValueError, match="kind"):
        random_order_curve("both", image, _object_share, 1)
    with pytest.raises(ValueError, match="predict returned"):
        deletion_curve(image, np.ones((8, 8)), lambda batch: np.ones(len(batch)), 1)


# --------------------------------------------------------------------------------------------
# Rank correlation
# --------------------------------------------------------------------------------------------

def test_rank_correlation_known_values():
    rng = np.random.default_rng(0)
    m = rng.random((8, 8))
    assert rank_correlation(m, np.exp(5 * m)) == pytest.approx(1.0), "a monotone transform keeps the ranks"
    assert rank_correlation(m, -m) == pytest.approx(-1.0)
    # Ties take average ranks: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4).
    tied = rank_correlation(np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([[1.0, 2.0], [3.0, 4.0]]))
    ranks = np.array([1.5, 1.5, 3.0, 4.0])
    assert tied == pytest.approx(np.corrcoef(ranks, [1, 2, 3, 4])[0, 1])


def test_rank_correlation_rejects_constant_maps():
    with pytest.raises(ValueError, match="constant"):
        rank_correlation(np.ones((4, 4)), np.arange(16.0).reshape(4, 4))
    with pytest.raises(ValueError, match="same shape"):
        rank_correlation(np.random.rand(4, 4), np.random.rand(4, 5))


# --------------------------------------------------------------------------------------------
# Cross-checks against Quantus (an independent implementation)
# --------------------------------------------------------------------------------------------

def _quantus_batch(n=6, size=12, seed=0):
    """Images [N,3,H,W], maps [N,H,W] with a unique maximum, rectangular masks [N,H,W]."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, 3, size, size)).astype(np.float32)
    maps = rng.random((n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        top, left = rng.integers(0, size - 4, 2)
        masks[i, top:top + 4, left:left + rng.integers(2, 6)] = True
    # Half the maps put their maximum on the object, so both hits and misses are compared.
    for i in range(0, n, 2):
        maps[i][masks[i]] += 1.0
    return images, maps, masks


def test_pointing_game_matches_quantus():
    quantus = pytest.importorskip("quantus")
    images, maps, masks = _quantus_batch()
    # normalise=False, abs=False: Quantus would otherwise rescale or fold signs before the argmax.
    # Maps have a unique maximum, where Quantus' "any tied maximum" and our expected hit agree.
    metric = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)
    expected = metric(model=None, x_batch=images, y_batch=np.zeros(len(images), dtype=int),
                      a_batch=maps[:, None], s_batch=masks[:, None], channel_first=True)
    ours = [pointing_game(m, s) for m, s in zip(maps, masks)]
    assert set(ours) == {0.0, 1.0}, "the batch should hold both hits and misses"
    np.testing.assert_array_equal(ours, np.asarray(expected, dtype=float))


def test_energy_pointing_game_matches_quantus():
    quantus = pytest.importorskip("quantus")
    images, maps, masks = _quantus_batch(seed=1)
    maps = maps - 0.3  # signed maps: both clip negatives (positive_attributions=True)
    metric = quantus.AttributionLocalisation(positive_attributions=True, abs=False, normalise=False,
                                             disable_warnings=True)
    expected = metric(model=None, x_batch=images, y_batch=np.zeros(len(images), dtype=int),
                      a_batch=maps[:, None], s_batch=masks[:, None], channel_first=True)
    ours = [energy_pointing_game(m, s) for m, s in zip(maps, masks)]
    # Quantus divides by (total + 1e-9); totals here are ~30, so the relative gap is ~3e-11.
    np.testing.assert_allclose(ours, expected, rtol=1e-7)


def test_deletion_matches_quantus_pixel_flipping():
    """Quantus' PixelFlipping (Bach et al. 2015) is deletion without the unperturbed first point.

    Settings that make the two definitions coincide: Quantus orders features of the [C, H, W] input,
    our map is [H, W] broadcast over channels, so one step of ``k`` pixels is ``3 k`` features (a
    pixel's three equal copies sort next to each other because map values are distinct); its
    ``perturb_baseline`` is the same scalar fill (Quantus also asserts that ``features_in_step``
    divides H * W, hence 12 x 12 images and 4-pixel steps); ``softmax=True`` gives probabilities; no
    normalisation or abs. Quantus' curve is then our ``scores[1:]``; its AUC (np.trapz with dx=1 over
    step indices) is on another scale, so the curves are compared, not the AUCs.
    """
    quantus = pytest.importorskip("quantus")
    torch = pytest.importorskip("torch")
    images, maps, _ = _quantus_batch(n=4, size=12, seed=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 12 * 12, 3)).eval()
    labels = np.array([0, 1, 2, 1])

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))), 1).numpy()

    pixels_per_step = 4
    metric = quantus.PixelFlipping(features_in_step=3 * pixels_per_step, perturb_baseline=0.0, abs=False,
                                   normalise=False, disable_warnings=True)
    expected = metric(model=model, x_batch=images, y_batch=labels, a_batch=maps[:, None], channel_first=True,
                      softmax=True, device="cpu")
    for i in range(len(images)):
        curve = deletion_curve(images[i], maps[i], predict, int(labels[i]), steps=144 // pixels_per_step,
                               baseline=0.0)
        np.testing.assert_allclose(curve.scores[1:], expected[i], rtol=1e-5, atol=1e-7,
                                   err_msg=f"deletion curve of image {i} differs from Quantus' PixelFlipping")


def test_rank_correlation_matches_quantus_spearman():
    """Quantus' MPRT (model-parameter randomization) compares maps with ``correlation_spearman``."""
    pytest.importorskip("quantus")
    from quantus.functions.similarity_func import correlation_spearman

    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.random((16, 16))
        b = 0.5 * a + rng.random((16, 16))  # partly correlated
        b[:2] = 0.0                          # with ties
        assert rank_correlation(a, b) == pytest.approx(correlation_spearman(a.ravel(), b.ravel()), abs=1e-12)
