"""Saliency postprocessing: plain numpy/scipy/skimage functions, one step each.

The recipes' pipeline, ``gradient -> reduce_channels -> [clip_percentile] -> normalize_min_max
-> [equalize_histogram] -> map_to_original``:

    reduce "max":  max_c |g_c|       Simonyan et al., cs231n, the PyTorch ResNet-50 and VGG-19 recipes
    reduce "sum":  sum_c g_c         the TensorFlow 2 recipe's normalize_image (signed, no abs)
    reduce "l2":   sqrt(sum_c g_c^2)
    normalize:     (m - min) / (max - min), zeros for a flat map
    equalize:      skimage.exposure.equalize_hist (the ResNet-50 recipe), zeros for a flat map
    overlay:       m / percentile(m, 99), clipped at 1 (PAIR's VisualizeImageGrayscale)
    map back:      scipy.ndimage.zoom(order=1) onto the crop window ("crop") or the whole picture
                   ("stretch", what the ResNet-50 recipe does although its input was center-cropped)

Maps are 2-D float arrays; a NaN or Inf anywhere raises :class:`NonFiniteGradientError` instead of
rendering black.
"""

from __future__ import annotations

import numpy as np
from skimage import exposure

from gradmap import contract
from gradmap.runtime.errors import NonFiniteGradientError
from gradmap.runtime.preprocess import CropGeometry

__all__ = [
    "REDUCTIONS",
    "PLACEMENTS",
    "check_finite",
    "clip_percentile",
    "equalize_histogram",
    "map_to_original",
    "normalize_min_max",
    "reduce_channels",
    "scale_to_percentile",
    "softmax",
    "top_k",
]

REDUCTIONS = contract.REDUCTIONS
PLACEMENTS = contract.PLACEMENTS


def _as_float(values: np.ndarray) -> np.ndarray:
    # Integer and bool maps become float64 (exact for every int32, no wrap-around in differences),
    # float16 becomes float32 (skimage's binning overflows in float16); other floats stay as they are.
    m = np.asarray(values)
    if m.dtype.kind in "biu":
        return m.astype(np.float64)
    return m.astype(np.float32) if m.dtype == np.float16 else m


def check_finite(values: np.ndarray, what: str = "gradient") -> None:
    """Raise :class:`NonFiniteGradientError` if ``values`` holds NaN or Inf, saying how many."""
    finite = np.isfinite(values)
    if not finite.all():
        nan = int(np.isnan(values).sum())
        inf = int((~finite).sum()) - nan
        raise NonFiniteGradientError(f"{what} has {nan} NaN and {inf} infinite values out of {values.size}")


def reduce_channels(gradient: np.ndarray, method: str = contract.DEFAULT_REDUCTION, channel_axis: int = 0) -> np.ndarray:
    """Collapse the colour channels of a gradient into one saliency value per pixel.

    Args:
        gradient: e.g. [3, H, W] (``channel_axis=0``) or [N, 3, H, W] (``channel_axis=1``).
        method: ``"max"`` of absolute values (default), signed ``"sum"`` (TensorFlow recipe), or ``"l2"``.

    Returns:
        the map without the channel axis: float32 for ``"max"`` (exact; float64 for a float64
        gradient), float64 for ``"sum"`` and ``"l2"`` so that large float32 gradients cannot overflow
        to Inf. Integer and bool gradients are taken as float32. A float64 gradient beyond 2**500 is
        first scaled down by a power of two for "sum" and "l2", so that the map stays finite.

    Example:
        >>> reduce_channels(np.array([[[1.0]], [[-3.0]], [[2.0]]]), "max")
        array([[3.]], dtype=float32)
    """
    check_finite(gradient)
    g = np.asarray(gradient)
    # float64 stays float64: a cast to float32 would turn values beyond 3.4e38 into Inf.
    g = g.astype(np.float64 if g.dtype == np.float64 else np.float32, copy=False)
    if method == "max":
        return np.abs(g).max(axis=channel_axis)
    if method in ("sum", "l2") and g.dtype == np.float64 and g.size and np.abs(g).max() > 2.0 ** 500:
        # float64 sums and squares overflow near 1e154 and 1e308: divide by an exact power of two.
        # Only the map's shape matters downstream (it is min-max normalized or equalized).
        g = np.ldexp(g, -int(np.frexp(np.abs(g).max())[1]))
    if method == "sum":
        return g.sum(axis=channel_axis, dtype=np.float64)
    if method == "l2":
        return np.sqrt(np.square(g, dtype=np.float64).sum(axis=channel_axis))
    raise ValueError(f"unknown channel reduction {method!r}; choose one of {', '.join(REDUCTIONS)}")


