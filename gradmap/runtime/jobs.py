"""A run of ``gradmap run``, and the per-picture job it runs: explain, write the outputs atomically,
build the record.

:func:`run_job` is the whole run, for ``gradmap run`` and any other driver: it checks the target
and the method once, expands the inputs, skips the pictures whose outputs exist, runs an engine
(:class:`LocalEngine`, this process; :class:`gradmap.distributed.RayEngine`, Ray Data actors) and
returns a :class:`RunSummary` (the ``--json`` document and the exit status); a
:class:`RunReporter` hears about it as it goes (the CLI prints).

    summary = run_job(SaliencyModel("resnet50.onnx"), ["pictures/"], out_dir="out", formats=("npy",))
    print(summary.failed, "failed")

Both engines call :func:`explain_and_write`, so that a picture explained on a cluster gives the same
files, byte for byte, and the same record as one explained on this machine.

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
from typing import Iterable, Iterator, Protocol, Sequence

from PIL import Image

from gradmap import contract
from gradmap.runtime.io import DEFAULT_FORMATS, OutputLayout, expand_inputs, write_rendered
from gradmap.runtime.methods import MethodSpec, check_supported
from gradmap.runtime.model import SaliencyModel
from gradmap.runtime.preprocess import EncodedPicture
from gradmap.runtime.render import RenderOptions, figure_caption, render_outputs
from gradmap.runtime.saliency import ImageSaliency, SaliencyMap, Target, iter_saliency, parse_target

__all__ = ["Engine", "EngineError", "ExplainedPicture", "JobSettings", "LocalEngine", "RunReporter", "RunSummary",
           "explain_and_write", "failed_record", "make_engine", "run_job", "write_outputs"]

logger = logging.getLogger(__name__)

#: How many classes a record lists under ``predictions``.
TOP_PREDICTIONS = 5


@dataclass(frozen=True)
class JobSettings:
    """What ``gradmap run`` does to every picture; see :func:`~gradmap.runtime.saliency.iter_saliency`
    for ``target``, ``reduce``, ``clip``, ``no_crop`` and ``method``, and :func:`write_outputs` for
    ``formats`` and ``render``. ``formats=()`` writes
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


def write_outputs(result: ImageSaliency, saliency: SaliencyMap, layout: OutputLayout, formats: Iterable[str],
                  options: RenderOptions = RenderOptions(), caption: str = "") -> dict[str, str]:
    """Draw and write the requested ``formats`` for one map of one picture: what
    :func:`~gradmap.runtime.render.render_outputs` draws, written by
    :func:`~gradmap.runtime.io.write_rendered` under ``layout`` (a topK map's files carry its rank).

    ``npy`` writes two float32 arrays on the model's input grid: the attribution [3, h, w] ([1, h, w]
    for a class activation map), named for what it holds (``.gradient.npy``, ``.attribution.npy`` or
    ``.cam.npy``: the method's kind), and ``.map.npy`` [h, w] (the min-max normalized map, before
    equalization).

    Returns:
        ``{kind: path}`` for every file written (kinds heatmap, overlay, figure, gradient or
        attribution or cam, map).
    """
    outputs = render_outputs(result, saliency, formats, options, caption)
    # only topK with K > 1 puts the rank in file names; plain top-1 keeps the short names
    rank = saliency.rank if saliency.rank is not None and len(result.maps) > 1 else None
    return write_rendered(outputs, layout, result.source, rank)


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
            written = write_outputs(result, saliency, layout, settings.formats, settings.render,
                                    caption=figure_caption(result, saliency))
            record["maps"].append({"rank": saliency.rank, "method": saliency.method, "target": {
                "index": saliency.target_index, "label": saliency.target_label,
                "probability": probability}, "files": written,
                "completeness_gap": saliency.completeness_gap})
    except (OSError, ValueError) as e:
        record["error"] = str(e)
    return ExplainedPicture(record, result)


# -- a whole run ------------------------------------------------------------------------------------
class Engine(Protocol):
    """Where a run explains its pictures: ``records`` yields one record per path, writing the outputs
    of ``settings.formats`` under ``layout``; ``ordered`` says whether they come in input order."""

    ordered: bool

    def records(self, paths: Sequence[str], settings: JobSettings, layout: OutputLayout) -> Iterator[dict]: ...


class EngineError(RuntimeError):
    """An engine cannot start or reach its workers (e.g. no Ray at the given address)."""


class LocalEngine:
    """This process, with a loaded model: records in input order, outputs written on a second thread
    while the model runs the next batch (see :func:`explain_and_write`)."""

    ordered = True

    def __init__(self, model: SaliencyModel) -> None:
        self.model = model

    def records(self, paths: Sequence[str], settings: JobSettings, layout: OutputLayout) -> Iterator[dict]:
        return (done.record for done in explain_and_write(self.model, paths, layout, settings))


def make_engine(name: str, model: SaliencyModel, *, address: str | None = None, workers: int | None = None,
                threads: int | None = None, provider: str = "cpu", parquet_dir: str | None = None) -> Engine:
    """The engine ``gradmap run --engine NAME`` uses (see :data:`gradmap.contract.ENGINES`): ``local``
    runs ``model``; ``ray`` loads the model's file in Ray Data actors (:class:`gradmap.distributed.RayEngine`,
    which takes ``address``, ``workers``, ``threads``, ``provider`` and ``parquet_dir``)."""
    if name == contract.ENGINE_LOCAL:
        return LocalEngine(model)
    if name == contract.ENGINE_RAY:
        from gradmap.distributed import RayEngine

        return RayEngine(model.path, address=address, workers=workers, threads=threads, provider=provider,
                         parquet_dir=parquet_dir)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(contract.ENGINES)}")


