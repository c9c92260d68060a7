"""The high-level API: pictures in, saliency maps out.

    model = SaliencyModel("resnet50.gradmap.onnx")
    result = compute_saliency(model, "cat.jpg", target="top3")
    for m in result.maps:
        print(m.rank, m.target_label, m.saliency_map.shape)

:func:`iter_saliency` streams many pictures in batches and reports a failure per picture instead of
raising, which is what the CLI uses.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from gradmap import contract
from gradmap.runtime.errors import ImageLoadError, NonFiniteGradientError, TargetError, detached
from gradmap.runtime.methods import MethodSpec, attribute
from gradmap.runtime.model import SaliencyModel
from gradmap.runtime.postprocess import (
    check_finite,
    clip_percentile,
    equalize_histogram,
    map_to_original,
    normalize_min_max,
    reduce_channels,
    softmax,
    top_k,
)
from gradmap.runtime.preprocess import CropGeometry, EncodedPicture, open_picture, preprocess

__all__ = [
    "ImageSaliency",
    "Prediction",
    "SaliencyMap",
    "Target",
    "compute_saliency",
    "iter_saliency",
    "parse_target",
]

logger = logging.getLogger(__name__)

_DEFAULT_SPEC = MethodSpec()


@dataclass(frozen=True)
class Target:
    """Which class(es) to explain: the ``k`` best (``kind="top"``) or one class (``kind="class"``)."""

    kind: str
    value: int

    @property
    def count(self) -> int:
        """How many maps per picture."""
        return self.value if self.kind == "top" else 1


def parse_target(spec: str | int | Target | None, labels: Sequence[str]) -> Target:
    """Read a target: ``None``/``"top1"``, ``"topK"``, a class index (int or digits) or a class name.

    Class names match exactly, else case-insensitively when that is unambiguous.

    Raises:
        TargetError: unknown or ambiguous name, index out of range, or K out of range.
    """
    if isinstance(spec, Target):
        target = spec
    elif spec is None:
        target = Target("top", 1)
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        target = Target("class", int(spec))
    else:
        text = str(spec).strip()
        top = re.fullmatch(r"(?i)top(\d+)", text)
        if top:
            target = Target("top", int(top.group(1)))
        elif re.fullmatch(r"\d+", text):
            target = Target("class", int(text))
        else:
            exact = [i for i, label in enumerate(labels) if label == text]
            folded = [i for i, label in enumerate(labels) if label.casefold() == text.casefold()]
            matches = exact or folded
            if not matches:
                raise TargetError(f"no class named {text!r} among the model's {len(labels)} labels")
            if len(matches) > 1:
                raise TargetError(f"class name {text!r} is ambiguous (indices {', '.join(map(str, matches))}); "
                                  "give the index instead")
            target = Target("class", matches[0])
    if target.kind == "top" and not 1 <= target.value <= len(labels):
        raise TargetError(f"top{target.value}: K must be between 1 and the number of classes ({len(labels)})")
    if target.kind == "class" and not 0 <= target.value < len(labels):
        raise TargetError(f"class index {target.value} is out of range (the model has {len(labels)} classes)")
    if target.kind not in ("top", "class"):
        raise TargetError(f"unknown target kind {target.kind!r}")
    return target


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


@dataclass
class SaliencyMap:
    """One explained class of one picture, on the model's input grid.

    ``attribution`` is what the method computed per input pixel, float32 [3, h, w]: the gradient as
    the model returned it (vanilla, guided backprop, deconvnet; SmoothGrad's mean, mean square or
    variance of gradients), gradients weighted by something else (integrated gradients, gradient x
    input, guided Grad-CAM), or [1, h, w] for a class activation map (Grad-CAM, Grad-CAM++) or a
    region map (XRAI: each pixel its region's attribution density, signed, not reduced);
    the method table's ``kind`` says which, and ``gradmap run`` names its ``.npy`` after it.
    ``saliency_map`` is the channel-reduced, min-max normalized map in [0, 1]; ``equalized_map`` its
    histogram-equalized version. ``rank`` is the class's rank (1 = top-1) when the target was topK,
    else None.
    """

    target_index: int
    target_label: str
    rank: int | None
    attribution: np.ndarray
    saliency_map: np.ndarray
    equalized_map: np.ndarray
    method: str = contract.DEFAULT_METHOD
    #: integrated gradients only: |sum of attributions - (F(x) - F(baseline))|
    completeness_gap: float | None = None

    @property
    def gradient(self) -> np.ndarray:
        """The attribution under its former name (a gradient only for the methods that compute one)."""
        return self.attribution


@dataclass
class ImageSaliency:
    """Everything computed for one picture, or the error that stopped it (``error`` is then set)."""

    source: str
    picture: Image.Image | None = None
    geometry: CropGeometry | None = None
    logits: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    maps: list[SaliencyMap] = field(default_factory=list)
    error: Exception | None = None
    labels: Sequence[str] = ()
    #: What was done besides the usual, for the user (e.g. "GIF with 12 frames: used the first").
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def predictions(self, k: int = 5) -> list[Prediction]:
        """The ``k`` most probable classes (softmax of the logits), best first."""
        if self.probabilities is None:
            return []
        return [Prediction(int(i), self.labels[i], float(self.probabilities[i]))
                for i in top_k(self.probabilities, min(k, len(self.probabilities)))]

    def on_original(self, values: np.ndarray, placement: str = contract.DEFAULT_PLACEMENT) -> tuple[np.ndarray, np.ndarray]:
        """Map an input-grid map onto the original picture; see :func:`map_to_original`."""
        if self.geometry is None:
            raise ValueError(f"{self.source}: no geometry (the picture failed: {self.error})")
        return map_to_original(values, self.geometry, placement)


def _name(source: object) -> str:
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<image>"
    if isinstance(source, EncodedPicture):
        return source.path
    return os.fspath(source)  # type: ignore[arg-type]


def _make_map(attribution: np.ndarray, index: int, labels: Sequence[str], rank: int | None, reduce: str,
              clip: tuple[float, float] | None, method: str = contract.DEFAULT_METHOD,
              gap: float | None = None) -> SaliencyMap:
    kind = contract.method(method).kind
    check_finite(attribution, f"{kind} for class {index} ({labels[index]})")
    # a region map is signed and has one channel: every reduction takes it as it is
    reduced = attribution[0] if kind == contract.KIND_REGION else reduce_channels(attribution, reduce)
    if clip is not None:
        reduced = clip_percentile(reduced, *clip)
    return SaliencyMap(index, labels[index], rank, attribution, normalize_min_max(reduced),
                       equalize_histogram(reduced), method, gap)


def _run(model: SaliencyModel, method: MethodSpec | None, images: np.ndarray, targets: np.ndarray):
    """(logits, target_index, attribution [N, C, H, W], completeness gap or None) of one method."""
    # The default method reads the gradient output that model.run returns (tests/test_method_table.py
    # checks it): one run for the batch, where attribute() runs chunks of 16
    if method is None or method == _DEFAULT_SPEC:
        out = model.run(images, targets)
        return out.logits, out.target_index, out.gradient, None
    return attribute(model, method, images, targets)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_saliency(model: SaliencyModel, sources: Iterable[str | os.PathLike[str] | EncodedPicture | Image.Image], *,
                  target: str | int | Target | None = contract.DEFAULT_TARGET, reduce: str = contract.DEFAULT_REDUCTION,
                  clip: tuple[float, float] | None = None, no_crop: bool = False,
                  batch_size: int = contract.DEFAULT_BATCH_SIZE, method: MethodSpec | None = None
                  ) -> Iterator[ImageSaliency]:
    """Compute saliency maps for many pictures, ``batch_size`` at a time, in input order.

    Pictures are loaded batch by batch, never all at once. A picture that cannot be read, or whose
    gradient holds NaN/Inf, yields an :class:`ImageSaliency` with ``error`` set; the others go on.

    Args:
        model: a loaded :class:`SaliencyModel`.
        sources: file paths, :class:`~gradmap.runtime.preprocess.EncodedPicture` (a file's bytes and
            its path) or RGB PIL images.
        target: see :func:`parse_target`; topK gives K maps per picture (the model runs K times).
        reduce: channel reduction, see :func:`~gradmap.runtime.postprocess.reduce_channels`.
        clip: optional (low, high) percentiles applied before normalization.
        no_crop: resize the whole picture to the input size instead of resize + center crop.
        batch_size: pictures per model run.
        method: the attribution method and its settings (the default method when ``None``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = model.labels
    wanted = parse_target(target, labels)
    for batch in _batches(sources, batch_size):
        results = [ImageSaliency(_name(source), labels=labels) for source in batch]
        tensors, live = [], []
        for result, source in zip(results, batch):
            try:
                if isinstance(source, Image.Image):
                    picture = source.convert("RGB")
                elif isinstance(source, EncodedPicture):
                    picture, result.notes = open_picture(source.path, source.data)
                else:
                    picture, result.notes = open_picture(source)
                tensor, geometry = preprocess(picture, model.metadata.preprocessing, no_crop=no_crop)
            except ImageLoadError as e:  # kept without its traceback: see errors.detached
                result.error = detached(e)
                continue
            result.picture, result.geometry = picture, geometry
            tensors.append(tensor)
            live.append(result)
        if live:
            _explain(model, np.stack(tensors), live, wanted, reduce, clip, method)
        yield from results


def _explain(model: SaliencyModel, images: np.ndarray, results: list[ImageSaliency], wanted: Target,
             reduce: str, clip: tuple[float, float] | None, method: MethodSpec | None = None) -> None:
    labels = model.labels
    n = len(results)
    name = contract.DEFAULT_METHOD if method is None else method.name
    first_targets = np.full(n, -1 if wanted.kind == "top" else wanted.value, dtype=np.int64)
    logits, first_index, first_values, first_gap = _run(model, method, images, first_targets)
    # Ranks 2..K: the best classes after the one the graph resolved as top-1, so that rank 1 is
    # exactly the graph's own tie-breaking.
    rank_targets = []
    for i in range(n):
        order = [int(c) for c in top_k(logits[i], len(labels)) if c != first_index[i]]
        rank_targets.append(order[:wanted.count - 1] if wanted.kind == "top" else [])
    runs = [(first_index, first_values, first_gap)]
    for r in range(1, wanted.count):
        targets = np.array([t[r - 1] for t in rank_targets], dtype=np.int64)
        _, target_index, values, gap = _run(model, method, images, targets)
        runs.append((target_index, values, gap))
    for i, result in enumerate(results):
        result.logits = logits[i]
        try:
            check_finite(logits[i], "logits")
            result.probabilities = softmax(logits[i])
            for r, (target_index, values, gap) in enumerate(runs):
                rank = r + 1 if wanted.kind == "top" else None
                result.maps.append(_make_map(values[i], int(target_index[i]), labels, rank, reduce, clip, name,
                                             None if gap is None else float(gap[i])))
        except NonFiniteGradientError as e:
            logger.warning("%s: %s", result.source, str(e))  # a log record keeps its arguments
            result.maps = []
            result.error = detached(e)


def compute_saliency(model: SaliencyModel | str | os.PathLike[str],
                     picture: str | os.PathLike[str] | Image.Image, *, target: str | int | None = contract.DEFAULT_TARGET,
                     reduce: str = contract.DEFAULT_REDUCTION, clip: tuple[float, float] | None = None,
                     no_crop: bool = False) -> ImageSaliency:
    """Saliency map(s) of one picture.

    Args:
        model: a :class:`SaliencyModel` or the path of a gradmap ``.onnx`` file.
        picture: a file path or a PIL image.
        target: as in :func:`iter_saliency`.
        reduce: as in :func:`iter_saliency`.
        clip: as in :func:`iter_saliency`.
        no_crop: as in :func:`iter_saliency`.

    Returns:
        :class:`ImageSaliency` with one :class:`SaliencyMap` per explained class.

    Raises:
        ImageLoadError: the picture cannot be read.
        NonFiniteGradientError: the model's gradient holds NaN or infinity.
        TargetError: the target names no class of the model.
        GradmapModelError: the model file is not a usable gradmap model.

    Example:
        >>> result = compute_saliency("resnet18.onnx", "cat.jpg")
        >>> values, covered = result.on_original(result.maps[0].equalized_map)
    """
    if not isinstance(model, SaliencyModel):
        model = SaliencyModel(model)
    (result,) = iter_saliency(model, [picture], target=target, reduce=reduce, clip=clip, no_crop=no_crop,
                              batch_size=1)
    if result.error is not None:
        raise result.error
    return result
