"""Attribution over whole datasets on Ray Data: one :class:`~gradmap.runtime.SaliencyModel` per actor.

``pip install 'gradmap[ray]'``. Each actor loads the model once, receives batches of picture paths
(reading the bytes itself) or of bytes read by Ray (``ray.data.read_binary_files(...,
include_paths=True)``), decodes them and runs :func:`gradmap.runtime.jobs.explain_and_write`, the job
``gradmap run`` runs: outputs written by the workers are the files ``gradmap run`` writes, byte for
byte, and a broken picture becomes a row with its path and the reason, never an exception.

    import ray
    from gradmap.distributed import explain_dataset

    ray.init()
    rows = explain_dataset(["a.jpg", "b.png"], "resnet50.onnx", method="smoothgrad", samples=25)
    for row in rows.iter_rows():
        print(row["path"], row["error"], row["target_label"], row["saliency_map"].shape)

Rows have ``path``; ``error`` (None, or why the picture failed); ``record`` (the JSON document
``gradmap run --json`` lists for the picture, files included); ``method``; ``top_index``,
``top_label``, ``top_probability`` (the five best classes); ``target_index``, ``target_label``,
``target_probability`` (one entry per map: K for topK); and, with ``keep_maps``, ``saliency_map``,
float32 [K, h, w] on the model's input grid (the ``.map.npy`` arrays; all NaN on a failed row).

Fault tolerance is Ray Data's: an actor that dies is restarted and the batches it held are run
again. Outputs are written atomically, so a batch run twice rewrites the same bytes and a killed
worker leaves no partial file under a final name (at most a hidden ``.NAME.XXXX.tmp``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from gradmap import contract
from gradmap.runtime.io import OutputLayout
from gradmap.runtime.jobs import EngineError, JobSettings, explain_and_write
from gradmap.runtime.methods import MethodSpec, check_supported
from gradmap.runtime.model import SaliencyModel
from gradmap.runtime.preprocess import EncodedPicture
from gradmap.runtime.render import RenderOptions
from gradmap.runtime.saliency import Target, parse_target

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

__all__ = ["RAY_MISSING", "RayConnectionError", "RayEngine", "RayNodeError", "explain_dataset", "import_ray",
           "iter_records", "ray_session", "run_records"]

logger = logging.getLogger(__name__)

RAY_MISSING = "gradmap's Ray engine needs Ray Data: pip install 'gradmap[ray]'"


def import_ray():
    """Import ``ray`` and ``ray.data``, or raise ImportError saying how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{RAY_MISSING} ({e})") from e
    return ray


