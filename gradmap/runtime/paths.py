"""Path and region methods built on a model's gradient, batched, torch-free.

    Blur IG     -sum_i (s_{i+1} - s_i) * dB(x, s)/ds|_{s_i} * dS/dx(B(x, s_i)),  B a Gaussian blur of
                sigma s (zero padding), s_i = i * max_sigma / steps, dB/ds by a forward difference of
                grad_step                                                 (Xu et al. 2020)
    Guided IG   integrated gradients along a path that, at each of ``steps`` steps, moves the
                ``fraction`` of features with the smallest |gradient| first, never further than
                ``max_dist`` (in path fraction) from the straight line     (Kapishnikov et al. 2021)
    XRAI        integrated gradients (two baselines, averaged; max over channels) summed into
                regions: Felzenszwalb segments at six scales, dilated, added greedily by their
                attribution density over what they add                     (Kapishnikov et al. 2019)

The arithmetic follows the paper authors' implementation (the ``saliency`` package, PAIR);
tests/test_methods_path.py checks it against that package on the same inputs. The model is only
ever asked for gradients, in batches: Blur IG batches its steps, Guided IG its pictures (each step
depends on the last), XRAI its two integrated-gradient paths.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Callable

import numpy as np

from gradmap.runtime.methods import (
    Attribution,
    GradientFn,
    MethodSpec,
    ModelRuns,
    _alphas,
    _gradient_output,
    baseline_image,
    gradient_function,
    path_gradients,
    score_of,
)

__all__ = [
    "blur_ig", "guided_ig", "xrai", "xrai_segments", "xrai_regions", "XRAI_BASELINES", "XRAI_SEARCHES",
    "blur_ig_method", "guided_ig_method", "xrai_method",
]

#: XRAI's integrated-gradient baselines: black and white pictures (the paper's), or constant
#: pictures at the input's smallest and largest value (the ``saliency`` package's default).
XRAI_BASELINES = ("black-white", "input-range")
#: XRAI's region search: ``full`` re-scores every region against what is already covered after each
#: one is added; ``fast`` ranks them once by their own density.
XRAI_SEARCHES = ("full", "fast")

# Felzenszwalb segmentation as the XRAI paper's implementation runs it: the picture rescaled to
# [-1, 1] and resized to 224 x 224, six scales, sigma 0.8, segments of at least 150 pixels, each
# segment dilated by a disk of radius 5; a region must add at least 50 uncovered pixels.
_SEGMENT_SIZE = (224, 224)
_SEGMENT_SCALES = (50, 100, 150, 250, 500, 1200)
_SEGMENT_SIGMA = 0.8
_SEGMENT_MIN_SIZE = 150
_DILATION_RADIUS = 5
_MIN_PIXEL_DIFF = 50


# -- Blur IG ---------------------------------------------------------------------------------------
def _blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """[size, size] matrix B with B @ v the Gaussian blur of v (zero padding), the kernel
    scipy.ndimage.gaussian_filter uses (radius ``int(truncate * sigma + 0.5)``, normalized)."""
    if sigma == 0:
        return np.eye(size)
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / sigma ** 2 * offsets.astype(np.float64) ** 2)
    kernel /= kernel.sum()
    rows = np.arange(size)[:, None]
    delta = np.arange(size)[None, :] - rows
    inside = np.abs(delta) <= radius
    return np.where(inside, kernel[np.clip(delta + radius, 0, 2 * radius)], 0.0)


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two spatial axes of [..., H, W], zero padding, in float64 (equal to
    ``ndimage.gaussian_filter(images, (0, .., sigma, sigma), mode="constant")`` up to rounding, and
    a matrix product on a 224 x 224 picture where the filter's 401-tap loop is not)."""
    h, w = images.shape[-2:]
    return _blur_matrix(h, sigma) @ np.asarray(images, np.float64) @ _blur_matrix(w, sigma).T


