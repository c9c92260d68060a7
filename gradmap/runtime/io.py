"""Finding input pictures, naming output files and writing them atomically (what is written is
drawn by :mod:`gradmap.runtime.render`; this module only writes).

Output layout: the inputs' directory tree is mirrored under the output directory, relative to the
deepest directory that holds all inputs, and every output keeps the input's full file name, so
``a/x.jpg``, ``b/x.jpg`` and ``a/x.png`` never collide::

    out/a/x.jpg.heatmap.png   out/a/x.jpg.overlay.png   out/a/x.jpg.figure.png
    out/a/x.jpg.gradient.npy  out/a/x.jpg.map.npy       (topK: out/a/x.jpg.top2.heatmap.png ...)

The first array is named for what it holds, the method's ``kind`` in the method table
(``contract.METHOD_TABLE``): ``.gradient.npy`` for the gradient methods, ``.attribution.npy`` for
integrated gradients, gradient x input and guided Grad-CAM, ``.cam.npy`` for Grad-CAM and Grad-CAM++.

Every file is written to a temporary file in its destination directory and then ``os.replace``d, so a
reader never sees half a file; an output path that is one of the inputs is refused.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from gradmap import contract

__all__ = [
    "FORMATS",
    "DEFAULT_FORMATS",
    "IMAGE_EXTENSIONS",
    "OutputLayout",
    "atomic_write",
    "expand_inputs",
    "png_bytes",
    "save_npy",
    "save_png",
    "write_rendered",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm", ".pbm", ".pnm", ".jfif", ".ico"})
FORMATS = contract.OUTPUT_FORMATS
DEFAULT_FORMATS = contract.DEFAULT_OUTPUT_FORMATS
_GLOB_CHARS = set("*?[")


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _inside(path: Path, directory: Path | None) -> bool:
    return directory is not None and (path == directory or directory in path.parents)


def expand_inputs(specs: Iterable[str], exclude_dir: str | os.PathLike[str] | None = None
                  ) -> tuple[list[str], list[tuple[str, str]]]:
    """Turn command-line inputs into picture paths.

    A file is taken as given (whatever its extension); a directory is searched recursively for files
    with an image extension (sorted); anything else containing ``* ? [`` is a glob (``**`` allowed).
    Files under ``exclude_dir`` (the output directory) are skipped when searching directories and
    globs, so a second run does not explain the first run's heatmaps. Duplicates are dropped.

    Returns:
        ``(paths, problems)``: the pictures in order, and ``(spec, reason)`` for inputs that matched
        nothing.
    """
    excluded = Path(exclude_dir).resolve() if exclude_dir is not None else None
    paths: list[str] = []
    seen: set[Path] = set()
    problems: list[tuple[str, str]] = []

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(str(path))

    for spec in specs:
        path = Path(spec)
        if path.is_file():
            add(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_image_file(p) and not _inside(p.resolve(), excluded))
            if not found:
                problems.append((spec, "directory holds no image files"))
            for p in found:
                add(p)
        elif _GLOB_CHARS & set(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            found = [p for p in found if _is_image_file(p) and not _inside(p.resolve(), excluded)]
            if not found:
                problems.append((spec, "pattern matches no image files"))
            for p in found:
                add(p)
        else:
            problems.append((spec, "no such file or directory"))
    return paths, problems


class OutputLayout:
    """Output paths for a set of inputs, mirroring their tree under ``out_dir`` (see module doc)."""

    def __init__(self, out_dir: str | os.PathLike[str], inputs: Sequence[str]) -> None:
        self.out_dir = Path(out_dir)
        self.inputs = frozenset(Path(p).resolve() for p in inputs)
        parents = [str(Path(p).resolve().parent) for p in inputs]
        self.root = Path(os.path.commonpath(parents)) if parents else Path.cwd()

    def base(self, source: str, rank: int | None = None) -> Path:
        """Path prefix for one picture's outputs (``<out>/<rel dir>/<name>[.topR]``)."""
        resolved = Path(source).resolve()
        relative = resolved.relative_to(self.root) if self.root in resolved.parents else Path(resolved.name)
        name = relative.name + (f".top{rank}" if rank is not None else "")
        return self.out_dir / relative.parent / name

    def planned(self, source: str, formats: Iterable[str], maps: int = 1,
                method: str = contract.DEFAULT_METHOD) -> list[Path]:
        """Every file :func:`~gradmap.runtime.jobs.write_outputs` writes for ``source`` with these ``formats`` when the
        picture gets ``maps`` maps (topK: K) by ``method``. ``--skip-existing`` skips a picture whose
        planned files all exist: outputs are written atomically, so an existing file is a complete one."""
        ranks: list[int | None] = list(range(1, maps + 1)) if maps > 1 else [None]
        kinds = {"heatmap": [("heatmap", ".png")], "overlay": [("overlay", ".png")], "figure": [("figure", ".png")],
                 "npy": [(contract.method(method).kind, ".npy"), ("map", ".npy")]}
        return [self.path(source, kind, suffix, rank) for rank in ranks
                for fmt in dict.fromkeys(formats) for kind, suffix in kinds[fmt]]

    def complete(self, source: str, formats: Iterable[str], maps: int = 1,
                 method: str = contract.DEFAULT_METHOD) -> bool:
        """Whether every planned output of ``source`` exists already (see :meth:`planned`). False when
        an output would overwrite an input: the picture is then processed and reports that error."""
        try:
            return all(p.is_file() for p in self.planned(source, formats, maps, method))
        except FileExistsError:
            return False

    def path(self, source: str, kind: str, suffix: str, rank: int | None = None) -> Path:
        base = self.base(source, rank)
        path = base.with_name(f"{base.name}.{kind}{suffix}")
        if path.resolve() in self.inputs:
            raise FileExistsError(f"refusing to overwrite input file {path}")
        return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place.

    The temporary file is hidden (``.NAME.XXXX.tmp``) and removed on any exception, Ctrl-C included;
    only a hard kill (SIGKILL, power loss) can leave one behind, never a partial ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name is chosen before the file exists, so that a signal raising at any point after its
    # creation (even inside the call that creates it) finds it to remove: mkstemp returns the name
    # only after creating the file, and a SIGTERM that lands in between left it behind.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except FileExistsError:  # the name was taken (64 random bits): that file is not ours to remove
        raise
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> None:
    """Write a PIL image as PNG, atomically, with zlib's fastest compression (level 1).

    Pillow's default level 6 took 59 ms for a 512x512 heatmap and level 1 14 ms, for a file 10 %
    larger (350 and 384 kB): at the default, encoding the PNGs took a third of ``gradmap run``'s time
    over a folder (resnet50, batch 8), as long as the gradients themselves."""
    atomic_write(path, lambda f: _encode_png(image, f))


def png_bytes(image: Image.Image) -> bytes:
    """The bytes :func:`save_png` writes for ``image``, in memory (``gradmap serve`` answers with them)."""
    buffer = io.BytesIO()
    _encode_png(image, buffer)
    return buffer.getvalue()


def _encode_png(image: Image.Image, f: BinaryIO) -> None:
    image.save(f, format="PNG", compress_level=1)


def save_npy(array: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write an array as ``.npy``, atomically."""
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def write_rendered(outputs: Iterable[tuple[str, Image.Image | np.ndarray]], layout: OutputLayout, source: str,
                   rank: int | None = None) -> dict[str, str]:
    """Write what :func:`~gradmap.runtime.render.render_outputs` gives for one map of ``source``, each
    output as it comes: a picture as ``<base>.KIND.png``, an array as float32 ``<base>.KIND.npy``
    (see :meth:`OutputLayout.path`; ``rank`` names a topK map's files).

    Returns:
        ``{kind: path}`` for every file written.
    """
    written: dict[str, str] = {}
    for kind, output in outputs:
        if isinstance(output, Image.Image):
            path = layout.path(source, kind, ".png", rank)
            save_png(output, path)
        else:
            path = layout.path(source, kind, ".npy", rank)
            save_npy(np.asarray(output, dtype=np.float32), path)
        written[kind] = str(path)
    return written
