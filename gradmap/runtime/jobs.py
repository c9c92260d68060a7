"""The per-picture job of ``gradmap run``: explain, write the outputs atomically, build the record.

``gradmap run`` and the Ray workers of :mod:`gradmap.distributed` both call :func:`explain_and_write`,
so that a picture explained on a cluster gives the same files, byte for byte, and the same record as
one explained on this machine.

    settings = JobSettings(target=parse_target("top1", model.labels), formats=("npy",))
    layout = OutputLayout("out", paths)
    for done in explain_and_write(model, paths, layout, settings):
        print(done.record["path"], done.record["error"])

A record is the JSON-ready dict that ``gradmap run --json`` lists under ``images``: ``path``,
``predictions`` (top-5), ``maps`` (rank, method, target, files written, completeness gap), ``error``
(None, or the reason the picture failed) and ``notes``. A picture that cannot be read, decoded,
explained or written gets a record with ``error`` set; the job goes on with the others.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from PIL import Image

from gradmap import contract
from gradmap.runtime.io import DEFAULT_FORMATS, OutputLayout, RenderOptions, write_outputs
from gradmap.runtime.methods import MethodSpec
from gradmap.runtime.model import SaliencyModel
from gradmap.runtime.preprocess import EncodedPicture
from gradmap.runtime.saliency import ImageSaliency, Target, iter_saliency

__all__ = ["ExplainedPicture", "JobSettings", "explain_and_write", "failed_record"]

logger = logging.getLogger(__name__)

#: How many classes a record lists under ``predictions``.
TOP_PREDICTIONS = 5


@dataclass(frozen=True)
class JobSettings:
    """What ``gradmap run`` does to every picture; see :func:`~gradmap.runtime.saliency.iter_saliency`
    for ``target``, ``reduce``, ``clip``, ``no_crop`` and ``method``, and
    :func:`~gradmap.runtime.io.write_outputs` for ``formats`` and ``render``. ``formats=()`` writes
    no file (the maps stay in :attr:`ExplainedPicture.result`)."""

    target: Target = Target("top", 1)
    method: MethodSpec = field(default_factory=MethodSpec)
    reduce: str = contract.DEFAULT_REDUCTION
    clip: tuple[float, float] | None = None
    no_crop: bool = False
    formats: tuple[str, ...] = DEFAULT_FORMATS
    render: RenderOptions = field(default_factory=RenderOptions)
    batch_size: int = contract.DEFAULT_BATCH_SIZE


@dataclass
class ExplainedPicture:
    """One picture done: its JSON-ready ``record`` and the in-memory ``result`` (maps and gradients)."""

    record: dict
    result: ImageSaliency

    @property
    def ok(self) -> bool:
        return self.record["error"] is None


def failed_record(path: str, reason: str, notes: Iterable[str] = ()) -> dict:
    """The record of a picture that failed before or while it was explained."""
    return {"path": path, "predictions": [], "maps": [], "error": reason, "notes": list(notes)}


def _reason(error: Exception) -> str:
    return str(error.reason if hasattr(error, "reason") else error)


def explain_and_write(model: SaliencyModel, sources: Iterable[str | os.PathLike[str] | EncodedPicture | Image.Image],
                      layout: OutputLayout, settings: JobSettings, *, overlap: bool = True) -> Iterator[ExplainedPicture]:
    """Explain ``sources`` in batches, write each picture's outputs under ``layout``, yield its record.

    Args:
        model: a loaded :class:`SaliencyModel`.
        sources: picture paths, :class:`EncodedPicture` (a path and the file's bytes, read elsewhere)
            or PIL images; output file names come from the path.
        layout: where outputs go (built from every input of the run, so that a subset, such as one
            worker's share or what ``--skip-existing`` leaves, gets the same output paths).
        settings: see :class:`JobSettings`.
        overlap: write a batch's outputs (rendering, PNG encoding) on a second thread while the model
            runs the next batch; the files and records are the same either way. When the caller stops
            early (an exception, Ctrl-C, a closed generator), writes already started finish and the
            rest are dropped, so every output file is whole or absent.

    Yields:
        :class:`ExplainedPicture` per source, in input order. Outputs are written atomically
        (:func:`~gradmap.runtime.io.atomic_write`); an ``OSError`` or ``ValueError`` while writing
        (disk full, an output that would overwrite an input) becomes the picture's ``error``.
    """
    results = iter_saliency(model, sources, target=settings.target, reduce=settings.reduce, clip=settings.clip,
                            no_crop=settings.no_crop, batch_size=settings.batch_size, method=settings.method)
    if not overlap:
        for result in results:
            yield _write(result, layout, settings)
        return
    # One writer thread: onnxruntime and PNG encoding (zlib) release the GIL, so a batch's files are
    # written while the next batch runs. At most two batches wait, which bounds the memory held.
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradmap-write")
    try:
        for result in results:
            pending.append(pool.submit(_write, result, layout, settings))
            while pending and (pending[0].done() or len(pending) > 2 * settings.batch_size):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write(result: ImageSaliency, layout: OutputLayout, settings: JobSettings) -> ExplainedPicture:
    """One explained picture's files and record."""
    if not result.ok:
        return ExplainedPicture(failed_record(result.source, _reason(result.error), result.notes), result)
    record = {"path": result.source, "predictions": [], "maps": [], "error": None, "notes": list(result.notes)}
    record["predictions"] = [{"index": p.index, "label": p.label, "probability": p.probability}
                             for p in result.predictions(TOP_PREDICTIONS)]
    try:
        for saliency in result.maps:
            probability = float(result.probabilities[saliency.target_index])
            caption = f"{saliency.target_label} ({saliency.target_index}): {probability:.1%}"
            written = write_outputs(result, saliency, layout, settings.formats, settings.render, caption=caption)
            record["maps"].append({"rank": saliency.rank, "method": saliency.method, "target": {
                "index": saliency.target_index, "label": saliency.target_label,
                "probability": probability}, "files": written,
                "completeness_gap": saliency.completeness_gap})
    except (OSError, ValueError) as e:
        record["error"] = str(e)
    return ExplainedPicture(record, result)
