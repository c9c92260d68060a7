"""``gradmap verify MODEL.onnx --reference SPEC``: the export's parity check, on the user's own pictures.

SPEC names the source the file was exported from, as ``gradmap export`` took it; :data:`REFERENCES` maps
its prefix to the source's reference loader, imported only when that prefix is asked for (so an
``onnx:`` check needs no torch, a torchvision one no TensorFlow)::

    NAME            torchvision            gradmap.export._torchvision:load_reference   torch autograd
    timm:NAME       timm                   gradmap.export._timm:load_reference          torch autograd
    hf:ID_OR_DIR    Hugging Face           gradmap.export._hf:load_reference            torch autograd
    onnx:FILE       the source ONNX file   gradmap.export._onnx_file:load_reference     its float64 graph
    keras:NAME|PATH Keras                  gradmap.export._keras:load_reference         tf.GradientTape

A loader is ``load_reference(spec, *, weights, seed, metadata, **options) -> Reference``
(:class:`gradmap.graph.parity.Reference`; ``metadata``: the file's
:class:`~gradmap.contract.ModelMetadata`; ``weights`` None: what the metadata records where the
source records it there, else the source's default; ``options``: ``trust_model`` for ``keras:``). Each picture is preprocessed as the file's metadata says,
run through the file (with its float32 decisions exposed) and compared with the reference under
the shared policy (:func:`gradmap.graph.parity.check_batch`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gradmap import contract
from gradmap.graph.errors import ExportError

__all__ = ["REFERENCES", "PictureCheck", "load_reference", "verify_file"]

#: SPEC prefix -> "module:function" of its reference loader; "" is a torchvision name.
REFERENCES = {
    "timm:": "gradmap.export._timm:load_reference",
    "hf:": "gradmap.export._hf:load_reference",
    "onnx:": "gradmap.export._onnx_file:load_reference",
    "keras:": "gradmap.export._keras:load_reference",
    "": "gradmap.export._torchvision:load_reference",
}

#: What each prefix needs installed, for the error when it is missing.
_EXTRAS = {"timm:": "timm", "hf:": "hf", "onnx:": "onnx", "keras:": "keras", "": "export"}


def _prefix(spec: str) -> str:
    return next((p for p in REFERENCES if p and spec.startswith(p)), "")


def load_reference(spec: str, *, weights: str | None = None, seed: int | None = None, metadata=None, **options):
    """The float64 reference of SPEC (see the module doc).

    Raises:
        ExportError: the loader is missing from this gradmap, its framework is not installed, or the
            source cannot be loaded (the message names which).
    """
    prefix = _prefix(spec)
    module_name, function = REFERENCES[prefix].split(":")
    kind = prefix.rstrip(":") or "torchvision"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ExportError(f"--reference {spec}: this gradmap has no {kind} reference ({REFERENCES[prefix]} "
                              "is missing: the source's exporter is not part of this version)") from e
        raise ExportError(f"--reference {spec}: the {kind} reference needs {e.name}, which is not installed: "
                          f"pip install 'gradmap[{_EXTRAS[prefix]}]'") from e
    loader = getattr(module, function, None)
    if loader is None:
        raise ExportError(f"--reference {spec}: this gradmap has no {kind} reference ({module_name} has no "
                          f"{function})")
    return loader(spec, weights=weights, seed=seed, metadata=metadata, **options)


@dataclass
class PictureCheck:
    """One picture compared with the reference."""

    picture: str
    target_index: int
    label: str
    check: "gradmap.graph.parity.BatchCheck"  # noqa: F821


def _read_model(path: str, provider: str | Sequence[str], threads: int | None):
    """(metadata, the model's ONNX graph, providers), after the runtime's checks of the file."""
    import onnx

    from gradmap.runtime import GradmapModelError, SaliencyModel
    from gradmap.runtime.model import resolve_providers

    try:
        model = SaliencyModel(path, provider=provider, threads=threads, cache_dir=False)
    except GradmapModelError as e:
        raise ExportError(str(e)) from e
    proto = onnx.load(os.fspath(path))
    return model.metadata, proto, resolve_providers(provider)


def verify_file(path: str | os.PathLike, spec: str, pictures: Sequence[str] = (), *, weights: str | None = None,
                seed: int | None = None, provider: str | Sequence[str] = "auto", threads: int | None = None,
                attempts: int = 8, trust_model: bool = False) -> tuple[list[PictureCheck], object]:
    """Compare the gradmap model at ``path`` with the float64 reference of ``spec``.

    Args:
        pictures: picture files; each is preprocessed by the file's metadata and checked for its top
            class. None: random batches, as the export's check draws them (``attempts`` of them).
        weights, seed: the source's weights, as ``gradmap export`` took them (None: as the file's metadata
            records them where the source records them there, else the source's default and seed 0).
        trust_model: load a ``keras:`` file that can run code (legacy ``.h5``, SavedModel).

    Returns:
        (one :class:`PictureCheck` per picture, the reference) ; with no pictures, ([], the
        :class:`gradmap.graph.parity.ParityResult` of the random batches).

    Raises:
        ExportError: the file or the reference cannot be loaded; with no pictures, ParityError when the
            random batches miss.
    """
    from gradmap.graph import parity

    path = os.fspath(path)
    metadata, proto, providers = _read_model(path, provider, threads)
    options = {"trust_model": True} if trust_model else {}
    reference = load_reference(spec, weights=weights, seed=seed, metadata=metadata, **options)
    backprops = tuple(metadata.backprops)
    if not metadata.gradient:  # a forward-only model (--no-gradient): its logits
        return _verify_forward(proto, metadata, reference, pictures, providers, attempts)
    if not pictures:
        result = parity.verify_model(proto, reference, input_size=tuple(metadata.preprocessing.crop),
                                     score=metadata.score, backprops=backprops, attempts=attempts,
                                     providers=providers)
        return [], result
    exposed = parity.expose_decisions(proto)
    session = parity._session(exposed.proto, providers)
    checks = []
    for picture, image in _preprocessed(pictures, metadata):
        images = image[None]
        target = np.array([-1], dtype=np.int64)
        values, decisions = parity.run_model(session, exposed, images, target, backprops)
        check = parity.check_batch(values, reference, images, target, score=metadata.score, backprops=backprops,
                                   decisions=decisions)
        index = int(values[contract.OUTPUT_TARGET_INDEX][0])
        checks.append(PictureCheck(picture, index, metadata.labels[index], check))
    return checks, reference


def _preprocessed(pictures: Sequence[str], metadata):
    """Each picture with its model input, preprocessed by the file's metadata; a picture that does not
    load is an ExportError naming it."""
    from gradmap.runtime.errors import ImageLoadError
    from gradmap.runtime.preprocess import load_picture, preprocess

    for picture in pictures:
        try:
            image, _ = preprocess(load_picture(picture), metadata.preprocessing)
        except ImageLoadError as e:
            raise ExportError(f"{picture}: {e}") from e
        yield picture, image


def _verify_forward(proto, metadata, reference, pictures: Sequence[str], providers, attempts: int):
    """:func:`verify_file` for a forward-only model: logits and top classes, no gradient."""
    from gradmap.graph import parity

    if not hasattr(reference, "logits"):
        raise ExportError(f"the reference {getattr(reference, 'name', '?')} has no logits of its own to compare a "
                          "forward-only model with")
    if not pictures:
        return [], parity.verify_forward(proto, reference, input_size=tuple(metadata.preprocessing.crop),
                                         attempts=attempts, providers=providers)
    session = parity._session(proto, providers)
    checks = []
    for picture, image in _preprocessed(pictures, metadata):
        logits, target_index = session.run([contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX], {
            contract.INPUT_IMAGE: image[None], contract.INPUT_TARGET: np.array([-1], np.int64)})
        check = parity.check_logits(logits, target_index, reference, image[None])
        index = int(target_index[0])
        checks.append(PictureCheck(picture, index, metadata.labels[index], check))
    return checks, reference