class _Explainer:
    """A Ray Data actor: loads the model once, then explains and writes batch after batch."""

    def __init__(self, model_path: str, settings: JobSettings, layout: OutputLayout | None, provider: str,
                 threads: int | None, keep_maps: bool) -> None:
        self.model = SaliencyModel(model_path, provider=provider, threads=threads)
        self.settings = settings
        # No output directory: nothing is written (settings.formats is empty), any layout will do.
        self.layout = layout if layout is not None else OutputLayout(os.devnull, [])
        self.keep_maps = keep_maps
        self.map_shape = (settings.target.count, *self.model.input_size)
        logger.info("actor %d loaded %s", os.getpid(), model_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        paths = [str(p) for p in batch["path"]]
        data = batch.get("bytes")
        sources = [EncodedPicture(path, _read(path) if data is None else bytes(data[i]))
                   for i, path in enumerate(paths)]
        rows: dict[str, list] = {name: [] for name in _COLUMNS}
        maps = []
        for done in explain_and_write(self.model, sources, self.layout, self.settings):
            record = done.record
            rows["path"].append(record["path"])
            rows["error"].append(record["error"])
            rows["record"].append(json.dumps(record))
            rows["method"].append(self.settings.method.name)
            rows["top_index"].append([p["index"] for p in record["predictions"]])
            rows["top_label"].append([p["label"] for p in record["predictions"]])
            rows["top_probability"].append([p["probability"] for p in record["predictions"]])
            ok = record["error"] is None
            kept = done.result.maps if ok else []
            rows["target_index"].append([m.target_index for m in kept])
            rows["target_label"].append([m.target_label for m in kept])
            rows["target_probability"].append([float(done.result.probabilities[m.target_index]) for m in kept])
            if self.keep_maps:
                maps.append(np.stack([m.saliency_map.astype(np.float32) for m in kept]) if ok
                            else np.full(self.map_shape, np.nan, np.float32))
        out: dict[str, Any] = dict(rows)
        if self.keep_maps:
            out["saliency_map"] = np.stack(maps)
        return out


_COLUMNS = ("path", "error", "record", "method", "top_index", "top_label", "top_probability", "target_index",
            "target_label", "target_probability")


def _read(path: str) -> bytes | None:
    """The file's bytes, or None when it cannot be read: decoding from the path then reports the
    same reason ``gradmap run`` reports (no such file, permission denied...)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def explain_dataset(dataset_or_paths: "ray.data.Dataset | Sequence[str | os.PathLike[str]]",
                    model_path: str | os.PathLike[str], *, method: str | MethodSpec = contract.DEFAULT_METHOD,
                    target: str | int | Target = contract.DEFAULT_TARGET, reduce: str = contract.DEFAULT_REDUCTION,
                    clip: tuple[float, float] | None = None, no_crop: bool = False,
                    out_dir: str | os.PathLike[str] | None = None, formats: Iterable[str] = (),
                    render: RenderOptions | None = None, layout: OutputLayout | None = None,
                    batch_size: int = contract.DEFAULT_BATCH_SIZE, workers: int | None = None, threads: int | None = 1,
                    provider: str = "cpu", keep_maps: bool = True, **method_options: Any) -> "ray.data.Dataset":
    """Explain every picture of a dataset on Ray, one model per actor; returns a lazy Ray Dataset.

    Args:
        dataset_or_paths: picture file paths (read by the workers), or a Ray Dataset with a
            ``path`` column and optionally a ``bytes`` column holding the encoded files, as
            ``ray.data.read_binary_files(paths, include_paths=True)`` makes (S3, GCS, HDFS...).
            Folders and globs: expand them first with :func:`gradmap.runtime.expand_inputs`.
        model_path: a model written by ``gradmap export``, at a path every worker can read.
        method: a method name (options such as ``samples=25`` or ``steps=16`` as keywords) or a
            :class:`~gradmap.runtime.methods.MethodSpec`.
        target: as for :func:`gradmap.runtime.iter_saliency`.
        reduce: as for :func:`gradmap.runtime.iter_saliency`.
        clip: as for :func:`gradmap.runtime.iter_saliency`.
        no_crop: as for :func:`gradmap.runtime.iter_saliency`.
        out_dir: write the outputs ``formats`` names under this folder, as ``gradmap run`` does; it
            must be shared by the workers. Default: write nothing.
        formats: the outputs to write (``heatmap``, ``overlay``, ``figure``, ``npy``).
        render: how to draw them (colormap, overlay, placement).
        layout: the output layout, when it must come from more inputs than this dataset's (the CLI
            passes the layout of every input so that ``--skip-existing`` changes no path).
        batch_size: pictures per batch; a batch is what an actor that dies costs.
        workers: actors (default: as many as the cluster has CPUs for, ``threads`` each).
        threads: onnxruntime threads per actor, and the CPUs each actor reserves.
        provider: onnxruntime provider in the actors (see :func:`gradmap.runtime.resolve_providers`).
        keep_maps: include the ``saliency_map`` column.

    Returns:
        A ``ray.data.Dataset`` of one row per picture (see the module docstring). Nothing runs until
        it is consumed (``iter_rows``, ``write_parquet``, ``materialize``...).

    Raises:
        ImportError: Ray Data is not installed.
        GradmapModelError, TargetError, ValueError: the model, target, method or formats are wrong
            (checked once, on the driver, before any worker starts).
    """
    ray = import_ray()
    model_path = os.fspath(model_path)
    spec = method if isinstance(method, MethodSpec) else MethodSpec(method, **method_options)
    if isinstance(method, MethodSpec) and method_options:
        raise ValueError("pass method options inside the MethodSpec, not as keywords")
    checked = SaliencyModel(model_path, provider="cpu", threads=1)
    check_supported(checked, spec, model_path)
    formats = tuple(dict.fromkeys(formats))
    if formats and out_dir is None and layout is None:
        raise ValueError("formats to write need an out_dir")
    settings = JobSettings(target=parse_target(target, checked.labels), method=spec, reduce=reduce, clip=clip,
                           no_crop=no_crop, formats=formats, render=render or RenderOptions(), batch_size=batch_size)
    if isinstance(dataset_or_paths, ray.data.Dataset):
        dataset = dataset_or_paths
        if layout is None and out_dir is not None:
            layout = OutputLayout(out_dir, [])  # names under out_dir, relative to the working directory
    else:
        paths = [os.fspath(p) for p in dataset_or_paths]
        if not paths:
            raise ValueError("no pictures to explain")
        if layout is None and out_dir is not None:
            layout = OutputLayout(out_dir, paths)
        dataset = _paths_dataset(paths, batch_size)
    return _map(dataset, model_path, settings, layout, workers=workers, threads=threads, provider=provider,
                keep_maps=keep_maps)


def _paths_dataset(paths: Sequence[str], batch_size: int) -> "ray.data.Dataset":
    import ray.data

    # One block per batch: an actor that dies loses (and Ray re-runs) only the batches it held.
    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=math.ceil(len(paths) / batch_size))


def _map(dataset: "ray.data.Dataset", model_path: str, settings: JobSettings, layout: OutputLayout | None, *,
         workers: int | None, threads: int | None, provider: str, keep_maps: bool) -> "ray.data.Dataset":
    import ray

    threads = max(1, int(threads or 1))  # each actor reserves the CPUs its onnxruntime threads use
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
    return dataset.map_batches(
        _Explainer, batch_size=settings.batch_size, batch_format="numpy", num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"model_path": model_path, "settings": settings, "layout": layout,
                               "provider": provider, "threads": threads, "keep_maps": keep_maps})


def run_records(paths: Sequence[str], model_path: str, settings: JobSettings, layout: OutputLayout, *,
                address: str | None = None, workers: int | None = None, threads: int | None = None,
                provider: str = "cpu", parquet_dir: str | None = None) -> Iterator[dict]:
    """``gradmap run --engine ray``: explain ``paths`` on Ray (see :class:`ray_session` for
    ``address``) and yield each picture's record as it finishes. The workers write the outputs of
    ``settings.formats`` under ``layout``; with ``parquet_dir``, they write one Parquet dataset
    there instead (maps included) and the records are read back from it once it is complete.

    Connects at once (raising :class:`RayConnectionError` when it cannot); the connection is closed
    when the records are exhausted. When Ray fails during the run (its node dies, the ``ray://``
    connection is lost), the records end with :class:`RayNodeError` saying how many pictures are
    written and how to finish the set.

    A process not connected to Ray yet drives the run from a child process: when the local raylet
    dies, Ray's core worker ends the process it lives in at once, with its own log lines and no
    Python exception, so the failure can only be reported from outside it. A process connected
    already (a notebook, the tests) drives it in place."""
    if not paths:
        return iter(())
    job = dict(paths=paths, model_path=model_path, settings=settings, layout=layout, workers=workers,
               threads=threads, provider=provider, parquet_dir=parquet_dir)
    ray = import_ray()
    if not ray.is_initialized():
        return _records_from_child(job, address)
    session = ray_session(address)
    ray = session.__enter__()

    def records() -> Iterator[dict]:
        try:
            yield from _job_records(ray, job, address)
        except Exception as e:
            if not _is_ray_failure(e):
                raise
            raise RayNodeError(_node_failure(f"{type(e).__name__}: {_first_line(e)}", address, job)) from e
        finally:
            try:
                session.__exit__(None, None, None)
            except Exception as e:  # shutting down a Ray whose node is gone: nothing left to close
                logger.debug("closing the Ray session: %s", e)

    return records()


def _job_records(ray, job: dict, address: str | None) -> Iterator[dict]:
    if address is not None and address.startswith("ray://"):
        # Ray Data does not execute through the Ray Client (Ray 2.60: "'Worker' object has no
        # attribute 'core_worker'"), so the job is driven by a task inside the cluster and
        # the records come back when it is done.
        yield from ray.get(ray.remote(num_cpus=0)(_drive).remote(**job))
    else:
        yield from _records(**job)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


class _PassedFd:
    """A file descriptor handed to a spawned child (multiprocessing passes it while spawning)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _passed_fd, (reduction.DupFd(self.fd),)


