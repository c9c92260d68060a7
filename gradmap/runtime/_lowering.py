"""A portable model, lowered for onnxruntime's CPU provider when the runtime loads it.

``gradmap export`` writes the portable graph, the one every engine computes alike. onnxruntime's
CPU provider runs a lowered form of it faster (:mod:`gradmap.graph.lowering`: channel padding to
its block, masks and adjoints in forms its blocked NCHWc kernels take), and the block depends on
the CPU that runs the model, not the one that exported it: 16 channels with AVX-512, 8 with AVX2
(or AVX, SSE: onnxruntime's x86 default). So the runtime lowers a portable model when it creates
a CPU session of it, for the block of the CPU at hand (:func:`cpu_block`), and keeps the lowered
model in the session cache's folder (:mod:`gradmap.runtime._session_cache`), where onnxruntime's
optimized graph of it is cached in turn:

- the first load lowers (resnet50: about a second) and writes the lowered model, its weights in a
  data file beside it (``lowered.onnx.data``): onnx-ir writes them tensor by tensor instead of
  building the whole model as one protobuf message and its bytes (resnet50: two copies of 100 MB of
  weights fewer at the lowering's peak), and onnxruntime reads them from that file
  (``bench/bench_lowering.py`` measures the first load);
- later loads read it, as long as the model file (path, size, times, inode), the block, onnx-ir
  and gradmap's graph code are the same (all part of the entry's key).

``GRADMAP_CPU_BLOCK`` (or ``SaliencyModel(cpu_block=...)``) overrides the detected block: a number
(0: no channel padding, the other passes still run) or ``off`` (no lowering: the file runs as it
is written). Lowering needs onnx-ir (``pip install 'gradmap[onnx]'``); without it, or when the
lowering fails, the runtime runs the portable graph as written (the same numbers, slower) and says
so once in the log. Other providers (CUDA) always get the file as written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gradmap import __version__

__all__ = ["CPU_BLOCK_ENV", "CpuBlockError", "Lowered", "cpu_block", "detected_block", "lowered_model", "trim_heap"]

logger = logging.getLogger(__name__)

CPU_BLOCK_ENV = "GRADMAP_CPU_BLOCK"
_FORMAT = 2  # bump when what an entry holds changes (2: the weights in lowered.onnx.data)
_MODEL, _SOURCE = "lowered.onnx", "source.json"
_OFF = ("off", "no", "none", "false")


class CpuBlockError(ValueError):
    """A channel block override that is neither ``off`` nor a number >= 0."""


def _cpu_features() -> set[str]:
    """The CPU's instruction set extensions, upper case (numpy's runtime dispatch table, else
    /proc/cpuinfo)."""
    try:
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as features
        except ImportError:  # numpy 1.x
            from numpy.core._multiarray_umath import __cpu_features__ as features
        found = {name.upper() for name, present in features.items() if present}
        if found:
            return found
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return {flag.upper() for flag in line.split(":", 1)[1].split()}
    except OSError:
        pass
    return set()


def detected_block() -> tuple[int, str]:
    """onnxruntime's NCHWc block on this CPU and why: 16 with AVX-512F, 8 on other x86-64 CPUs
    (AVX2, AVX, SSE: its x86 default), 0 (no channel padding) elsewhere, where no blocked layout
    of onnxruntime's CPU provider is known to gradmap (ARM: not measured)."""
    machine = platform.machine().lower()
    features = _cpu_features()
    if machine in ("x86_64", "amd64", "x86", "i386", "i686") or "AVX2" in features or "SSE2" in features:
        if "AVX512F" in features:
            return 16, "AVX-512"
        return 8, "AVX2" if "AVX2" in features else "x86 without AVX2"
    return 0, f"{machine or 'unknown CPU'}: no blocked layout known"


def cpu_block(override: int | str | None = None) -> tuple[int | None, str]:
    """The block to lower for and where it comes from: ``override`` (an int, or ``off``), else
    ``$GRADMAP_CPU_BLOCK``, else :func:`detected_block`. ``None``: no lowering.

    Raises:
        CpuBlockError: an override that is neither ``off`` nor a number >= 0, naming where it came from.
    """
    source = "cpu_block"
    if override is None:
        override, source = os.environ.get(CPU_BLOCK_ENV), f"${CPU_BLOCK_ENV}"
    if override is None or (isinstance(override, str) and override.strip() == ""):
        return detected_block()
    if isinstance(override, str) and override.strip().lower() in _OFF:
        return None, f"{source}={override}"
    try:
        block = int(override)
    except (TypeError, ValueError):
        raise CpuBlockError(f"{source}={override!r}: expected 'off' or a channel block >= 0 (16 for AVX-512, "
                            "8 for AVX2)") from None
    if block < 0:
        raise CpuBlockError(f"{source}={override!r}: expected 'off' or a channel block >= 0 (16 for AVX-512, 8 for AVX2)")
    return block, f"{source}={block}"


@dataclass
class Lowered:
    """What :func:`lowered_model` gives the session: the lowered model's path and its data file, and
    what happened: ``state`` is ``read`` (a cached lowered model), ``written`` (lowered now and
    cached), ``memory`` (lowered now, no cache), ``unavailable`` (onnx-ir missing) or ``failed``."""

    state: str
    block: int | None
    reason: str
    path: str | None = None
    data_files: tuple[str, ...] = ()
    seconds: float = 0.0
    message: str = ""


_SOURCES_DIGEST: str | None = None