class RunReporter:
    """What :func:`run_job` says while it runs; this one says nothing (the CLI's prints)."""

    def input_error(self, spec: str, reason: str) -> None:
        """An input matched no picture (no such file, an empty folder, a pattern matching nothing)."""

    def started(self, total: int) -> None:
        """``total`` pictures are about to be explained (after ``skip_existing``)."""

    def picture_done(self, record: dict) -> None:
        """One picture's record (see the module docstring), ``error`` set when it failed."""


@dataclass
class RunSummary:
    """What a run did: ``inputs`` (pictures found plus inputs that matched nothing), ``skipped``
    (outputs there already), ``failures`` (``{"path", "error"}`` of every input that failed, those that
    matched nothing first) and, when the run kept them, every picture's record in input order."""

    model: str
    target: str
    output_dir: str
    inputs: int
    skipped: int = 0
    failures: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def exit_code(self) -> int:
        """``gradmap run``'s exit status: 1 when an input failed (the others are written), else 0."""
        return 1 if self.failures else 0

    def to_json(self) -> dict:
        """The document ``gradmap run --json`` prints."""
        explained = {r["path"] for r in self.records}
        return {"model": self.model, "target": self.target, "output_dir": self.output_dir, "images": self.records,
                "input_errors": [f for f in self.failures if f["path"] not in explained],
                "failed": self.failed, "skipped": self.skipped}


def run_job(model: SaliencyModel | str | os.PathLike[str], inputs: Iterable[str], *, out_dir: str | os.PathLike[str],
            target: str | int | Target = contract.DEFAULT_TARGET, method: MethodSpec | str | None = None,
            reduce: str = contract.DEFAULT_REDUCTION, clip: tuple[float, float] | None = None, no_crop: bool = False,
            formats: Sequence[str] = DEFAULT_FORMATS, render: RenderOptions | None = None,
            batch_size: int = contract.DEFAULT_BATCH_SIZE, engine: Engine | None = None, skip_existing: bool = False,
            keep_records: bool = False, reporter: RunReporter | None = None) -> RunSummary:
    """Run ``gradmap run``: explain the pictures of ``inputs`` and write their outputs under ``out_dir``.

    Args:
        model: a loaded :class:`SaliencyModel` or a model file (loaded with the defaults).
        inputs: files, folders (searched for pictures) and globs (see :func:`~gradmap.runtime.io.expand_inputs`).
        out_dir: where the outputs go, the inputs' folder tree mirrored inside it.
        target: the class(es) to explain (see :func:`~gradmap.runtime.saliency.iter_saliency`).
        method: a :class:`MethodSpec` or a method name (its default settings); None: the default method.
        reduce: the channel reduction (see :func:`~gradmap.runtime.saliency.iter_saliency`).
        clip: percentile clipping of the map (see :func:`~gradmap.runtime.saliency.iter_saliency`).
        no_crop: resize the whole picture instead of resize and center crop.
        formats: what is written per map (see :func:`write_outputs`).
        render: how heatmaps, overlays and figures are drawn.
        batch_size: pictures per onnxruntime run.
        engine: where pictures are explained; None: this process (:class:`LocalEngine`).
        skip_existing: skip pictures whose outputs all exist (they are written atomically, so an
            existing one is complete): resumes an interrupted run with the same output paths.
        keep_records: keep every picture's record in the summary (``--json`` lists them; a long run
            without it holds none).
        reporter: told about inputs that matched nothing, the start, and every picture done.

    Returns:
        :class:`RunSummary`; a picture that failed is in it, never raised.

    Raises:
        TargetError: the target is not one of the model's classes.
        UnsupportedMethodError: the model lacks the outputs the method reads (checked once, here).
        EngineError: the engine cannot start.
    """
    if not isinstance(model, SaliencyModel):
        model = SaliencyModel(model)
    reporter = reporter or RunReporter()
    wanted = parse_target(target, model.labels)
    spec = method if isinstance(method, MethodSpec) else MethodSpec(method or contract.DEFAULT_METHOD)
    check_supported(model, spec, model.path)
    engine = engine or LocalEngine(model)
    formats = tuple(dict.fromkeys(formats))
    paths, problems = expand_inputs(inputs, exclude_dir=out_dir)
    summary = RunSummary(model=model.path, target=target if isinstance(target, (str, int)) else str(target),
                         output_dir=os.fspath(out_dir), inputs=len(paths) + len(problems))
    for spec_text, reason in problems:
        reporter.input_error(spec_text, reason)
        summary.failures.append({"path": spec_text, "error": reason})
    layout = OutputLayout(out_dir, paths)  # from every input, so that skipping changes no output path
    if skip_existing:
        remaining = [p for p in paths if not layout.complete(p, formats, wanted.count, spec.name)]
        summary.skipped, paths = len(paths) - len(remaining), remaining
    settings = JobSettings(target=wanted, method=spec, reduce=reduce, clip=clip, no_crop=no_crop, formats=formats,
                           render=render or RenderOptions(), batch_size=batch_size)
    records = engine.records(paths, settings, layout)
    reporter.started(len(paths))
    for record in records:
        if record["error"] is not None:
            summary.failures.append({"path": record["path"], "error": record["error"]})
        if keep_records:
            summary.records.append(record)
        reporter.picture_done(record)
    if not engine.ordered:  # records arrive as pictures finish; the summary lists them in input order
        order = {path: i for i, path in enumerate(paths)}
        summary.records.sort(key=lambda r: order[r["path"]])
    return summary