def _passed_fd(handle) -> int:
    return handle if isinstance(handle, int) else handle.detach()


def _driver(job: dict, address: str | None, conn, stderr_fd: int) -> None:
    """The child process of :func:`_records_from_child`: connect, run, send each record; Ray's own
    log lines (its C++ core worker writes to fd 2) go to the parent, which shows them only to explain
    a failure."""
    os.dup2(stderr_fd, 2)
    try:
        session = ray_session(address)
        ray = session.__enter__()
    except RayConnectionError as e:
        conn.send(("connection", str(e)))
        return
    conn.send(("connected", None))
    try:
        for record in _job_records(ray, job, address):
            conn.send(("record", record))
        conn.send(("done", None))
    except Exception as e:
        import traceback

        kind = "ray" if _is_ray_failure(e) else "defect"
        conn.send((kind, f"{type(e).__name__}: {_first_line(e)}" if kind == "ray" else traceback.format_exc()))
    finally:
        try:
            session.__exit__(None, None, None)
        except Exception:  # a Ray whose node is gone: nothing left to close
            pass


def _records_from_child(job: dict, address: str | None) -> Iterator[dict]:
    import collections
    import multiprocessing
    import threading

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    read_fd, write_fd = os.pipe()
    ray_lines: collections.deque[str] = collections.deque(maxlen=200)

    def drain() -> None:
        with os.fdopen(read_fd, "r", errors="replace") as stream:
            for line in stream:
                ray_lines.append(line.rstrip())

    threading.Thread(target=drain, daemon=True, name="gradmap-ray-log").start()
    process = context.Process(target=_driver, args=(job, address, send, _PassedFd(write_fd)), name="gradmap-ray-driver")
    process.start()
    send.close()
    os.close(write_fd)

    def message():
        """The child's next message, or None once it is gone without one."""
        while True:
            if receive.poll(0.2):
                try:
                    return receive.recv()
                except (EOFError, OSError):
                    return None
            if not process.is_alive() and not receive.poll(0):
                return None

    def gone() -> str:
        process.join(10)
        said = [line for line in ray_lines if "died" in line.lower() or "raylet" in line.lower()]
        last = f": {said[-1].split('] ', 1)[-1][:300]}" if said else ""
        return f"the process driving Ray exited with {process.exitcode}{last}"

    first = message()
    if first is None or first[0] != "connected":
        process.join(10)
        where = "a local Ray" if address is None else f"Ray at {address}"
        raise RayConnectionError(first[1] if first is not None and first[0] == "connection" else
                                 f"cannot start or reach {where}: {gone()}")

    def records() -> Iterator[dict]:
        try:
            while True:
                got = message()
                if got is None:
                    raise RayNodeError(_node_failure(gone(), address, job))
                kind, payload = got
                if kind == "record":
                    yield payload
                elif kind == "done":
                    return
                elif kind == "ray":
                    raise RayNodeError(_node_failure(payload, address, job))
                else:
                    raise RuntimeError(f"the Ray run failed:\n{payload}")
        finally:
            if process.is_alive():
                process.terminate()
            process.join(30)
            if process.is_alive():
                process.kill()
            receive.close()

    return records()