def normalize_min_max(saliency_map: np.ndarray) -> np.ndarray:
    """Scale linearly to [0, 1]; a flat map (max == min) becomes zeros, never NaN.

    Computed in float64 so that extreme float32 ranges cannot overflow, returned as float32.
    """
    check_finite(saliency_map, "saliency map")
    m = np.asarray(saliency_map, dtype=np.float64)
    if m.size == 0:
        return m.astype(np.float32)
    low, high = m.min(), m.max()
    if not high > low:
        return np.zeros(m.shape, dtype=np.float32)
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(high - low)
    if overflows:  # a range beyond float64's limit: halve everything, exactly
        m, low, high = m * 0.5, low * 0.5, high * 0.5
    return np.clip((m - low) / (high - low), 0.0, 1.0).astype(np.float32)


def equalize_histogram(saliency_map: np.ndarray, nbins: int = 256) -> np.ndarray:
    """Histogram equalization (``skimage.exposure.equalize_hist``), as in the ResNet-50 recipe.

    Spreads the few bright gradient pixels and the many dark ones evenly over [0, 1]. skimage returns
    0.5 everywhere for a flat map; here a flat map gives zeros, like :func:`normalize_min_max`.
    """
    check_finite(saliency_map, "saliency map")
    m = _as_float(saliency_map)
    if m.size == 0 or not m.max() > m.min():
        return np.zeros(m.shape, dtype=np.float32)
    if m.dtype != np.float64 and np.abs(m).max() > np.finfo(np.float32).max / 4:
        # skimage's bin arithmetic overflows near the float32 limit; recipe-sized values keep their
        # own dtype so that bins (and results) are exactly skimage's.
        m = m.astype(np.float64)
    elif m.dtype == np.float64 and np.abs(m).max() > np.finfo(np.float64).max / 4:
        m = m * 0.25  # the same near float64's limit; a power of two changes no bin
    try:
        equalized = exposure.equalize_hist(m, nbins=nbins)
    except ValueError:
        # numpy cannot cut a range this narrow for its magnitude (e.g. [1e10, 1e10 + 1e-3] in float64)
        # into finite bins; equalize the min-max normalized map instead, same ranks.
        equalized = exposure.equalize_hist(normalize_min_max(m).astype(np.float64), nbins=nbins)
    return np.clip(equalized, 0.0, 1.0).astype(np.float32)


def clip_percentile(saliency_map: np.ndarray, low: float = 0.0, high: float = 99.0) -> np.ndarray:
    """Clip to the [low, high] percentiles so that a few extreme pixels do not darken the rest.

    Apply before :func:`normalize_min_max`. ``high=99`` is a common choice for gradients.
    """
    if not 0.0 <= low <= high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low <= high <= 100, got {low}, {high}")
    check_finite(saliency_map, "saliency map")
    m = _as_float(saliency_map)
    if m.size == 0:
        return m.copy()
    with np.errstate(over="ignore"):
        fits = np.isfinite(m.max() - m.min())
    if fits:
        lo, hi = np.percentile(m, [low, high])
    else:  # numpy's interpolation overflows on a range beyond the dtype's limit; halving is exact
        lo, hi = 2 * np.percentile(m * 0.5, [low, high])
    return np.clip(m, lo, hi)


