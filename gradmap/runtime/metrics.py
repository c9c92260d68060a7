"""Quality measures for saliency maps: pure numpy/scipy functions, one image at a time.

    pointing game         hit = argmax(map) lies in the object mask           Zhang et al. 2016
    energy pointing game  sum(map+ in mask) / sum(map+)                        Wang et al. 2020 (Score-CAM)
    deletion curve        p(target) as pixels go to a baseline, most salient first   Petsiuk et al. 2018 (RISE)
    insertion curve       p(target) as pixels come back onto a baseline, most salient first
    random order          the same curves with pixels in a random order: the level a map has to beat
    rank correlation      Spearman's rho of two maps (model-parameter randomization, Adebayo et al. 2018)

Maps are 2-D [H, W] arrays, masks 2-D bool arrays of the same shape, images [C, H, W] arrays in the
model's input space. The model enters only as a callable ``predict(batch) -> probabilities``
([B, C, H, W] -> [B, K]), so these functions work with onnxruntime, torch or anything else.
A NaN or Inf in a map raises :class:`~gradmap.runtime.errors.NonFiniteGradientError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage, stats

from gradmap.runtime.errors import NonFiniteGradientError

__all__ = [
    "PerturbationCurve",
    "Predict",
    "blurred_image",
    "deletion_curve",
    "energy_pointing_game",
    "insertion_curve",
    "pointing_game",
    "random_order_curve",
    "rank_correlation",
    "saliency_order",
]

#: ``predict(batch [B, C, H, W]) -> probabilities [B, K]``
Predict = Callable[[np.ndarray], np.ndarray]


def _as_map(saliency_map: np.ndarray, what: str = "saliency map") -> np.ndarray:
    m = np.asarray(saliency_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{what} must be 2-D [H, W], got shape {m.shape}")
    finite = np.isfinite(m)
    if not finite.all():
        raise NonFiniteGradientError(f"{what} has {int((~finite).sum())} NaN or infinite values out of {m.size}")
    return m


def _as_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} differs from the map's {shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("the mask is empty: a localisation score needs at least one object pixel")
    return mask


def pointing_game(saliency_map: np.ndarray, mask: np.ndarray, *, tolerance: float = 0.0) -> float:
    """Whether the map's maximum falls on the object (Zhang et al., "Top-down neural attention by
    excitation backprop", 2016).

    Ties: when several pixels share the maximum, the result is the share of them that lie on the
    object, i.e. the expected hit if the tie were broken uniformly at random. It is 1.0 or 0.0
    whenever the maximum is unique; a flat map scores the object's area fraction, what a blind
    guess scores. (Quantus' ``PointingGame`` counts a hit if *any* tied maximum is on the object,
    which gives a flat map a hit.)

    Args:
        saliency_map: [H, W] map; higher means more salient. Signs are taken as they are: pass
            absolute values for an unsigned map.
        mask: [H, W] object mask, not empty.
        tolerance: also count pixels within this Euclidean distance (in pixels) of the mask; Zhang
            et al. use 15 px at 224 x 224. 0 (default) asks for the mask itself.

    Returns:
        1.0 (hit), 0.0 (miss), or a fraction in between under ties.

    Example:
        >>> m = np.zeros((4, 4)); m[1, 2] = 1.0
        >>> pointing_game(m, m > 0)
        1.0
    """
    m = _as_map(saliency_map)
    target = _as_mask(mask, m.shape)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if tolerance > 0:
        target = ndimage.distance_transform_edt(~target) <= tolerance
    maxima = m == m.max()
    return float(np.count_nonzero(maxima & target) / np.count_nonzero(maxima))


def energy_pointing_game(saliency_map: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's positive mass inside the mask (energy-based pointing game, Wang et al.,
    "Score-CAM", 2020; Quantus' ``AttributionLocalisation`` with ``positive_attributions=True``).

    Negative values are set to zero first, so a signed map is scored by its positive evidence; pass
    absolute values for an unsigned reading. A map with no positive mass puts none of it on the
    object and scores 0.0. The chance level is the mask's area fraction.

    Returns:
        sum(max(map, 0) * mask) / sum(max(map, 0)), in [0, 1].

    Example:
        >>> m = np.array([[3.0, 1.0], [0.0, -5.0]])
        >>> energy_pointing_game(m, np.array([[True, False], [False, False]]))
        0.75
    """
    m = np.clip(_as_map(saliency_map), 0.0, None)
    target = _as_mask(mask, m.shape)
    total = m.sum()
    if total == 0:
        return 0.0
    return float(m[target].sum() / total)