def _is_ray_failure(error: BaseException) -> bool:
    """Whether an exception out of a Ray run is Ray's (a node, a raylet, the Ray Client connection):
    gradmap's actors turn every picture's failure into a record, so any other exception is a defect."""
    return isinstance(error, ConnectionError) or type(error).__module__.split(".")[0] == "ray"


def _node_failure(reason: str, address: str | None, job: dict) -> str:
    """One message for a run that Ray could not finish: what failed, what is written, how to finish."""
    where = ("the connection to Ray at " + address if address is not None and address.startswith("ray://")
             else "the Ray node" if address is None else f"the Ray cluster at {address}")
    if job["parquet_dir"] is not None:
        return (f"{where} failed during the run ({reason}); the Parquet dataset in {job['parquet_dir']} is "
                "incomplete: remove it and run again")
    settings, layout, paths = job["settings"], job["layout"], job["paths"]
    done = sum(layout.complete(p, settings.formats, settings.target.count, settings.method.name) for p in paths)
    return (f"{where} failed during the run ({reason}); {done} of {len(paths)} pictures have all their outputs "
            "written (each file is complete: outputs are written atomically); run the same command with "
            "--skip-existing to finish the set")


def _records(paths: Sequence[str], model_path: str, settings: JobSettings, layout: OutputLayout, *,
             workers: int | None, threads: int | None, provider: str, parquet_dir: str | None) -> Iterator[dict]:
    dataset = _map(_paths_dataset(paths, settings.batch_size), model_path, settings, layout,
                   workers=workers, threads=threads, provider=provider, keep_maps=parquet_dir is not None)
    if parquet_dir is None:
        yield from iter_records(dataset)
        return
    dataset.write_parquet(parquet_dir)
    import pyarrow.parquet as pq

    for fragment in pq.ParquetDataset(parquet_dir).fragments:
        for record in fragment.to_table(columns=["record"]).column("record").to_pylist():
            yield json.loads(record)


