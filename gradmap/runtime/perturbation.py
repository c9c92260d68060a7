"""Perturbation methods: attributions from the model's forward pass alone, batched, seeded, torch-free.

    occlusion   (Zeiler & Fergus 2014): a window of the baseline slides over the input; a pixel's value is
                the mean drop of the score, S(x) - S(x with the window occluded), over the windows that
                cover it. Window positions 0, stride, 2 stride, ... until the window reaches the far edge
                (the last one may stick out and is cut there), as Captum's Occlusion places them.
    RISE        (Petsiuk, Das & Saenko 2018): N random masks, each a grid x grid binary grid (cells kept
                with probability p) upsampled bilinearly to (grid + 1) cells and shifted by a random
                offset within one cell; saliency = sum_i P(class | x masked by M_i) M_i / (N p), the
                masked input x0 + M (x - x0), x0 the baseline.
    Score-CAM   (Wang et al. 2020): each channel of the CAM layer's activation, upsampled (bilinear,
                corners aligned) to the input and min-max scaled to [0, 1], masks the input (x * mask);
                the channel's weight is the softmax over channels of the scores of those masked inputs;
                cam = ReLU(sum_c w_c A_c), as pytorch-grad-cam's ScoreCAM computes it.

The masked copies are scored by the forward part of the graph alone
(:meth:`SaliencyModel.logits <gradmap.runtime.model.SaliencyModel.logits>`, cut out of the file once):
onnxruntime would otherwise compute the gradient outputs for each copy too. Masked copies go to onnxruntime ``mask_batch`` at a time (0: as many
as fit :data:`MEMORY_BUDGET`); ``batch_size`` (pictures per batch) does not change them. Long runs
report progress through :data:`progress` (the CLI shows it on stderr) and log it at INFO.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from typing import Callable, Iterator

import numpy as np

from gradmap.contract import OUTPUT_CAM_ACTIVATION, OUTPUT_LOGITS, OUTPUT_TARGET_INDEX
from gradmap.runtime.methods import Attribution, MethodSpec, ModelRuns, baseline_image, score_of

__all__ = ["MEMORY_BUDGET", "progress", "masks_per_run", "occlusion", "rise", "rise_masks", "score_cam",
           "occlusion_windows", "bilinear_matrix", "occlusion_method", "rise_method", "score_cam_method"]

logger = logging.getLogger(__name__)

#: The memory masked copies of one onnxruntime run may take when ``mask_batch`` is 0 (automatic),
#: counting the copy and the forward pass's activations as 16 input-sized tensors per copy.
MEMORY_BUDGET = 512 * 2**20
_TENSORS_PER_COPY = 16
_MAX_AUTO = 256

#: Where long runs report progress: None, or ``fn(method, done, total)`` with masked copies run of all
#: the copies of the call (``gradmap run`` sets it to show progress on stderr).
progress: contextvars.ContextVar[Callable[[str, int, int], None] | None] = contextvars.ContextVar(
    "gradmap_perturbation_progress", default=None)
_LOG_EVERY = 5.0  # seconds between progress log lines


def masks_per_run(mask_batch: int, image_shape: tuple[int, ...], total: int) -> int:
    """Masked copies per onnxruntime run: ``mask_batch``, or for 0 as many as fit :data:`MEMORY_BUDGET`
    (at least 1, at most 256 and ``total``)."""
    if mask_batch < 0:
        raise ValueError(f"mask_batch must be >= 0 (0: automatic), got {mask_batch}")
    if mask_batch == 0:
        per_copy = 4 * int(np.prod(image_shape)) * _TENSORS_PER_COPY
        mask_batch = max(1, min(_MAX_AUTO, MEMORY_BUDGET // per_copy))
    return max(1, min(mask_batch, total))


class _Progress:
    """Counts masked copies run and reports them (the context's reporter, and INFO logs every 5 s)."""

    def __init__(self, method: str, total: int) -> None:
        self.method, self.total, self.done = method, total, 0
        self.report = progress.get()
        self.started = self.logged = time.monotonic()

    def add(self, count: int) -> None:
        self.done += count
        if self.report is not None:
            self.report(self.method, self.done, self.total)
        now = time.monotonic()
        if now - self.logged >= _LOG_EVERY or self.done == self.total and now - self.started >= _LOG_EVERY:
            self.logged = now
            logger.info("%s: %d/%d run (%.0f s)", self.method, self.done, self.total, now - self.started)


def _scores(model, batches: Iterator[np.ndarray], target: int, score: str, bar: _Progress) -> np.ndarray:
    """The score of class ``target`` for every masked copy the iterator yields, in order."""
    found = []
    for batch in batches:
        logits = model.logits(batch)  # the forward part of the graph alone
        found.append(score_of(logits, np.full(len(batch), target), score))
        bar.add(len(batch))
    return np.concatenate(found) if found else np.zeros(0)


def _forward(model, images: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The logits and each image's target (its top-1 class where the target is -1), from the forward
    part of the graph alone: onnxruntime runs a whole graph whatever outputs are asked for, and a
    full export's gradient would cost a second pass per picture (vit_b_16: about 4 of occlusion's
    24 s, ``bench/bench_forward.py``'s run of 006b6b7)."""
    targets = model.checked_targets(len(images), targets)
    logits = model.logits(images)
    return logits, np.where(targets < 0, logits.argmax(1), targets).astype(np.int64)


# -- occlusion -----------------------------------------------------------------------------------
def occlusion_windows(size: tuple[int, int], window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The (top, bottom, left, right) of every occlusion window on an input of ``size`` (H, W).

    Raises:
        ValueError: a window larger than the input, or a stride larger than the window (pixels
            between windows would get no value).
    """
    h, w = size
    if window > min(h, w):
        raise ValueError(f"occlusion window {window} is larger than the model's input {h}x{w}: "
                         f"use --window {min(h, w)} or less")
    if stride > window:
        raise ValueError(f"occlusion stride {stride} is larger than the window {window}: pixels between "
                         "windows would get no value; use --stride of at most the window")

    def starts(n: int) -> list[int]:
        return [k * stride for k in range(math.ceil((n - window) / stride) + 1)]

    return [(t, min(t + window, h), l, min(l + window, w)) for t in starts(h) for l in starts(w)]


def occlusion(model, images: np.ndarray, targets: np.ndarray, baselines: np.ndarray, *, window: int = 16,
              stride: int = 8, mask_batch: int = 0, score: str = "logit") -> Attribution:
    """Occlusion attributions [N, 3, H, W] (the same value in every channel: the window covers them all)."""
    if baselines.shape != images.shape:
        raise ValueError(f"baselines {baselines.shape} must match images {images.shape}")
    n, _, h, w = images.shape
    windows = occlusion_windows((h, w), window, stride)
    # the clean score from the same forward graph as the occluded ones (the whole graph's forward nodes
    # may be fused differently by onnxruntime, a float32 rounding that would not cancel)
    logits, target_index = _forward(model, images, targets)
    clean = score_of(logits, target_index, score)
    per_run = masks_per_run(mask_batch, images.shape[1:], len(windows))
    bar = _Progress("occluded copies", n * len(windows))
    values = np.zeros((n, 1, h, w))
    counts = np.zeros((h, w))
    for t, b, l, r in windows:
        counts[t:b, l:r] += 1
    for i in range(n):
        def batches(i=i):
            for start in range(0, len(windows), per_run):
                chunk = windows[start:start + per_run]
                batch = np.repeat(images[i:i + 1], len(chunk), axis=0)
                for k, (t, b, l, r) in enumerate(chunk):
                    batch[k, :, t:b, l:r] = baselines[i, :, t:b, l:r]
                yield batch

        drops = clean[i] - _scores(model, batches(), int(target_index[i]), score, bar)
        for drop, (t, b, l, r) in zip(drops, windows):
            values[i, 0, t:b, l:r] += drop
    values /= counts
    return Attribution(np.repeat(values, 3, axis=1).astype(np.float32), target_index, logits)


# -- RISE ----------------------------------------------------------------------------------------
def bilinear_matrix(cells: int, size: int) -> np.ndarray:
    """[size, cells]: linear interpolation of ``cells`` values to ``size`` at half-pixel centres, the
    edges mirrored (scikit-image's ``resize(order=1, mode='reflect')``, which the RISE authors use)."""
    coords = (np.arange(size) + 0.5) * cells / size - 0.5
    low = np.floor(coords).astype(int)
    frac = coords - low

    def mirror(index: np.ndarray) -> np.ndarray:
        if cells == 1:
            return np.zeros_like(index)
        period = 2 * (cells - 1)
        index = np.abs(index) % period
        return np.where(index >= cells, period - index, index)

    matrix = np.zeros((size, cells))
    np.add.at(matrix, (np.arange(size), mirror(low)), 1 - frac)
    np.add.at(matrix, (np.arange(size), mirror(low + 1)), frac)
    return matrix


def rise_masks(grids: np.ndarray, shifts: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RISE masks [M, H, W] from binary grids [M, s, s] and shifts [M, 2] (rows, columns, each below
    one cell): each grid upsampled bilinearly to (s + 1) cells of ceil(H / s) x ceil(W / s) pixels, then
    cropped to H x W at its shift."""
    m, s, _ = grids.shape
    h, w = size
    cell_h, cell_w = math.ceil(h / s), math.ceil(w / s)
    rows, cols = bilinear_matrix(s, (s + 1) * cell_h), bilinear_matrix(s, (s + 1) * cell_w)
    masks = np.empty((m, h, w), np.float32)
    for k in range(m):
        dy, dx = int(shifts[k, 0]), int(shifts[k, 1])
        masks[k] = rows[dy:dy + h] @ grids[k].astype(np.float64) @ cols[dx:dx + w].T
    return masks


def _rise_draws(count: int, grid: int, probability: float, size: tuple[int, int], seed: int | None):
    """Seeded grids and shifts, drawn in chunks from two streams: the same draws whatever the chunking."""
    grid_rng, shift_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    cell = np.array([math.ceil(size[0] / grid), math.ceil(size[1] / grid)])

    def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
        grids = (grid_rng.random((k, grid, grid)) < probability).astype(np.float32)
        shifts = np.floor(shift_rng.random((k, 2)) * cell).astype(int)
        return grids, shifts

    return draw


def _check_rise(grid: int, probability: float, size: tuple[int, int]) -> None:
    if not 0 < probability <= 1:
        raise ValueError(f"RISE probability must be in (0, 1] (the chance a cell is kept), got {probability}")
    if grid < 1 or grid > min(size):
        raise ValueError(f"RISE grid {grid} must be between 1 and the model's input size {min(size)}")


def rise(model, images: np.ndarray, targets: np.ndarray, baselines: np.ndarray, *, masks: int = 4000,
         grid: int = 7, probability: float = 0.5, seed: int | None = 0, mask_batch: int = 0,
         grids: np.ndarray | None = None, shifts: np.ndarray | None = None) -> Attribution:
    """RISE saliency [N, 1, H, W], the class probability weighting each mask, as in the paper.

    Args:
        grids, shifts: explicit draws ([masks, grid, grid] in {0, 1}, [masks, 2]) in place of the
            seeded ones (tests use them to feed the same masks to another implementation).
    """
    n, _, h, w = images.shape
    if masks < 1:
        raise ValueError(f"RISE needs at least one mask, got masks={masks}")
    _check_rise(grid, probability, (h, w))
    if grids is not None:
        if shifts is None or grids.shape != (masks, grid, grid) or shifts.shape != (masks, 2):
            raise ValueError(f"grids must be [{masks}, {grid}, {grid}] and shifts [{masks}, 2]")
        taken = 0

        def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
            nonlocal taken
            taken += k
            return grids[taken - k:taken], shifts[taken - k:taken]
    else:
        draw = _rise_draws(masks, grid, probability, (h, w), seed)
    if baselines.shape != images.shape:
        raise ValueError(f"baselines {baselines.shape} must match images {images.shape}")
    logits, target_index = _forward(model, images, targets)
    per_run = masks_per_run(mask_batch, images.shape[1:], masks)
    bar = _Progress("RISE masks", n * masks)
    saliency = np.zeros((n, h, w))
    delta = images - baselines
    for start in range(0, masks, per_run):
        chunk = rise_masks(*draw(min(per_run, masks - start)), (h, w))
        for i in range(n):
            batch = (baselines[i:i + 1] + chunk[:, None] * delta[i:i + 1]).astype(np.float32)
            scores = _scores(model, iter([batch]), int(target_index[i]), "probability", bar)
            saliency[i] += np.tensordot(scores, chunk, axes=1)
    saliency /= masks * probability
    return Attribution(saliency[:, None].astype(np.float32), target_index, logits)


# -- Score-CAM -----------------------------------------------------------------------------------
def _align_corners_matrix(cells: int, size: int) -> np.ndarray:
    """[size, cells]: bilinear interpolation with corners aligned (torch's UpsamplingBilinear2d)."""
    coords = np.arange(size) * ((cells - 1) / (size - 1) if size > 1 else 0.0)
    low = np.minimum(np.floor(coords).astype(int), cells - 1)
    high = np.minimum(low + 1, cells - 1)
    frac = coords - low
    matrix = np.zeros((size, cells))
    np.add.at(matrix, (np.arange(size), low), 1 - frac)
    np.add.at(matrix, (np.arange(size), high), frac)
    return matrix


def score_cam_masks(activation: np.ndarray, size: tuple[int, int], rows: np.ndarray | None = None,
                    cols: np.ndarray | None = None) -> np.ndarray:
    """Score-CAM's masks float32 [C, H, W] of one picture's activation [C, h, w]: each channel upsampled
    (bilinear, corners aligned) to ``size`` and scaled to [0, 1]."""
    channels, ch, cw = activation.shape
    rows = _align_corners_matrix(ch, size[0]) if rows is None else rows
    cols = _align_corners_matrix(cw, size[1]) if cols is None else cols
    up = rows @ activation.astype(np.float64, copy=False) @ cols.T  # [C, H, W]: two small products per channel (a 3-operand einsum loops over all five axes)
    low = up.reshape(channels, -1).min(1)[:, None, None]
    high = up.reshape(channels, -1).max(1)[:, None, None]
    return ((up - low) / (high - low + 1e-8)).astype(np.float32)


def score_cam(model, images: np.ndarray, targets: np.ndarray, activation: np.ndarray, target_index: np.ndarray, *,
              mask_batch: int = 0, score: str = "logit") -> np.ndarray:
    """Score-CAM maps [N, h, w] on the feature-map grid from the CAM layer's ``activation`` [N, C, h, w]."""
    from gradmap.runtime.cam import _check

    _check(activation)
    n, channels, ch, cw = activation.shape
    h, w = images.shape[2:]
    rows, cols = _align_corners_matrix(ch, h), _align_corners_matrix(cw, w)
    per_run = masks_per_run(mask_batch, images.shape[1:], channels)
    bar = _Progress("Score-CAM masks", n * channels)
    cams = np.zeros((n, ch, cw))
    for i in range(n):
        a = activation[i].astype(np.float64)
        masks = score_cam_masks(a, (h, w), rows, cols)  # a: float64 already, not copied again

        def batches(i=i, masks=masks):
            for start in range(0, channels, per_run):
                yield images[i:i + 1] * masks[start:start + per_run, None]

        scores = _scores(model, batches(), int(target_index[i]), score, bar)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        cams[i] = np.maximum(np.tensordot(weights, a, axes=1), 0)
    return cams.astype(np.float32)


# -- the method table's implementations ------------------------------------------------------------
def _baselines(model, spec: MethodSpec, images: np.ndarray) -> np.ndarray:
    pre = model.metadata.preprocessing
    return baseline_image(images, spec.baseline, pre.mean, pre.std, seed=spec.seed, value_range=pre.value_range)


def occlusion_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                     batch_size: int = 16) -> Attribution:
    """Occlusion [N, 3, H, W] with the model's score kind (the logit by default, as Captum on a module's output)."""
    return occlusion(model, images, targets, _baselines(model, spec, images), window=spec.window, stride=spec.stride,
                     mask_batch=spec.mask_batch, score=model.metadata.score)


def rise_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                batch_size: int = 16) -> Attribution:
    """RISE [N, 1, H, W]."""
    return rise(model, images, targets, _baselines(model, spec, images), masks=spec.masks, grid=spec.grid,
                probability=spec.probability, seed=spec.seed, mask_batch=spec.mask_batch)


def _check_occlusion(model, spec: MethodSpec) -> None:
    occlusion_windows(tuple(model.input_size), spec.window, spec.stride)


def _check_rise_method(model, spec: MethodSpec) -> None:
    _check_rise(spec.grid, spec.probability, tuple(model.input_size))


def _occlusion_runs(model, spec: MethodSpec) -> ModelRuns | None:
    if model is None:
        return None
    h, w = model.input_size
    count = len(occlusion_windows((h, w), spec.window, spec.stride))
    return ModelRuns(count, ("window", "stride"), detail=f"{count} windows on the {h} x {w} input")


def _score_cam_runs(model, spec: MethodSpec) -> ModelRuns | None:
    """One run per channel of the CAM layer, when the file gives the channel count."""
    shape = next((o.shape for o in getattr(model, "outputs", ()) if o.name == OUTPUT_CAM_ACTIVATION), None)
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        return None
    return ModelRuns(shape[1], detail=f"one per channel of the CAM layer's {shape[1]}")


occlusion_method.check = _check_occlusion  # type: ignore[attr-defined]  # checked once per run (check_supported)
rise_method.check = _check_rise_method  # type: ignore[attr-defined]
occlusion_method.runs = _occlusion_runs  # type: ignore[attr-defined]  # methods.model_runs


def score_cam_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                     batch_size: int = 16) -> Attribution:
    """Score-CAM [N, 1, H, W], upsampled (bilinear) to the input size."""
    from gradmap.runtime.cam import upsample

    # the activations from the forward part: a full export's gradient is not computed for Score-CAM
    out = model.forward_outputs(images, targets, (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_CAM_ACTIVATION))
    cams = score_cam(model, images, targets, out[OUTPUT_CAM_ACTIVATION], out[OUTPUT_TARGET_INDEX],
                     mask_batch=spec.mask_batch, score=model.metadata.score)
    return Attribution(upsample(cams, images.shape[2:], order=1)[:, None], out[OUTPUT_TARGET_INDEX],
                       out[OUTPUT_LOGITS])


score_cam_method.runs = _score_cam_runs  # type: ignore[attr-defined]  # methods.model_runs