def saliency_order(saliency_map: np.ndarray) -> np.ndarray:
    """Flat pixel indices (row-major) from most to least salient.

    Ties keep raster order (a stable sort), so the order is reproducible; a flat map therefore
    deletes from the top-left corner, which is why :func:`random_order_curve` is the fair
    reference.
    """
    m = _as_map(saliency_map)
    return np.argsort(-m.ravel(), kind="stable")


@dataclass(frozen=True)
class PerturbationCurve:
    """A deletion or insertion curve.

    ``fractions[k]`` is the share of pixels deleted (inserted) at step k, from 0 to 1;
    ``scores[k]`` the target's probability then; ``auc`` the trapezoidal area under
    ``scores`` over ``fractions``, in [0, 1] for probabilities. Deletion: lower is better;
    insertion: higher is better.
    """

    fractions: np.ndarray
    scores: np.ndarray
    auc: float


def _area(fractions: np.ndarray, scores: np.ndarray) -> float:
    return float(np.sum((scores[1:] + scores[:-1]) * np.diff(fractions)) / 2.0)


def _perturbation_curve(image: np.ndarray, order: np.ndarray, predict: Predict, target: int, steps: int,
                        baseline: float | np.ndarray, insert: bool, batch_size: int) -> PerturbationCurve:
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [C, H, W], got shape {image.shape}")
    height, width = image.shape[1:]
    pixels = height * width
    if not 1 <= steps <= pixels:
        raise ValueError(f"steps must be between 1 and the pixel count {pixels}, got {steps}")
    fill = np.broadcast_to(np.asarray(baseline, dtype=image.dtype), image.shape)
    # Step k has changed the first bounds[k] pixels of the order: equal counts when steps divides H*W.
    bounds = np.round(np.linspace(0, pixels, steps + 1)).astype(np.int64)
    rank = np.empty(pixels, dtype=np.int64)
    rank[order] = np.arange(pixels)
    rank = rank.reshape(height, width)
    scores = np.empty(steps + 1, dtype=np.float64)
    for start in range(0, steps + 1, batch_size):
        changed = rank[None] < bounds[start:start + batch_size, None, None]  # [B, H, W]
        if insert:
            batch = np.where(changed[:, None], image[None], fill[None])
        else:
            batch = np.where(changed[:, None], fill[None], image[None])
        probabilities = np.asarray(predict(batch))
        if probabilities.ndim != 2 or probabilities.shape[0] != len(batch):
            raise ValueError(f"predict returned shape {probabilities.shape} for a batch of {len(batch)}; "
                             "expected [B, K] probabilities")
        scores[start:start + len(batch)] = probabilities[:, target]
    fractions = bounds / pixels
    return PerturbationCurve(fractions=fractions, scores=scores, auc=_area(fractions, scores))


def _checked_order(saliency_map: np.ndarray, image: np.ndarray) -> np.ndarray:
    order = saliency_order(saliency_map)
    if np.shape(saliency_map) != np.shape(image)[1:]:
        raise ValueError(f"map shape {np.shape(saliency_map)} differs from the image's [H, W] {np.shape(image)[1:]}")
    return order


def deletion_curve(image: np.ndarray, saliency_map: np.ndarray, predict: Predict, target: int, *,
                   steps: int = 64, baseline: float | np.ndarray = 0.0, batch_size: int = 65) -> PerturbationCurve:
    """Deletion curve (Petsiuk et al., "RISE", 2018): replace pixels by ``baseline``, most salient
    first, in ``steps`` equal steps, and follow the target's probability. A good map makes it fall
    fast: a low AUC.

    Args:
        image: [C, H, W] model input (already normalized).
        saliency_map: [H, W]; its order decides which pixels go first (ties in raster order).
        predict: ``[B, C, H, W] -> [B, K]`` probabilities.
        target: class index whose probability is followed.
        steps: number of deletion steps; the curve has ``steps + 1`` points (the first is the
            unchanged image, the last the all-baseline image).
        baseline: what a deleted pixel becomes, a scalar or an array broadcastable to the image.
            The default 0.0 in a normalized input is the dataset's mean colour, the "grey" fill;
            RISE uses black (0 before normalization); Quantus' default "black" is the image's
            minimum.
        batch_size: perturbed images per ``predict`` call.

    Returns:
        A :class:`PerturbationCurve`.
    """
    return _perturbation_curve(image, _checked_order(saliency_map, image), predict, target, steps, baseline,
                               insert=False, batch_size=batch_size)


