"""onnxruntime's optimized graph of a model, kept on disk so that later sessions skip optimizing it.

Creating a session of a gradient model is most of a short run's time and memory: onnxruntime
folds the adjoint kernels out of the forward weights, fuses activations and rewrites convolutions
into its blocked CPU layout, holding the file's weights, the folded ones and their blocked copies
at once (resnet50: 0.67 s and a 450 MB peak, of a 1.2 s, 480 MB first map). The first session of a
model on a machine only leaves a mark; the second saves the optimized graph
(``optimized_model_filepath``, weights in a data file beside it), which costs that session about
half a second more (resnet50); later sessions load it with optimizations off, which gives the same kernels on the
same weights, so the same outputs bit for bit (tests/test_runtime_session_cache.py), in a tenth of the time
and memory-mapping the weights instead of copying them. A model run once (a fresh container, a
one-off command) pays nothing for an entry it would never read.

The optimized graph is specific to the onnxruntime version and the CPU (its blocked layout has 16
channels with AVX-512, 8 with AVX2), so both are part of an entry's key, with the model file's
path, size, modification and change times, inode and device (and those of its external data
files): a re-exported model gets a new entry, and the entries of
the same path under older keys, and those whose model file is gone, are removed when it is written
(each entry records its model file; ``gradmap cache list`` and ``gradmap cache clear`` show and remove
them). CPU sessions only; a GPU provider's
optimized graph is not cached.

Where: ``$GRADMAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradmap/onnxruntime``, else
``~/.cache/gradmap/onnxruntime``. ``GRADMAP_CACHE_DIR=off`` (or ``cache_dir=False``) turns it off.
An entry is written to a temporary folder and renamed into place, so concurrent processes (Ray
workers) never read a partial one; an entry onnxruntime cannot load is removed and the model
loaded from its file. A cache that cannot be written costs nothing but the saving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import onnxruntime as ort

__all__ = ["CACHE_ENV", "cache_root", "cached_session", "clear_entries", "list_entries"]

logger = logging.getLogger(__name__)

CACHE_ENV = "GRADMAP_CACHE_DIR"
_FORMAT = 1  # bump when what an entry holds changes
_MODEL, _DATA, _SOURCE = "model.onnx", "model.data", "source.json"
_OFF = ("off", "0", "false", "no", "none", "")


def cache_root(cache_dir: str | os.PathLike[str] | bool | None = None) -> Path | None:
    """The cache folder: ``cache_dir`` if given (False: none), else ``$GRADMAP_CACHE_DIR``
    (``off``: none), else the user's cache folder."""
    if cache_dir is False:
        return None
    if cache_dir is not None and cache_dir is not True:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradmap" / "onnxruntime"


