"""Colormaps as 256-entry lookup tables with matplotlib's values, so rendering needs no matplotlib.

'hot', 'jet' and 'gray' are matplotlib's segment data turned into a table the way
``LinearSegmentedColormap`` does it (``matplotlib.colors._create_lookup_table``); 'viridis' is
matplotlib's listed table. A value x in [0, 1] picks entry ``min(int(x * 256), 255)``, as
``Colormap.__call__`` does, and bytes are ``(lut * 255).astype(uint8)`` (truncated, as matplotlib's
``bytes=True``).
"""

from __future__ import annotations

import numpy as np

from gradmap import contract
from gradmap.runtime._colormap_data import VIRIDIS
from gradmap.runtime.postprocess import check_finite

__all__ = ["COLORMAPS", "N_COLORS", "apply_colormap", "colormap_table"]

N_COLORS = 256
_CHUNK = 1 << 20  # pixels per step of apply_colormap

# (x, y0, y1) rows per channel, copied from matplotlib._cm.
_SEGMENTS = {
    "hot": {
        "red": ((0.0, 0.0416, 0.0416), (0.365079, 1.0, 1.0), (1.0, 1.0, 1.0)),
        "green": ((0.0, 0.0, 0.0), (0.365079, 0.0, 0.0), (0.746032, 1.0, 1.0), (1.0, 1.0, 1.0)),
        "blue": ((0.0, 0.0, 0.0), (0.746032, 0.0, 0.0), (1.0, 1.0, 1.0)),
    },
    "jet": {
        "red": ((0.0, 0, 0), (0.35, 0, 0), (0.66, 1, 1), (0.89, 1, 1), (1.0, 0.5, 0.5)),
        "green": ((0.0, 0, 0), (0.125, 0, 0), (0.375, 1, 1), (0.64, 1, 1), (0.91, 0, 0), (1.0, 0, 0)),
        "blue": ((0.0, 0.5, 0.5), (0.11, 1, 1), (0.34, 1, 1), (0.65, 0, 0), (1.0, 0, 0)),
    },
    "gray": {channel: ((0.0, 0, 0), (1.0, 1, 1)) for channel in ("red", "green", "blue")},
}

COLORMAPS = contract.COLORMAPS


def _segment_table(rows: tuple[tuple[float, float, float], ...], n: int) -> np.ndarray:
    # matplotlib.colors._create_lookup_table, same operations in the same order so that the byte
    # tables (which truncate) agree exactly.
    adata = np.array(rows, dtype=np.float64)
    x, y0, y1 = adata[:, 0] * (n - 1), adata[:, 1], adata[:, 2]
    xind = (n - 1) * np.linspace(0, 1, n)
    ind = np.searchsorted(x, xind)[1:-1]
    distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    lut = np.concatenate([[y1[0]], distance * (y0[ind] - y1[ind - 1]) + y1[ind - 1], [y0[-1]]])
    return np.clip(lut, 0.0, 1.0)


def colormap_table(name: str) -> np.ndarray:
    """The float64 [256, 3] RGB table of colormap ``name`` (one of :data:`COLORMAPS`)."""
    if name == "viridis":
        return np.array(VIRIDIS, dtype=np.float64)
    if name not in _SEGMENTS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    segments = _SEGMENTS[name]
    return np.stack([_segment_table(segments[c], N_COLORS) for c in ("red", "green", "blue")], axis=1)


def apply_colormap(values: np.ndarray, name: str = contract.DEFAULT_COLORMAP) -> np.ndarray:
    """Colour a map with values in [0, 1] (clipped); returns uint8 [..., 3] RGB.

    Equal to ``matplotlib.colormaps[name](values, bytes=True)[..., :3]``.
    """
    check_finite(values, "saliency map")
    table = (colormap_table(name) * 255).astype(np.uint8)
    values = np.asarray(values)
    # values * 256 is exact in float32 as in float64 (a power of two), so float32 maps need no
    # float64 copy; clipping before truncation picks the same colour as truncating then clipping.
    work = np.float32 if values.dtype == np.float32 else np.float64
    flat = values.reshape(-1)
    out = np.empty((flat.size, 3), dtype=np.uint8)
    # In chunks, so that a large picture's map needs no full-size temporaries.
    for start in range(0, flat.size, _CHUNK):
        index = flat[start:start + _CHUNK].astype(work) * work(N_COLORS)
        np.clip(index, 0, N_COLORS - 1, out=index)
        out[start:start + _CHUNK] = table[index.astype(np.intp)]
    return out.reshape(*values.shape, 3)