def _drive(**job: Any) -> list[dict]:
    """:func:`_records` run inside the cluster, for a driver connected through the Ray Client."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return list(_records(**job))


class RayConnectionError(EngineError, ConnectionError):
    """Ray could not be started or reached at the given address."""


class RayNodeError(RayConnectionError):
    """Ray failed during a run (its node died, the Ray Client connection was lost): the message says
    how many pictures are written and how to finish the set."""


class RayEngine:
    """``gradmap run --engine ray`` for :func:`gradmap.runtime.jobs.run_job`: the pictures explained and
    written by Ray Data actors (see :func:`run_records` for ``address``, ``workers``, ``threads``,
    ``provider``; with ``parquet_dir``, one Parquet dataset instead of picture files). Records come
    as pictures finish; a failure of Ray during the run ends them with :class:`RayNodeError` (an
    :class:`~gradmap.runtime.jobs.EngineError`: ``run_job`` raises it, ``gradmap run`` prints it)."""

    ordered = False

    def __init__(self, model_path: str | os.PathLike[str], *, address: str | None = None, workers: int | None = None,
                 threads: int | None = None, provider: str = "cpu", parquet_dir: str | None = None) -> None:
        self.model_path = os.fspath(model_path)
        self.address, self.workers, self.threads, self.provider = address, workers, threads, provider
        self.parquet_dir = parquet_dir

    def records(self, paths: Sequence[str], settings: JobSettings, layout: OutputLayout) -> Iterator[dict]:
        if self.parquet_dir is not None:  # the maps go to Parquet, not to picture files
            settings = dataclasses.replace(settings, formats=())
        return run_records(paths, self.model_path, settings, layout, address=self.address, workers=self.workers,
                           threads=self.threads, provider=self.provider, parquet_dir=self.parquet_dir)


def iter_records(dataset: "ray.data.Dataset") -> Iterator[dict]:
    """Stream the per-picture records (``gradmap run --json``'s ``images`` entries) of
    :func:`explain_dataset`'s result, in the order pictures finish."""
    for row in dataset.select_columns(["record"]).iter_rows():
        yield json.loads(row["record"])


class ray_session:
    """Connect to Ray for the duration of a ``with`` block.

    ``address=None`` starts a local Ray instance (``num_cpus``: default all cores) unless this process
    is connected already; ``"auto"`` joins the cluster this machine belongs to; ``"ray://HOST:PORT"``
    goes through the Ray Client. Only a connection opened here is closed on exit.
    """

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 object_store_memory: int | None = None) -> None:
        self.address, self.num_cpus, self.object_store_memory = address, num_cpus, object_store_memory
        self.started = False

    def __enter__(self):
        ray = import_ray()
        if not ray.is_initialized():
            try:
                if self.address is None:
                    # log_to_driver off: a failing node's workers would print Ray's tracebacks
                    # into gradmap's output; the run reports the failure itself (RayNodeError)
                    ray.init(num_cpus=self.num_cpus, object_store_memory=self.object_store_memory,
                             include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
                else:  # the cluster's own settings apply; the Ray Client takes no others
                    ray.init(address=self.address)
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
                where = "a local Ray" if self.address is None else f"Ray at {self.address}"
                raise RayConnectionError(f"cannot start or reach {where}: {str(e).strip()}") from e
            self.started = True
        # gradmap run shows its own progress bar; Ray Data's bars and its notice that they are off
        # would interleave with it
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return ray

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray

            ray.shutdown()