def scale_to_percentile(saliency_map: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Divide a map in [0, 1] by its ``percentile`` percentile and clip at 1, as PAIR saliency's
    ``VisualizeImageGrayscale``: the strongest pixels saturate instead of making the rest look
    empty. A map whose percentile is 0 (mostly zeros) is divided by its maximum instead; an all-zero
    map gives zeros. Returns float32.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    check_finite(saliency_map, "saliency map")
    m = np.asarray(saliency_map, dtype=np.float64)
    if m.size == 0:
        return m.astype(np.float32)
    level = float(np.percentile(m, percentile))
    if not level > 0:
        level = float(m.max())
        if not level > 0:
            return np.zeros(m.shape, dtype=np.float32)
    return np.clip(m / level, 0.0, 1.0).astype(np.float32)


def map_to_original(saliency_map: np.ndarray, geometry: CropGeometry, placement: str = contract.DEFAULT_PLACEMENT,
                    order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Put a map computed on the model input back onto the original picture.

    Args:
        saliency_map: [h, w] map on the model's input.
        geometry: where the input came from (:func:`gradmap.runtime.preprocess`).
        placement: ``"crop"`` zooms the map onto the crop window, in original-picture pixels, and
            leaves the rest of the picture empty; ``"stretch"`` zooms it over the whole picture, as
            the ResNet-50 recipe does (misplaced when the input was center-cropped).
        order: spline order of ``scipy.ndimage.zoom`` (1 = bilinear, as in the recipe).

    Returns:
        ``(values, covered)``: float32 [H, W] map (0 outside the window) and a bool [H, W] mask of the
        pixels the map covers.
    """
    check_finite(saliency_map, "saliency map")
    m = np.asarray(saliency_map, dtype=np.float32)
    height, width = geometry.original_size
    if placement == "stretch":
        zoomed = zoom(m, (height / m.shape[0], width / m.shape[1]), order=order)
        return _fit(zoomed, (height, width)), np.ones((height, width), dtype=bool)
    if placement != "crop":
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    top, left, bottom, right = (int(round(v)) for v in geometry.box_in_original)
    box_h, box_w = max(bottom - top, 1), max(right - left, 1)
    zoomed = _fit(zoom(m, (box_h / m.shape[0], box_w / m.shape[1]), order=order), (box_h, box_w))
    values = np.zeros((height, width), dtype=np.float32)
    covered = np.zeros((height, width), dtype=bool)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + box_h, height), min(left + box_w, width)
    if y1 > y0 and x1 > x0:
        values[y0:y1, x0:x1] = zoomed[y0 - top:y1 - top, x0 - left:x1 - left]
        covered[y0:y1, x0:x1] = True
    return values, covered


def zoom(m: np.ndarray, factors: tuple[float, float], order: int = 1) -> np.ndarray:
    """``scipy.ndimage.zoom(m, factors, order=order)`` of a 2-D float32 map, bit for bit.

    Order 1 (bilinear, the maps' case) is computed here with scipy's arithmetic: output index k of
    an axis reads input coordinate k (n_in - 1) / (n_out - 1), and each output value is the float64
    sum, in scipy's order, of the four neighbours times their weights, cast to float32. It spares
    ``gradmap run`` importing scipy (25 MB of its 490 MB peak for one resnet50 map). Other orders
    call scipy."""
    if order != 1 or m.ndim != 2 or m.dtype != np.float32:
        from scipy import ndimage

        return ndimage.zoom(m, factors, order=order)
    shape = tuple(int(round(n * f)) for n, f in zip(m.shape, factors))
    lows, highs, lo_weights, hi_weights = [], [], [], []
    for n_in, n_out in zip(m.shape, shape):
        step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        coords = np.arange(n_out, dtype=np.float64) * step
        low = np.floor(coords).astype(np.int64)
        frac = coords - low
        lows.append(np.minimum(low, n_in - 1))
        highs.append(np.minimum(low + 1, n_in - 1))  # weight 0 where it is past the edge
        lo_weights.append(1.0 - frac)
        hi_weights.append(frac)
    data = m.astype(np.float64)
    (r0, r1), (c0, c1) = (lows[0], highs[0]), (lows[1], highs[1])
    wy0, wy1 = lo_weights[0][:, None], hi_weights[0][:, None]
    wx0, wx1 = lo_weights[1][None, :], hi_weights[1][None, :]
    total = data[np.ix_(r0, c0)] * wy0 * wx0
    total += data[np.ix_(r0, c1)] * wy0 * wx1
    total += data[np.ix_(r1, c0)] * wy1 * wx0
    total += data[np.ix_(r1, c1)] * wy1 * wx1
    return total.astype(np.float32)


def _fit(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    # ndimage.zoom rounds its output shape; a float zoom factor can land one pixel short or long.
    out = array[:shape[0], :shape[1]]
    pad = ((0, shape[0] - out.shape[0]), (0, shape[1] - out.shape[1]))
    return np.pad(out, pad, mode="edge") if any(p[1] for p in pad) else out


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Probabilities from logits (float64, shifted by the max for stability)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores of a 1-D array, largest first; ties go to the lower index."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order[:k]