def _cpu_signature() -> str:
    """What decides onnxruntime's CPU kernels and layouts here: the instruction set extensions."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _file_key(path: str) -> dict:
    # ctime changes with every write and cannot be set back (a copy that keeps mtime still gets a new one)
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino,
            "device": stat.st_dev}


def _entry_name(path: str, options: ort.SessionOptions, data_files: list[str]) -> tuple[str, str]:
    """(the model path's prefix, the entry's folder name) for ``path`` (and its external data
    files) under these options."""
    real = os.path.realpath(path)
    prefix = hashlib.sha256(real.encode()).hexdigest()[:16]
    key = json.dumps({"format": _FORMAT, "model": _file_key(real),
                      "data": {os.path.basename(f): _file_key(f) for f in sorted(data_files)},
                      "onnxruntime": ort.__version__, "cpu": _cpu_signature(),
                      "level": int(options.graph_optimization_level)}, sort_keys=True)
    return prefix, f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def cached_session(path: str, options: ort.SessionOptions, providers: list[str],
                   cache_dir: str | os.PathLike[str] | bool | None = None, *,
                   data_files: list[str] = ()) -> tuple[ort.InferenceSession, str]:
    """An onnxruntime session of ``path`` through the cache; returns it and what the cache did:
    ``data_files``: the model's external data files, part of the key. ``read`` (an entry loaded), ``marked`` (the model's first session here: a mark left, no entry),
    ``written`` (an entry saved), ``off`` (no cache for this session) or ``unwritable`` (the mark or
    entry could not be saved; the session is the plain one).

    Raises what ``ort.InferenceSession(path, options, providers=providers)`` raises for a model
    that does not load."""
    root = cache_root(cache_dir)
    if root is None or providers != ["CPUExecutionProvider"]:
        return ort.InferenceSession(path, options, providers=providers), "off"
    prefix, name = _entry_name(path, options, list(data_files))
    entry = root / name
    if (entry / _MODEL).is_file():
        read_options = _copy(options)
        read_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(entry / _MODEL), read_options, providers=providers), "read"
        except Exception as e:  # noqa: BLE001 - a damaged entry: drop it and load the model itself
            logger.warning("gradmap cache: removing %s, which onnxruntime cannot load (%s)", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
            seen = True  # an entry was there: the model is used again, save a sound one now
    else:
        seen = False
    mark = root / f".{name}.seen"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not seen and not mark.exists():  # the model's first session here: an entry may never be read
            mark.touch()
            return ort.InferenceSession(path, options, providers=providers), "marked"
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    except OSError as e:
        logger.debug("gradmap cache: %s is not writable (%s)", root, e)
        return ort.InferenceSession(path, options, providers=providers), "unwritable"
    write_options = _copy(options)
    write_options.optimized_model_filepath = str(staging / _MODEL)
    write_options.add_session_config_entry("session.optimized_model_external_initializers_file_name", _DATA)
    write_options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        session = ort.InferenceSession(path, write_options, providers=providers)
        (staging / _SOURCE).write_text(json.dumps({"model": os.path.realpath(path), "onnxruntime": ort.__version__}))
    except Exception as e:  # noqa: BLE001 - saving failed (disk full?) or the model does not load: tell them apart
        shutil.rmtree(staging, ignore_errors=True)
        logger.debug("gradmap cache: saving the optimized graph failed (%s)", e)
        return ort.InferenceSession(path, options, providers=providers), "unwritable"
    try:
        os.rename(staging, entry)
    except OSError:  # another process put the same entry in place first
        shutil.rmtree(staging, ignore_errors=True)
        return session, "written"
    mark.unlink(missing_ok=True)
    for old in [*root.glob(f"{prefix}-*"), *root.glob(f".{prefix}-*.seen")]:  # the path's older keys
        if name not in old.name:
            _remove(old)
    clear_entries(root, stale_only=True)  # and the entries of model files that are gone
    return session, "written"


def list_entries(root: Path | None) -> list[dict]:
    """The entries under ``root``: folder, model file it was made from (None if unrecorded),
    whether that file still exists, and bytes on disk."""
    if root is None or not root.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            model = json.loads((folder / _SOURCE).read_text()).get("model")
        except (OSError, ValueError):
            model = None
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        entries.append({"entry": str(folder), "model": model, "model_exists": bool(model) and os.path.isfile(model),
                        "bytes": size})
    return entries


def clear_entries(root: Path | None, *, stale_only: bool = False) -> tuple[int, int]:
    """Remove the entries under ``root`` (``stale_only``: those whose model file is gone) and, when
    clearing all, the marks and staging folders too; returns (entries removed, bytes freed)."""
    removed = freed = 0
    for entry in list_entries(root):
        if stale_only and (entry["model"] is None or entry["model_exists"]):
            continue
        _remove(Path(entry["entry"]))
        removed, freed = removed + 1, freed + entry["bytes"]
    if not stale_only and root is not None and root.is_dir():
        for hidden in root.glob(".*"):
            _remove(hidden)
    return removed, freed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _copy(options: ort.SessionOptions) -> ort.SessionOptions:
    """A fresh SessionOptions with the settings gradmap's runtime sets (SessionOptions cannot be
    copied, and a session's options must not carry the saving path into the next session)."""
    copy = ort.SessionOptions()
    copy.intra_op_num_threads = options.intra_op_num_threads
    copy.inter_op_num_threads = options.inter_op_num_threads
    copy.log_severity_level = options.log_severity_level
    copy.enable_mem_pattern = options.enable_mem_pattern
    copy.enable_cpu_mem_arena = options.enable_cpu_mem_arena
    copy.execution_mode = options.execution_mode
    copy.graph_optimization_level = options.graph_optimization_level
    return copy