def insertion_curve(image: np.ndarray, saliency_map: np.ndarray, predict: Predict, target: int, *,
                    steps: int = 64, baseline: float | np.ndarray | None = None,
                    batch_size: int = 65) -> PerturbationCurve:
    """Insertion curve (Petsiuk et al. 2018): start from ``baseline`` and put the image's pixels
    back, most salient first. A good map makes the probability rise fast: a high AUC.

    Args:
        baseline: the starting canvas; ``None`` (default) is :func:`blurred_image` of the image, as
            in RISE, so that insertion adds detail rather than edges against a flat fill.
        Others as in :func:`deletion_curve`.
    """
    if baseline is None:
        baseline = blurred_image(image)
    return _perturbation_curve(image, _checked_order(saliency_map, image), predict, target, steps, baseline,
                               insert=True, batch_size=batch_size)


def random_order_curve(kind: str, image: np.ndarray, predict: Predict, target: int, *, steps: int = 64,
                       baseline: float | np.ndarray | None = None, repeats: int = 1,
                       seed: int | np.random.Generator | None = 0, batch_size: int = 65) -> PerturbationCurve:
    """The deletion or insertion curve of uniformly random pixel orders, averaged over ``repeats``
    orders: the reference a saliency map has to beat.

    Args:
        kind: ``"deletion"`` or ``"insertion"``.
        baseline: as in :func:`deletion_curve` (``None`` means 0.0) or :func:`insertion_curve`
            (``None`` means the blurred image).
        seed: seed or generator of the random orders.

    Returns:
        A :class:`PerturbationCurve` of the mean scores (its AUC is the mean of the AUCs).
    """
    if kind not in ("deletion", "insertion"):
        raise ValueError(f"kind must be 'deletion' or 'insertion', got {kind!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    insert = kind == "insertion"
    if baseline is None:
        baseline = blurred_image(image) if insert else 0.0
    rng = np.random.default_rng(seed)
    pixels = int(np.prod(np.shape(image)[1:]))
    curves = [_perturbation_curve(image, rng.permutation(pixels), predict, target, steps, baseline, insert, batch_size)
              for _ in range(repeats)]
    scores = np.mean([c.scores for c in curves], axis=0)
    return PerturbationCurve(fractions=curves[0].fractions, scores=scores, auc=_area(curves[0].fractions, scores))


def blurred_image(image: np.ndarray, sigma: float = 5.0) -> np.ndarray:
    """Gaussian blur of a [C, H, W] image over H and W only (RISE's insertion canvas, sigma 5)."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [C, H, W], got shape {image.shape}")
    return ndimage.gaussian_filter(image.astype(np.float64), sigma=(0, sigma, sigma), mode="nearest").astype(image.dtype)


def rank_correlation(map_a: np.ndarray, map_b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps of the same shape (ties get average ranks).

    Adebayo et al., "Sanity checks for saliency maps" (2018), compare a model's map with the map of
    the same model after re-initializing its top layers: a method that explains the model gives a
    low correlation. Compute it on absolute values for unsigned maps, as they do.

    Raises:
        ValueError: if the shapes differ or a map is constant (the correlation is undefined).

    Example:
        >>> rank_correlation(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[10.0, 20.0], [30.0, 99.0]]))
        1.0
    """
    a = _as_map(map_a, "first map")
    b = _as_map(map_b, "second map")
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {a.shape} and {b.shape}")
    for name, m in (("first", a), ("second", b)):
        if m.max() == m.min():
            raise ValueError(f"the {name} map is constant: its rank correlation is undefined")
    return float(stats.spearmanr(a.ravel(), b.ravel())[0])
