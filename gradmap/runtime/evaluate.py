"""Measure how good a model's saliency maps are, per method, on images with object masks (torch-free).

    gradmap evaluate MODEL.onnx --data DIR [--randomized MODEL_RANDOMIZED.onnx]

For every method the model supports, on every image (maps of the ground-truth class when labels are
given, else of the top-1 class):

    pointing game          the map's maximum lies on the object (Zhang et al. 2016); chance is the
                           object's area share. With ``tolerance`` > 0 it is also reported as Zhang et
                           al. define it, counting maxima within that many pixels of the object (they
                           use 15 px on PASCAL VOC / COCO pictures): a gradient is as large just
                           outside an object's outline as just inside it, so the strict form splits
                           edge maxima at random between hit and miss
    energy pointing game   share of the map's mass on the object (Wang et al. 2020)
    deletion / insertion   area under p(class) as pixels are removed / put back, most salient first
                           (Petsiuk et al. 2018), each next to the same curve for random pixel orders
    randomization check    Spearman's rho between the map and the map of the same network with its
                           top layers re-initialized (Adebayo et al. 2018): low means the map depends
                           on what the model learned; above the threshold (0.3) the method is flagged.
                           Reported next to it: rho between the trained model's maps of two different
                           images (each image with the next), the part of rho that an image-independent
                           layout of the maps (e.g. gradients fading toward the borders) gives by itself.
                           With a cascade (``cascade``, ``--cascade``: the same network with more and
                           more layers re-initialized, top down), rho per depth is reported as well,
                           as Adebayo et al. plot it; the verdict stays the top-randomized model's.
                           With ``seed_check`` (methods with a ``seed``: RISE's masks, SmoothGrad's
                           noise...), rho is also reported against the randomized model's map drawn
                           from the next seed, and between the trained model's maps of the two seeds:
                           the same seed gives both models the same draws, and rho then includes what
                           the draws alone put in both maps (RISE: the masks' uneven coverage)

Maps are max over channels of |attribution| for pixel attributions (gradmap run's default reduction)
and the map itself for the methods of kind ``cam`` (Grad-CAM, Grad-CAM++) and ``region`` (XRAI).

Data: a ``.npz`` file (``images`` uint8 [N, H, W, 3], ``masks`` [N, H, W], optional ``labels`` [N]
of class indices or names) or a directory with ``images/`` (pictures), ``masks/`` (one picture per
image with the same stem; non-zero is the object) and an optional ``labels.csv`` (``name,label`` per
line; ``name`` is the image's file name or stem, ``label`` a class name or index). Images go
through the model's own preprocessing and masks through the same resize and crop (nearest).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from gradmap import contract
from gradmap.runtime.io import IMAGE_EXTENSIONS
from gradmap.runtime.methods import MethodSpec, attribute, check_supported
from gradmap.runtime.metrics import (
    blurred_image,
    deletion_curve,
    energy_pointing_game,
    insertion_curve,
    pointing_game,
    random_order_curve,
    rank_correlation,
)
from gradmap.runtime.postprocess import check_finite, reduce_channels
from gradmap.runtime.preprocess import CropGeometry, crop_window, open_picture, preprocess

__all__ = ["EvaluationData", "EvaluationDataError", "check_methods", "load_evaluation_data", "evaluate", "MAX_RANK_CORRELATION",
           "format_report"]

logger = logging.getLogger(__name__)

#: Above this Spearman correlation with the randomized model's map, a method fails the sanity check.
MAX_RANK_CORRELATION = 0.3


class EvaluationDataError(ValueError):
    """The evaluation data cannot be used; the message names every file at fault and why."""


@dataclass
class EvaluationData:
    """Model inputs [N, 3, h, w] (normalized), object masks [N, h, w] on the model's input grid,
    class indices [N] (-1: the model's top-1) and the images' names."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    names: list[str]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def _mask_on_input(mask: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    """A mask of the original picture, resized and cropped as the picture was (nearest neighbour)."""
    picture = Image.fromarray(mask.astype(np.uint8) * 255)
    if geometry.resized_size != geometry.original_size:
        picture = picture.resize((geometry.resized_size[1], geometry.resized_size[0]), Image.NEAREST)
    return crop_window(np.asarray(picture) > 127, geometry.crop_top, geometry.crop_left, geometry.crop_size)


def _label_index(value, class_names: Sequence[str], where: str) -> int:
    text = str(value).strip()
    if text in class_names:
        return list(class_names).index(text)
    try:
        index = int(text)
    except ValueError:
        raise EvaluationDataError(f"{where}: label {text!r} is neither one of the model's classes nor an index") from None
    if not 0 <= index < len(class_names):
        raise EvaluationDataError(f"{where}: class index {index} is outside the model's {len(class_names)} classes")
    return index


def _read_labels_csv(path: Path, class_names: Sequence[str], problems: list[str]) -> dict[str, int]:
    """``name -> class index``; unusable lines go to ``problems`` (their images are then left out)."""
    labels: dict[str, int] = {}
    with open(path, newline="") as f:
        for line_number, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#") or (line_number == 1 and row[0].strip().lower() == "name"):
                continue
            try:
                if len(row) < 2:
                    raise EvaluationDataError(f"{path}, line {line_number}: expected 'name,label', got {','.join(row)!r}")
                labels[row[0].strip()] = _label_index(row[1], class_names, f"{path}, line {line_number}")
            except EvaluationDataError as e:
                problems.append(str(e))
                labels[row[0].strip()] = -2  # known name, unusable label: already reported
    return labels


def load_evaluation_data(path: str | os.PathLike[str], preprocessing: contract.Preprocessing,
                         class_names: Sequence[str], *, limit: int | None = None) -> EvaluationData:
    """Read images, masks and labels from a ``.npz`` file or a directory (see the module docstring).

    Raises:
        EvaluationDataError: naming each unreadable picture, missing or empty mask, mask of the wrong
            size, unknown label, or a malformed file, all at once, before any map is computed.
    """
    path = Path(path)
    if not path.exists():
        raise EvaluationDataError(f"{path}: no such file or directory")
    pictures: list[tuple[str, Image.Image, np.ndarray, int]] = []
    problems: list[str] = []
    notes: list[str] = []
    if path.is_file():
        try:
            data = np.load(path, allow_pickle=False)
            images, masks = data["images"], data["masks"]
            labels = data["labels"] if "labels" in data.files else None
        except (OSError, ValueError, KeyError) as e:
            raise EvaluationDataError(f"{path}: not an evaluation .npz with 'images' and 'masks' arrays ({e})") from e
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise EvaluationDataError(f"{path}: 'images' must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        if masks.shape != images.shape[:3]:
            raise EvaluationDataError(f"{path}: 'masks' must be [N, H, W] = {images.shape[:3]}, got {masks.shape}")
        if labels is not None and labels.shape != (len(images),):
            raise EvaluationDataError(f"{path}: 'labels' must be [N] = [{len(images)}], got {labels.shape}")
        count = len(images) if limit is None else min(limit, len(images))
        for i in range(count):
            label = -1 if labels is None else _label_index(labels[i], class_names, f"{path}: labels[{i}]")
            pictures.append((f"{path.name}[{i}]", Image.fromarray(images[i]), masks[i].astype(bool), label))
    else:
        image_dir, mask_dir = path / "images", path / "masks"
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                raise EvaluationDataError(f"{path}: expected a folder {directory.name}/ (images/ with pictures and "
                                          "masks/ with one mask per picture, same file stem)")
        files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise EvaluationDataError(f"{image_dir}: no pictures ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        if limit is not None:
            files = files[:limit]
        masks_by_stem = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        labels_file = path / "labels.csv"
        labels = _read_labels_csv(labels_file, class_names, problems) if labels_file.is_file() else None
        if labels is None:
            notes.append(f"no {labels_file.name} in {path}: maps explain each image's top-1 class")
        for file in files:
            label = -1
            if labels is not None:
                label = labels.get(file.name, labels.get(file.stem))
                if label is None:
                    problems.append(f"{file}: no label in {labels_file}")
                if label is None or label == -2:
                    continue
            mask_file = masks_by_stem.get(file.stem)
            if mask_file is None:
                problems.append(f"{file}: no mask {mask_dir}/{file.stem}.png")
                continue
            try:
                picture, _ = open_picture(file)
                with Image.open(mask_file) as m:
                    mask = np.asarray(m.convert("L")) > 0
            except Exception as e:  # a broken picture or mask is reported with the others
                problems.append(f"{file}: cannot read it or its mask ({e})")
                continue
            if mask.shape != (picture.height, picture.width):
                problems.append(f"{mask_file}: mask is {mask.shape[1]}x{mask.shape[0]} pixels, the picture "
                                f"{picture.width}x{picture.height}")
                continue
            pictures.append((file.name, picture, mask, label))
    inputs, masks_out, labels_out, names = [], [], [], []
    for name, picture, mask, label in pictures:
        x, geometry = preprocess(picture, preprocessing)
        on_input = _mask_on_input(mask, geometry)
        if not on_input.any():
            problems.append(f"{name}: the object mask is empty{' after the crop' if mask.any() else ''}")
            continue
        inputs.append(x)
        masks_out.append(on_input)
        labels_out.append(label)
        names.append(name)
    if problems:
        raise EvaluationDataError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems))
    if not inputs:
        raise EvaluationDataError(f"{path}: no images to evaluate")
    return EvaluationData(np.stack(inputs), np.stack(masks_out), np.asarray(labels_out, dtype=np.int64), names, notes)


def saliency_maps(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, batch_size: int = 16
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(maps [N, h, w] float64, resolved targets [N]) of one method, as evaluated."""
    _, target_index, values, _ = attribute(model, spec, images, targets, batch_size=batch_size)
    check_finite(values, spec.name)
    if spec.method.kind in (contract.KIND_CAM, contract.KIND_REGION):
        return np.asarray(values[:, 0], dtype=np.float64), target_index
    return reduce_channels(values, contract.DEFAULT_REDUCTION, channel_axis=1).astype(np.float64), target_index


def check_methods(methods: Sequence[MethodSpec], models: Sequence) -> None:
    """Raise :class:`~gradmap.runtime.methods.UnsupportedMethodError` when a model (None: skipped)
    lacks a method, before any work is done."""
    for spec in methods:
        for model in models:
            if model is not None:
                check_supported(model, spec, model.path)


def _summary(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def _safe_rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """rho, or None when a map is constant (e.g. a Grad-CAM that is zero everywhere)."""
    if a.max() == a.min() or b.max() == b.min():
        return None
    return rank_correlation(a, b)


def _rho_summary(values: Sequence[float | None]) -> dict:
    """:func:`_summary` of rank correlations, with the count of images skipped for a constant map."""
    return {**_summary(values), "constant_maps_skipped": sum(v is None for v in values)}


def evaluate(model, data: EvaluationData, methods: Sequence[MethodSpec], *, randomized=None,
             cascade: Sequence[tuple[str, object]] = (), steps: int = 64, random_repeats: int = 2, seed: int = 0,
             batch_size: int = 16, tolerance: float = 0.0, seed_check: bool = False,
             progress: Callable[[str], None] | None = None) -> dict:
    """Every metric of the module docstring, per method; see :func:`format_report` for a reading.

    Args:
        model: a loaded :class:`~gradmap.runtime.model.SaliencyModel`.
        data: from :func:`load_evaluation_data`.
        methods: what to evaluate (each must be supported by ``model`` and ``randomized``).
        randomized: the same network with its top layers re-initialized, for the sanity check.
        cascade: ``(label, model)`` pairs, the same network with more layers re-initialized (e.g.
            the cascading randomization of Adebayo et al.); per method, rho against each is
            reported in ``rank_correlation_cascade[label]``, beside the check, not judged.
        steps: deletion/insertion steps (pixels per step = pixels / steps).
        random_repeats: random pixel orders averaged for the reference curves.
        seed_check: for methods with a ``seed`` setting (and a ``randomized`` model), also report
            ``rank_correlation_other_seed`` (rho between the trained model's map and the randomized
            model's map drawn from seed + 1) and ``rank_correlation_seed_to_seed`` (rho between the
            trained model's maps of the two seeds): two more maps per image. Beside the check, not judged.
        tolerance: when > 0, also report ``pointing_game_tolerance``: maxima within this many pixels
            (Euclidean, on the model's input) of the object count as hits; ``chance_tolerance`` is
            then the share of the image within that distance of the object.

    Returns:
        A JSON-ready dict: ``images``, ``accuracy`` (when labels are known), ``chance`` (mean object
        area share), ``random_order`` AUCs, and ``methods[name]`` with means, standard deviations and
        the sanity-check verdict.
    """
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number of pixels >= 0, got {tolerance}")
    check_methods(methods, [model, randomized, *(m for _, m in cascade)])
    say = progress or (lambda message: None)
    predict = model.probabilities
    started = time.perf_counter()
    n = len(data)
    # Resolve targets once: labels where given, else the model's top-1.
    predicted = np.concatenate([predict(data.images[i:i + batch_size]).argmax(axis=1) for i in range(0, n, batch_size)])
    targets = np.where(data.labels >= 0, data.labels, predicted)
    rng = np.random.default_rng(seed)
    blurred = [blurred_image(x) for x in data.images]
    say(f"random-order reference curves on {n} images")
    random_deletion = [random_order_curve("deletion", data.images[i], predict, int(targets[i]), steps=steps,
                                          baseline=0.0, repeats=random_repeats, seed=rng).auc for i in range(n)]
    random_insertion = [random_order_curve("insertion", data.images[i], predict, int(targets[i]), steps=steps,
                                           baseline=blurred[i], repeats=random_repeats, seed=rng).auc
                        for i in range(n)]
    results: dict = {
        "images": n,
        "labels": "given" if (data.labels >= 0).all() else "top-1 predictions where missing",
        "accuracy": float((predicted == data.labels).mean()) if (data.labels >= 0).all() else None,
        "chance": _summary([float(m.mean()) for m in data.masks]),
        "random_order": {"deletion_auc": _summary(random_deletion), "insertion_auc": _summary(random_insertion)},
        "settings": {"steps": steps, "pixels_per_step": int(data.masks[0].size // steps),
                     "deletion_fill": "0.0 in the model's normalized input (the dataset's mean colour)",
                     "insertion_start": "the image blurred with a Gaussian of sigma 5 px",
                     "random_order_repeats": random_repeats, "seed": seed,
                     "max_rank_correlation": MAX_RANK_CORRELATION, "pointing_tolerance_px": tolerance},
        "methods": {},
    }
    # the pixels within ``tolerance`` of each object, once for every method
    within = [ndimage.distance_transform_edt(~m) <= tolerance for m in data.masks] if tolerance > 0 else None
    if within is not None:
        results["chance_tolerance"] = _summary([float(w.mean()) for w in within])
    for spec in methods:
        t0 = time.perf_counter()
        say(f"{spec.name}: maps")
        maps, _ = saliency_maps(model, spec, data.images, targets, batch_size)
        maps_randomized = saliency_maps(randomized, spec, data.images, targets, batch_size)[0] if randomized else None
        maps_cascade = {label: saliency_maps(m, spec, data.images, targets, batch_size)[0] for label, m in cascade}
        seeds = None
        if seed_check and randomized is not None and spec.settings.get("seed") is not None:
            say(f"{spec.name}: maps from seed {spec.seed + 1}")
            other = MethodSpec(spec.name, **{**spec.settings, "seed": spec.seed + 1})
            seeds = (saliency_maps(model, other, data.images, targets, batch_size)[0],
                     saliency_maps(randomized, other, data.images, targets, batch_size)[0])
        say(f"{spec.name}: deletion and insertion curves")
        rows = {"pointing_game": [], "energy_pointing_game": [], "deletion_auc": [], "insertion_auc": [],
                "deletion_below_random": [], "rank_correlation": []}
        for i in range(n):
            target = int(targets[i])
            rows["pointing_game"].append(pointing_game(maps[i], data.masks[i]))
            if within is not None:
                rows.setdefault("pointing_game_tolerance", []).append(pointing_game(maps[i], within[i]))
            rows["energy_pointing_game"].append(energy_pointing_game(maps[i], data.masks[i]))
            deletion = deletion_curve(data.images[i], maps[i], predict, target, steps=steps, baseline=0.0).auc
            rows["deletion_auc"].append(deletion)
            rows["deletion_below_random"].append(float(deletion < random_deletion[i]))
            rows["insertion_auc"].append(
                insertion_curve(data.images[i], maps[i], predict, target, steps=steps, baseline=blurred[i]).auc)
            if maps_randomized is not None:
                rows["rank_correlation"].append(_safe_rank_correlation(maps[i], maps_randomized[i]))
        entry = {key: _summary(values) for key, values in rows.items() if key != "rank_correlation"}
        if maps_randomized is not None and n > 1:
            entry["rank_correlation_other_image"] = _summary(
                [_safe_rank_correlation(maps[i], maps[(i + 1) % n]) for i in range(n)])
        if maps_cascade:
            entry["rank_correlation_cascade"] = {
                label: _rho_summary([_safe_rank_correlation(maps[i], other[i]) for i in range(n)])
                for label, other in maps_cascade.items()}
        if seeds is not None:
            entry["rank_correlation_other_seed"] = _rho_summary(
                [_safe_rank_correlation(maps[i], seeds[1][i]) for i in range(n)])
            entry["rank_correlation_seed_to_seed"] = _rho_summary(
                [_safe_rank_correlation(maps[i], seeds[0][i]) for i in range(n)])
        entry["parameters"] = spec.settings
        deletion_ok = entry["deletion_auc"]["mean"] < results["random_order"]["deletion_auc"]["mean"]
        entry["deletion_beats_random"] = bool(deletion_ok)
        if maps_randomized is not None:
            rho = _rho_summary(rows["rank_correlation"])
            entry["rank_correlation"] = rho
            entry["sanity_check"] = "passed" if rho["mean"] <= MAX_RANK_CORRELATION else "FAILED"
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["methods"][spec.name] = entry
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def format_report(results: dict) -> str:
    """A plain-text table of :func:`evaluate`'s results."""
    tolerance = results.get("settings", {}).get("pointing_tolerance_px", 0)
    lines = [f"{results['images']} images"
             + (f", accuracy {results['accuracy']:.3f}" if results.get("accuracy") is not None else "")
             + f"; chance pointing game {results['chance']['mean']:.3f}; random order: deletion AUC "
             f"{results['random_order']['deletion_auc']['mean']:.3f}, insertion AUC "
             f"{results['random_order']['insertion_auc']['mean']:.3f}",
             "",
             f"{'method':<22}{'pointing':>9}" + (f"{'<=' + format(tolerance, 'g') + ' px':>9}" if tolerance else "")
             + f"{'energy':>8}{'deletion':>10}{'insertion':>11}{'rho rand.':>11}  sanity check"]
    for name, m in results["methods"].items():
        rho = m.get("rank_correlation")
        lines.append(f"{name:<22}{m['pointing_game']['mean']:>9.3f}"
                     + (f"{m['pointing_game_tolerance']['mean']:>9.3f}" if tolerance else "")
                     + f"{m['energy_pointing_game']['mean']:>8.3f}"
                     f"{m['deletion_auc']['mean']:>10.3f}{m['insertion_auc']['mean']:>11.3f}"
                     + (f"{rho['mean']:>11.3f}  {m['sanity_check']}" if rho else f"{'-':>11}  not run")
                     + ("" if m["deletion_beats_random"] else "  (deletion not below random order)"))
    lines.append("")
    if tolerance:
        lines.append(f"<={tolerance:g} px: pointing game counting maxima within {tolerance:g} px of the object "
                     f"(chance {results['chance_tolerance']['mean']:.3f})")
    lines.append("pointing/energy: higher is better; deletion AUC: lower is better; insertion AUC: higher is better;")
    lines.append(f"rho rand.: Spearman correlation with the top-randomized model's map, <= {MAX_RANK_CORRELATION} passes")
    labels = list(dict.fromkeys(label for m in results["methods"].values() for label in m.get("rank_correlation_cascade", {})))
    if labels:
        widths = [max(9, len(label) + 2) for label in labels]
        lines += ["", "randomization cascade, rho per model (top-randomized first):",
                  f"{'method':<22}{'top':>9}" + "".join(f"{label:>{w}}" for label, w in zip(labels, widths))]
        for name, m in results["methods"].items():
            top = m.get("rank_correlation")
            row = f"{name:<22}" + (f"{top['mean']:>9.3f}" if top else f"{'-':>9}")
            for label, w in zip(labels, widths):
                value = m.get("rank_correlation_cascade", {}).get(label)
                row += f"{value['mean'] if value else float('nan'):>{w}.3f}"
            lines.append(row)
    for name, m in results["methods"].items():
        if "rank_correlation_other_seed" in m:
            lines.append(f"{name}: rho {m['rank_correlation_other_seed']['mean']:.3f} against the randomized model's map "
                         f"from the next seed; the trained model's maps of the two seeds: rho "
                         f"{m['rank_correlation_seed_to_seed']['mean']:.3f}")
    other = {name: m["rank_correlation_other_image"]["mean"] for name, m in results["methods"].items()
             if "rank_correlation_other_image" in m}
    if other:
        lines.append("rho between the trained model's maps of different images (layout shared by all maps): "
                     + ", ".join(f"{name} {value:.3f}" for name, value in other.items()))
    return "\n".join(lines)