def _graph_code_digest() -> str:
    """A digest of gradmap's graph code (the rules and the lowering): an edit makes new entries."""
    global _SOURCES_DIGEST
    if _SOURCES_DIGEST is None:
        root = Path(__file__).resolve().parents[1] / "graph"
        digest = hashlib.sha256(__version__.encode())
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
        _SOURCES_DIGEST = digest.hexdigest()[:16]
    return _SOURCES_DIGEST


def _file_key(path: str) -> dict:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino,
            "device": stat.st_dev}


def _entry_name(path: str, data_files: list[str], block: int, onnx_ir_version: str) -> tuple[str, str]:
    real = os.path.realpath(path)
    prefix = hashlib.sha256(f"lowered:{real}".encode()).hexdigest()[:16]
    key = json.dumps({"format": _FORMAT, "model": _file_key(real),
                      "data": {os.path.basename(f): _file_key(f) for f in sorted(data_files)},
                      "block": block, "graph_code": _graph_code_digest(), "onnx_ir": onnx_ir_version}, sort_keys=True)
    return f"{prefix}-b{block}", f"{prefix}-b{block}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def _lower(path: str, block: int, out: Path) -> None:
    """Load and lower the model, save it in the folder ``out`` with its weights in a data file, and
    hand the memory the lowering used back to the system before onnxruntime loads the result: the
    in-memory model's many small objects leave free but unreturned pages that onnxruntime's session
    does not reuse, so a first load would otherwise peak about 100 MB higher (resnet50,
    ``bench/bench_lowering.py``)."""
    import gc

    _lower_and_save(path, block, out)
    gc.collect()  # the model is gone once _lower_and_save returns
    trim_heap()


def _lower_and_save(path: str, block: int, out: Path) -> None:
    import onnx_ir as ir

    from gradmap.graph.lowering.at_load import lower_for_cpu

    model = ir.load(path)
    lower_for_cpu(model, block)
    ir.save(model, out / _MODEL, external_data=f"{_MODEL}.data", size_threshold_bytes=1024)


def trim_heap() -> None:
    """Have glibc return the freed parts of its heap to the system (``malloc_trim(0)``; a few ms).
    :class:`~gradmap.runtime.model.SaliencyModel` calls it once its session is created: onnxruntime
    frees the model's parsed form and its intermediate graphs then, and a lowered resnet50's first
    run otherwise peaks about 40 MB higher. Nothing happens where the C library has no malloc_trim."""
    if platform.system() != "Linux":
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        pass


def _data_files(folder: Path) -> tuple[str, ...]:
    """The lowered model's data file in ``folder``; none for a model whose tensors are all small."""
    data = folder / f"{_MODEL}.data"
    return (str(data),) if data.is_file() else ()


def lowered_model(path: str, data_files: list[str], override: int | str | None, root: Path | None) -> Lowered:
    """The portable model at ``path`` lowered for this CPU, through the cache folder ``root``
    (None: no cache). Never raises for a model that cannot be lowered: ``state`` says why and the
    caller loads the file as written."""
    block, reason = cpu_block(override)
    if block is None:
        return Lowered("off", None, reason)
    # onnx-ir's version from its metadata: importing it (with onnx) takes seconds, which a load that
    # reads its cached lowering does not pay
    try:
        if importlib.util.find_spec("onnx_ir") is None:
            raise ImportError("onnx_ir")
        onnx_ir_version = importlib.metadata.version("onnx-ir")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return Lowered("unavailable", block, reason,
                       message="lowering a portable model for onnxruntime's CPU provider needs onnx-ir: "
                               "pip install 'gradmap[onnx]'; running the portable graph as written (slower)")
    start = time.perf_counter()
    try:
        if root is None:  # no cache: a temporary folder, removed once the session has read it
            staging = Path(tempfile.mkdtemp(prefix="gradmap-lowered-"))
            try:
                _lower(path, block, staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return Lowered("memory", block, reason, path=str(staging / _MODEL), data_files=_data_files(staging),
                           seconds=time.perf_counter() - start)
        prefix, name = _entry_name(path, list(data_files), block, onnx_ir_version)
        entry = root / name
        if (entry / _MODEL).is_file() and (entry / _SOURCE).is_file():
            return Lowered("read", block, reason, path=str(entry / _MODEL), data_files=_data_files(entry),
                           seconds=time.perf_counter() - start)
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        except OSError as e:
            logger.debug("gradmap cache: %s is not writable (%s)", root, e)
            return lowered_model(path, data_files, block, None)
        try:
            _lower(path, block, staging)
            (staging / _SOURCE).write_text(json.dumps({"model": os.path.realpath(path), "block": block,
                                                       "kind": "lowered", "gradmap": __version__}))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            os.rename(staging, entry)
        except OSError:  # another process put the same entry in place first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
        for old in root.glob(f"{prefix}-*"):  # this model's older lowerings for this block
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        from gradmap.runtime._session_cache import clear_entries

        clear_entries(root, stale_only=True)  # entries of model files that are gone (and sessions of those)
        return Lowered("written", block, reason, path=str(entry / _MODEL), data_files=_data_files(entry),
                       seconds=time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - the portable graph is right everywhere: run it as written
        return Lowered("failed", block, reason, seconds=time.perf_counter() - start,
                       message=f"could not lower it for onnxruntime's CPU provider ({type(e).__name__}: {e}); "
                               "running the portable graph as written (slower)")
