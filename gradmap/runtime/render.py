"""Pictures of saliency maps, drawn with numpy and PIL (matplotlib is not a runtime dependency).

- :func:`render_outputs`: everything ``gradmap run --format`` writes for one map of one picture,
  drawn and returned output by output (:mod:`gradmap.runtime.io` writes them);
- :func:`render_heatmap`: the coloured map, transparent where it does not cover the picture.
- :func:`render_overlay`: ``alpha * colour + (1 - alpha) * picture`` where the map covers the picture,
  which is what matplotlib shows for ``imshow(img); imshow(map, cmap, alpha=alpha)``; or, weighted,
  with opacity ``alpha * value``, so that only where the map is high colours the picture.
- :func:`render_figure`: the ResNet-50 recipe's four panels (original | raw map | equalized map |
  overlay) with titles and the predicted label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gradmap import contract
from gradmap.runtime.colormaps import apply_colormap
from gradmap.runtime.postprocess import map_to_original, scale_to_percentile

if TYPE_CHECKING:  # pragma: no cover
    from gradmap.runtime.saliency import ImageSaliency, SaliencyMap

__all__ = ["FIGURE_TITLES", "OVERLAYS", "RenderOptions", "figure_caption", "overlay_values", "render_figure",
           "render_heatmap", "render_outputs", "render_overlay"]

FIGURE_TITLES = (
    "Original Image",
    "Raw Saliency Map",
    "Saliency Map with Histogram Equalization",
    "Overlay of Saliency Map on Image",
)


#: The default overlay: the min-max map scaled to its 99th percentile (clipped above, as PAIR's
#: ``VisualizeImageGrayscale``) and blended with opacity ``OVERLAY_ALPHA * value``, so that low
#: values leave the picture visible (``tools/overlay_criterion.py`` measured the choice).
OVERLAY_PERCENTILE = 99.0
OVERLAY_ALPHA = 0.8

_BAND_ROWS = 512


def _covered(values: np.ndarray, covered: np.ndarray | None) -> np.ndarray:
    return np.ones(values.shape, dtype=bool) if covered is None else np.asarray(covered, dtype=bool)


def render_heatmap(values: np.ndarray, covered: np.ndarray | None = None,
                   colormap: str = contract.DEFAULT_COLORMAP) -> Image.Image:
    """Colour a [H, W] map in [0, 1]; RGBA with alpha 0 where ``covered`` is False, else RGB."""
    rgb = apply_colormap(values, colormap)
    if covered is None:
        return Image.fromarray(rgb, mode="RGB")
    alpha = np.where(_covered(values, covered), 255, 0).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


def render_overlay(picture: Image.Image, values: np.ndarray, covered: np.ndarray | None = None,
                   colormap: str = contract.DEFAULT_COLORMAP, alpha: float = 0.5, *, weighted: bool = False) -> Image.Image:
    """Blend the coloured map over the RGB ``picture`` (same size).

    Flat (``weighted=False``, the recipes' overlay): opacity ``alpha`` everywhere the map covers the
    picture. ``weighted``: opacity ``alpha * value`` (values clipped to [0, 1]), so that low values
    leave the picture as it is and colour marks where the map is high. Outside ``covered`` the
    picture shows unchanged. Each channel is ``rint(a * colour + (1 - a) * picture)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    pixels = np.asarray(picture.convert("RGB"))
    if pixels.shape[:2] != values.shape:
        raise ValueError(f"picture is {pixels.shape[1]}x{pixels.shape[0]} but the map is {values.shape[1]}x{values.shape[0]}")
    mask = _covered(values, covered)
    # Both operands are bytes, so the float64 blend has only 256 x 256 outcomes: tabulate them
    # (the same arithmetic, element for element) instead of blending a 10000x8000 picture in float64.
    levels = np.arange(256, dtype=np.float64)
    blend = np.rint(alpha * levels[:, None] + (1.0 - alpha) * levels[None, :]).astype(np.uint8)  # [colour, base]
    out = np.empty_like(pixels)
    for top in range(0, pixels.shape[0], _BAND_ROWS):  # band by band: no full-size temporaries
        rows = slice(top, top + _BAND_ROWS)
        base = pixels[rows]
        colour = apply_colormap(values[rows], colormap)
        if weighted:
            a = alpha * np.clip(values[rows].astype(np.float64), 0.0, 1.0)[..., None]
            blended = np.rint(a * colour + (1.0 - a) * base).astype(np.uint8)
        else:
            blended = blend[colour, base]
        out[rows] = np.where(mask[rows][..., None], blended, base)
    return Image.fromarray(out, mode="RGB")


def _panel(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Fit ``image`` into ``size`` (w, h) keeping its aspect ratio, on white."""
    scale = min(size[0] / image.width, size[1] / image.height)
    fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                          Image.Resampling.BILINEAR)
    panel = Image.new("RGB", size, "white")
    offset = ((size[0] - fitted.width) // 2, (size[1] - fitted.height) // 2)
    if fitted.mode == "RGBA":
        panel.paste(fitted, offset, fitted)
    else:
        panel.paste(fitted, offset)
    return panel


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _draw_centered(draw: ImageDraw.ImageDraw, text: str, center_x: int, top: int, width: int,
                   font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    # Shorten titles that do not fit their panel rather than let them run into the next one.
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    draw.text((center_x - draw.textlength(text, font=font) / 2, top), text, fill="black", font=font)


def render_figure(picture: Image.Image, raw: np.ndarray, equalized: np.ndarray, overlay_values: np.ndarray,
                  covered: np.ndarray | None = None, *, caption: str = "", colormap: str = contract.DEFAULT_COLORMAP,
                  alpha: float = 0.5, panel_size: int = 320, weighted: bool = False) -> Image.Image:
    """The four-panel figure of the ResNet-50 recipe, as one RGB image.

    Args:
        picture: the original RGB picture.
        raw: the min-max normalized map, on the original picture.
        equalized: the equalized map, on the original picture.
        overlay_values: the map drawn in the overlay panel (the recipe uses the equalized one);
            ``weighted`` and ``alpha`` as in :func:`render_overlay`.
        covered: where the maps cover the picture (None: everywhere); elsewhere panels stay white.
        caption: a line above the panels, e.g. the predicted label and its probability.
        panel_size: width and height of each panel's box, in pixels.
    """
    images = [
        picture.convert("RGB"),
        render_heatmap(raw, covered, colormap),
        render_heatmap(equalized, covered, colormap),
        render_overlay(picture, overlay_values, covered, colormap, alpha, weighted=weighted),
    ]
    title_font, caption_font = _font(14), _font(18)
    margin, title_h, caption_h = 12, 24, 32 if caption else 0
    width = margin + len(images) * (panel_size + margin)
    height = caption_h + title_h + panel_size + margin
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    if caption:
        _draw_centered(draw, caption, width // 2, 8, width - 2 * margin, caption_font)
    for i, (image, title) in enumerate(zip(images, FIGURE_TITLES)):
        left = margin + i * (panel_size + margin)
        _draw_centered(draw, title, left + panel_size // 2, caption_h + 4, panel_size, title_font)
        figure.paste(_panel(image, (panel_size, panel_size)), (left, caption_h + title_h))
    return figure


OVERLAYS = contract.OVERLAYS


@dataclass(frozen=True)
class RenderOptions:
    """How pictures are drawn: ``equalize`` picks the equalized map for the heatmap (the figure shows
    both), ``placement`` is ``"crop"`` or ``"stretch"`` (see ``map_to_original``).

    ``overlay``: ``peaks`` (default) blends the min-max map scaled to its 99th percentile with opacity
    ``alpha * value`` (``alpha`` None: :data:`~gradmap.runtime.render.OVERLAY_ALPHA`), so that only
    where the map is high colours the picture; ``flat`` is the recipes' overlay, the heatmap's map
    at opacity ``alpha`` (None: 0.5) everywhere.
    """

    equalize: bool = True
    placement: str = contract.DEFAULT_PLACEMENT
    colormap: str = contract.DEFAULT_COLORMAP
    alpha: float | None = None
    overlay: str = contract.DEFAULT_OVERLAY

    def __post_init__(self) -> None:
        if self.overlay not in OVERLAYS:
            raise ValueError(f"unknown overlay {self.overlay!r}; choose one of {', '.join(OVERLAYS)}")

    @property
    def overlay_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return OVERLAY_ALPHA if self.overlay == "peaks" else 0.5


def overlay_values(saliency: "SaliencyMap", options: RenderOptions) -> np.ndarray:
    """The map an overlay draws, on the model's input grid (see :class:`RenderOptions`)."""
    if options.overlay == "peaks":
        return scale_to_percentile(saliency.saliency_map, OVERLAY_PERCENTILE)
    return saliency.equalized_map if options.equalize else saliency.saliency_map


def figure_caption(result: "ImageSaliency", saliency: "SaliencyMap") -> str:
    """The line above a figure's panels: the explained class and its probability."""
    probability = float(result.probabilities[saliency.target_index])
    return f"{saliency.target_label} ({saliency.target_index}): {probability:.1%}"


def render_outputs(result: "ImageSaliency", saliency: "SaliencyMap", formats: Iterable[str],
                   options: RenderOptions = RenderOptions(), caption: str = "") -> Iterator[tuple[str, Image.Image | np.ndarray]]:
    """What ``gradmap run`` writes for one map of one picture in ``formats``, drawn one output at a
    time (so that one full-size picture is held at once): ``(kind, output)`` pairs, a PIL image for
    ``heatmap``, ``overlay`` and ``figure``, float32 arrays on the model's input grid for ``npy``:
    the attribution [3, h, w] ([1, h, w] for a class activation map) under the method's kind
    (``gradient``, ``attribution`` or ``cam``, from the method table) and the min-max normalized map
    [h, w] before equalization (``map``).

    Raises:
        ValueError: an unknown format, or a picture that failed (nothing to draw), before anything is drawn.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in contract.OUTPUT_FORMATS]
    if unknown:
        raise ValueError(f"unknown output format {', '.join(unknown)}; choose from {', '.join(contract.OUTPUT_FORMATS)}")
    if result.picture is None or result.geometry is None:
        raise ValueError(f"{result.source}: nothing to write (the picture failed: {result.error})")
    return _render(result, saliency, formats, options, caption)


def _render(result: "ImageSaliency", saliency: "SaliencyMap", formats: list[str], options: RenderOptions,
            caption: str) -> Iterator[tuple[str, Image.Image | np.ndarray]]:
    shown = saliency.equalized_map if options.equalize else saliency.saliency_map
    shown_values, covered = map_to_original(shown, result.geometry, options.placement)
    mask = None if options.placement == "stretch" else covered
    weighted = options.overlay == "peaks"
    if {"overlay", "figure"} & set(formats):
        overlaid, _ = map_to_original(overlay_values(saliency, options), result.geometry, options.placement)
    for kind in formats:
        if kind == "heatmap":
            yield "heatmap", render_heatmap(shown_values, mask, options.colormap)
        elif kind == "overlay":
            yield "overlay", render_overlay(result.picture, overlaid, mask, options.colormap, options.overlay_alpha,
                                            weighted=weighted)
        elif kind == "figure":
            raw, _ = map_to_original(saliency.saliency_map, result.geometry, options.placement)
            equalized, _ = map_to_original(saliency.equalized_map, result.geometry, options.placement)
            yield "figure", render_figure(result.picture, raw, equalized, overlaid, mask, caption=caption,
                                          colormap=options.colormap, alpha=options.overlay_alpha, weighted=weighted)
        elif kind == "npy":
            yield contract.method(saliency.method).kind, np.asarray(saliency.attribution, dtype=np.float32)
            yield "map", np.asarray(saliency.saliency_map, dtype=np.float32)