def blur_ig(fn: GradientFn, images: np.ndarray, targets: np.ndarray, *, steps: int = 100, max_sigma: float = 50.0,
            grad_step: float = 0.01, batch_size: int = 16, score: str = "logit",
            logits_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> Attribution:
    """Blur integrated gradients: attribution along the path from the picture blurred with
    ``max_sigma`` (pixels) to the picture, in ``steps`` steps.

    Args:
        grad_step: the sigma step of the forward difference that gives the path's direction.
        batch_size: pictures x steps per gradient call.
        logits_fn: logits of a batch from the forward pass alone (``SaliencyModel.logits``), for the
            blurred end's score; ``fn`` by default.

    The completeness gap reported is |sum attribution - (F(x) - F(blurred x))|, F the model's score
    (``score``: logit, probability or log-probability, :func:`~gradmap.runtime.methods.score_of`).
    """
    if steps < 1:
        raise ValueError(f"Blur IG needs at least one step, got steps={steps}")
    if not max_sigma > 0:
        raise ValueError(f"Blur IG's max_sigma must be > 0 pixels, got {max_sigma}")
    if not grad_step > 0:
        raise ValueError(f"Blur IG's grad_step must be > 0, got {grad_step}")
    n = len(images)
    sigmas = [i * max_sigma / steps for i in range(steps + 1)]
    blurred = _blur(images, max_sigma).astype(np.float32)
    # the blurred end's forward before any gradient: the gradient session's threads spin for a while
    # after each of its runs, and a forward run then shares the cores with them (SaliencyModel._forward_session)
    blurred_logits = logits_fn(blurred) if logits_fn is not None else None
    chunk = max(1, batch_size // max(n, 1))
    chunks = [range(start, min(start + chunk, steps)) for start in range(1, steps, chunk)]

    def path_points(idx):  # the blurred pictures at sigma_i and the path's direction there, [N, k, 3, H, W]
        points = np.stack([_blur(images, sigmas[i]) for i in idx], axis=1)
        direction = np.stack([(_blur(images, sigmas[i] + grad_step) - points[:, j]) / grad_step
                              for j, i in enumerate(idx)], axis=1)
        return points, direction

    # the first chunk's blurs before the first gradient too (matrix products on both cores)
    ahead = path_points(chunks[0]) if chunks else None
    first_direction = (_blur(images, grad_step) - images) / grad_step
    # the path's first point (sigma 0) is the picture: its gradient call also resolves the targets
    logits, target_index, first = fn(images, targets)
    total = (sigmas[1] - sigmas[0]) * first_direction * first
    for k, idx in enumerate(chunks):
        points, direction = ahead if k == 0 else path_points(idx)
        _, _, grads = fn(points.reshape(-1, *images.shape[1:]).astype(np.float32), np.repeat(target_index, len(idx)))
        grads = grads.reshape(n, len(idx), *images.shape[1:]).astype(np.float64)
        widths = np.array([sigmas[i + 1] - sigmas[i] for i in idx])[None, :, None, None, None]
        total += (widths * direction * grads).sum(1)
    values = -total
    if blurred_logits is None:
        blurred_logits = fn(blurred, target_index)[0]
    gap = np.abs(values.reshape(n, -1).sum(1) - (score_of(logits, target_index, score)
                                                 - score_of(blurred_logits, target_index, score)))
    return Attribution(values.astype(np.float32), target_index, logits, completeness_gap=gap)


# -- Guided IG -------------------------------------------------------------------------------------
def _lower_quantile(values: np.ndarray, q: float) -> float:
    """``np.quantile(values, q, method="lower")`` by a partition (O(n), not a sort)."""
    n = values.size
    k = int(math.floor(n * q + (1 + q * (1 - 1 - 1)) - 1))  # numpy's virtual index for "lower"
    k = min(max(k, 0), n - 1)
    return float(np.partition(values, k)[k])


def _guided_step(x, x_input, x_baseline, grad_actual, step, steps, fraction, max_dist, l1_total, attr):
    """One step of Guided IG on one picture (float64, flat), updating ``x`` and ``attr`` in place.

    PAIR's arithmetic on whole arrays with masks (no gathers and scatters), and the step's
    attribution added once, (x after - x before) * gradient, instead of once per pass of the loop:
    the gradient is the same throughout a step."""
    x_start = x.copy()
    grad = grad_actual.copy()
    total = x_input - x_baseline
    alpha = (step + 1.0) / steps
    alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
    x_min = x_baseline + total * alpha_min
    x_max = x_baseline + total * alpha_max
    l1_target = l1_total * (1 - (step + 1) / steps)
    moving = total != 0
    x_alpha = np.empty_like(x)
    work = np.empty_like(x)
    gamma = np.inf
    while gamma > 1.0:
        x_alpha.fill(alpha_max)  # a feature that does not move counts as ahead
        np.subtract(x, x_baseline, out=work)
        np.divide(work, total, out=x_alpha, where=moving)
        np.copyto(x, x_min, where=x_alpha < alpha_min)  # features behind the line catch up
        np.subtract(x, x_input, out=work)
        l1_current = np.abs(work, out=work).sum()
        if math.isclose(l1_target, l1_current, rel_tol=1e-9, abs_tol=1e-9):
            break
        np.copyto(grad, np.inf, where=x == x_max)  # features at the front do not move further
        magnitude = np.abs(grad)
        threshold = _lower_quantile(magnitude, fraction)
        selected = (magnitude <= threshold) & (grad != np.inf)
        np.subtract(x, x_max, out=work)
        np.abs(work, out=work)
        work *= selected
        l1_s = work.sum()
        gamma = (l1_current - l1_target) / l1_s if l1_s > 0 else np.inf
        if gamma > 1.0:
            np.copyto(x, x_max, where=selected)
        else:
            np.copyto(x, x + (x_max - x) * gamma, where=selected)  # gamma of the way to x_max
    np.subtract(x, x_start, out=work)
    work *= grad_actual
    attr += work


def guided_ig(fn: GradientFn, images: np.ndarray, targets: np.ndarray, baselines: np.ndarray, *, steps: int = 200,
              fraction: float = 0.25, max_dist: float = 0.02, score: str = "logit",
              logits_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> Attribution:
    """Guided integrated gradients from ``baselines`` (same shape as ``images``).

    Args:
        steps: path steps; each is one gradient per picture (the pictures of a batch go together).
        fraction: the share of features (those with the smallest |gradient|) moved at a time.
        max_dist: how far (as a fraction of the path) a feature may run ahead of the straight line;
            0 gives integrated gradients on the straight line, 1 an unbounded path.
        logits_fn: logits from the forward pass alone, for the picture's score and top-1 class (its
            gradient is never on the path; the baseline's score comes from the path's first step);
            ``fn`` by default.

    The completeness gap reported is |sum attribution - (F(x) - F(x0))|, F the model's score (``score``).
    """
    if baselines.shape != images.shape:
        raise ValueError(f"baselines {baselines.shape} must match images {images.shape}")
    if steps < 1:
        raise ValueError(f"Guided IG needs at least one step, got steps={steps}")
    if not 0 < fraction <= 1:
        raise ValueError(f"Guided IG's fraction must be in (0, 1], got {fraction}")
    if not 0 <= max_dist <= 1:
        raise ValueError(f"Guided IG's max_dist must be in [0, 1], got {max_dist}")
    n = len(images)
    if logits_fn is not None:  # the picture's forward alone: its gradient is never on the path
        logits = logits_fn(images)
        targets = np.asarray(targets, np.int64)
        if targets.shape != (n,) or np.any(targets < -1) or np.any(targets >= logits.shape[1]):
            raise ValueError(f"targets must be {n} class indices below {logits.shape[1]} or -1 (the top-1 class), "
                             f"got {targets.tolist()}")
        target_index = np.where(targets < 0, logits.argmax(1), targets)  # the graph's rule: the first of equal logits
    else:
        logits, target_index, _ = fn(images, targets)
    x_input = images.reshape(n, -1).astype(np.float64)
    x_baseline = baselines.reshape(n, -1).astype(np.float64)
    x = x_baseline.copy()
    attr = np.zeros_like(x_input)
    l1_total = np.abs(x_input - x_baseline).sum(1)
    live = [i for i in range(n) if l1_total[i] != 0]  # a picture equal to its baseline has attribution 0
    base_logits = logits.copy()  # a picture equal to its baseline: its own logits
    for step in range(steps):
        if not live:
            break
        step_logits, _, grads = fn(x[live].reshape(len(live), *images.shape[1:]).astype(np.float32), target_index[live])
        if step == 0:  # the path starts at the baseline itself
            base_logits[live] = step_logits
        grads = grads.reshape(len(live), -1).astype(np.float64)
        for j, i in enumerate(live):
            _guided_step(x[i], x_input[i], x_baseline[i], grads[j], step, steps, fraction, max_dist, l1_total[i],
                         attr[i])
    gap = np.abs(attr.sum(1) - (score_of(logits, target_index, score) - score_of(base_logits, target_index, score)))
    return Attribution(attr.reshape(images.shape).astype(np.float32), target_index, logits, completeness_gap=gap)


# -- XRAI ------------------------------------------------------------------------------------------
# Segments of recent pictures, by their bytes: ``gradmap evaluate`` explains each picture with the
# model and its randomized copies, and the segmentation (six Felzenszwalb runs at 224 x 224) costs
# more than a short integration path. Bounded by the index arrays' bytes.
_SEGMENT_CACHE: "OrderedDict[bytes, list[np.ndarray]]" = OrderedDict()
_SEGMENT_CACHE_BYTES = 256 * 2 ** 20


def xrai_segments(image: np.ndarray) -> list[np.ndarray]:
    """XRAI's candidate regions of one picture [3, H, W] (the model's input): flat pixel indices
    of each Felzenszwalb segment, six scales, each segment dilated by a disk of radius 5."""
    image = np.ascontiguousarray(image)
    key = hashlib.blake2b(image.tobytes(), digest_size=16, person=str(image.shape).encode()[:16]).digest()
    if key in _SEGMENT_CACHE:
        _SEGMENT_CACHE.move_to_end(key)
        return _SEGMENT_CACHE[key]
    regions = _felzenszwalb_regions(image)
    _SEGMENT_CACHE[key] = regions
    while sum(r.nbytes for rs in _SEGMENT_CACHE.values() for r in rs) > _SEGMENT_CACHE_BYTES and len(_SEGMENT_CACHE) > 1:
        _SEGMENT_CACHE.popitem(last=False)
    return regions


def _felzenszwalb_regions(image: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage
    from skimage import segmentation
    from skimage.morphology import disk
    from skimage.transform import resize

    hwc = np.moveaxis(np.asarray(image, np.float64), 0, -1)
    h, w = hwc.shape[:2]
    low, high = hwc.min(), hwc.max()
    scaled = (hwc - low) / (high - low) * 2.0 - 1.0 if high > low else np.zeros_like(hwc)
    scaled = resize(scaled, _SEGMENT_SIZE, order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    footprint = disk(_DILATION_RADIUS).astype(bool)
    regions = []
    for scale in _SEGMENT_SCALES:
        labels = segmentation.felzenszwalb(scaled, scale=scale, sigma=_SEGMENT_SIGMA, min_size=_SEGMENT_MIN_SIZE)
        labels = resize(labels, (h, w), order=0, preserve_range=True, mode="constant", anti_aliasing=False).astype(int)
        first = labels.min()
        boxes = ndimage.find_objects(labels - first + 1)
        for label in range(first, labels.max() + 1):
            box = boxes[label - first] if label - first < len(boxes) else None
            if box is None:  # a segment the resize lost: an empty region
                regions.append(np.zeros(0, np.int64))
                continue
            r = _DILATION_RADIUS
            rows = slice(max(box[0].start - r, 0), min(box[0].stop + r, h))
            cols = slice(max(box[1].start - r, 0), min(box[1].stop + r, w))
            grown = ndimage.binary_dilation(labels[rows, cols] == label, structure=footprint)
            ys, xs = np.nonzero(grown)
            regions.append(((ys + rows.start) * w + xs + cols.start).astype(np.int64))
    return regions


def xrai_regions(attr: np.ndarray, regions: list[np.ndarray], *, search: str = "full", area: float = 1.0,
                 min_pixel_diff: int = _MIN_PIXEL_DIFF) -> tuple[np.ndarray, np.ndarray]:
    """XRAI's map of one picture from its attribution [H, W] and candidate regions (flat indices).

    Returns (map [H, W] float64: each pixel the attribution density of the region that added it,
    ranks [H, W] int: 1 for the most important region, ...). ``full`` adds, again and again, the
    region whose not yet covered pixels have the highest mean attribution, until ``area`` of the
    picture is covered; ``fast`` ranks the regions once by their own mean. Pixels no region covered
    get their own mean.
    """
    if search not in XRAI_SEARCHES:
        raise ValueError(f"XRAI search {search!r} is not one of {', '.join(XRAI_SEARCHES)}")
    from scipy import sparse

    shape = attr.shape
    flat = np.asarray(attr, np.float64).ravel()
    size = flat.size
    covered = np.zeros(size, bool)
    out = np.full(size, -np.inf)
    trace: list[tuple[np.ndarray, float]] = []
    if search == "full":
        counts = np.array([len(r) for r in regions], np.int64)
        incidence = sparse.csr_matrix((np.ones(int(counts.sum())), np.concatenate(regions or [np.zeros(0, np.int64)]),
                                       np.concatenate([[0], np.cumsum(counts)])), shape=(len(regions), size))
        by_pixel = incidence.T.tocsr()
        sums = np.asarray(incidence @ flat).ravel()
        left = counts.astype(np.float64)  # uncovered pixels per region
        alive = np.ones(len(regions), bool)
        area_done = 0.0
        while area_done <= area:
            alive &= left >= min_pixel_diff
            if not alive.any():
                break
            gains = np.where(alive, sums / np.where(left > 0, left, 1), -np.inf)
            best = int(np.argmax(gains))  # the first of equal gains, as a scan in region order keeps
            gain = float(gains[best])
            added = regions[best][~covered[regions[best]]]
            trace.append((added, gain))
            out[added] = gain
            covered[added] = True
            area_done = covered.mean()
            alive[best] = False
            rows = by_pixel[added]
            left -= np.asarray(rows.sum(0)).ravel()
            sums -= np.asarray(rows.T @ flat[added]).ravel()
    else:
        own = np.array([flat[r].mean() if len(r) else -np.inf for r in regions])
        for index in np.argsort(-own, kind="stable"):
            region = regions[index]
            added = region[~covered[region]]
            if len(added) < min_pixel_diff:
                continue
            gain = float(flat[added].mean())
            trace.append((added, gain))
            out[added] = gain
            covered[region] = True
    rest = out == -np.inf
    if rest.any():
        out[rest] = flat[rest].mean()
    ranks = np.zeros(size, np.int64)
    order = sorted(trace, key=lambda t: -t[1])
    for rank, (added, _) in enumerate(order, start=1):
        ranks[added] = rank
    if rest.any():
        ranks[rest] = len(order) + 1
    return out.reshape(shape), ranks.reshape(shape)


def _xrai_baselines(images: np.ndarray, kind: str, mean, std, value_range: str) -> list[np.ndarray]:
    if kind == "black-white":
        mean = np.asarray(mean, np.float32)[None, :, None, None]
        std = np.asarray(std, np.float32)[None, :, None, None]
        white = np.float32(255 if value_range == "0-255" else 1)
        return [np.broadcast_to((0 - mean) / std, images.shape).astype(np.float32),
                np.broadcast_to((white - mean) / std, images.shape).astype(np.float32)]
    if kind == "input-range":
        n = len(images)
        low = images.reshape(n, -1).min(1)[:, None, None, None]
        high = images.reshape(n, -1).max(1)[:, None, None, None]
        return [np.broadcast_to(low, images.shape).astype(np.float32),
                np.broadcast_to(high, images.shape).astype(np.float32)]
    raise ValueError(f"XRAI baselines {kind!r} are not one of {', '.join(XRAI_BASELINES)}")


def xrai(fn: GradientFn, images: np.ndarray, targets: np.ndarray, baselines: list[np.ndarray], *, steps: int = 32,
         rule: str = "gauss-legendre", search: str = "full", area: float = 1.0,
         segments: list[list[np.ndarray]] | None = None) -> Attribution:
    """XRAI maps [N, 1, H, W] (each pixel its region's attribution density).

    Args:
        baselines: the integrated-gradient baselines, each shaped like ``images``; their
            attributions are averaged.
        steps, rule: the integrated-gradient path (see :func:`~gradmap.runtime.methods.integrated_gradients`).
        search, area: see :func:`xrai_regions`.
        segments: candidate regions per picture (flat pixel indices); :func:`xrai_segments` by default.
    """
    n, _, h, w = images.shape
    if h * w < _MIN_PIXEL_DIFF:
        raise ValueError(f"XRAI needs pictures of at least {_MIN_PIXEL_DIFF} pixels (a region must add that many), "
                         f"got {h} x {w}")
    if not 0 <= area <= 1:
        raise ValueError(f"XRAI's area must be in [0, 1], got {area}")
    if search not in XRAI_SEARCHES:
        raise ValueError(f"XRAI search {search!r} is not one of {', '.join(XRAI_SEARCHES)}")
    if not baselines or any(b.shape != images.shape for b in baselines):
        raise ValueError(f"XRAI needs baselines shaped like the images {images.shape}")
    if segments is not None and len(segments) != n:
        raise ValueError(f"segments are given for {len(segments)} pictures, not {n}")
    alphas, weights = _alphas(steps, rule)
    logits, target_index, _ = fn(images, targets)
    # one path per baseline at a time (a path holds steps copies of the batch); mean over baselines,
    # then max over channels
    attr = sum((images - b) * path_gradients(fn, images, b, target_index, alphas, weights) for b in baselines)
    attr = (attr / len(baselines)).max(1)
    maps = np.empty((n, 1, h, w), np.float32)
    for i in range(n):
        regions = segments[i] if segments is not None else xrai_segments(images[i])
        maps[i, 0] = xrai_regions(attr[i], regions, search=search, area=area)[0]
    return Attribution(maps, target_index, logits)


# -- the method table's implementations ------------------------------------------------------------
def blur_ig_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                   batch_size: int = 16) -> Attribution:
    fn = gradient_function(model, _gradient_output(spec.method), batch_size)
    return blur_ig(fn, images, targets, steps=spec.steps, max_sigma=spec.max_sigma, grad_step=spec.grad_step,
                   batch_size=batch_size, score=model.metadata.score, logits_fn=model.logits)


def guided_ig_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                     batch_size: int = 16) -> Attribution:
    pre = model.metadata.preprocessing
    baselines = baseline_image(images, spec.baseline, pre.mean, pre.std, seed=spec.seed, value_range=pre.value_range)
    fn = gradient_function(model, _gradient_output(spec.method), batch_size)
    return guided_ig(fn, images, targets, baselines, steps=spec.steps, fraction=spec.fraction,
                     max_dist=spec.max_dist, score=model.metadata.score, logits_fn=model.logits)


def xrai_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                batch_size: int = 16) -> Attribution:
    pre = model.metadata.preprocessing
    baselines = _xrai_baselines(images, spec.baselines, pre.mean, pre.std, pre.value_range)
    fn = gradient_function(model, _gradient_output(spec.method), batch_size)
    return xrai(fn, images, targets, baselines, steps=spec.steps, rule=spec.rule, search=spec.search, area=spec.area)


def _xrai_runs(model, spec: MethodSpec) -> ModelRuns:
    paths = 2  # both XRAI_BASELINES choices integrate from two baselines
    return ModelRuns(paths * spec.steps, ("steps",), per_unit=paths, detail=f"{paths} baselines x {spec.steps} steps")


xrai_method.runs = _xrai_runs  # type: ignore[attr-defined]  # methods.model_runs
