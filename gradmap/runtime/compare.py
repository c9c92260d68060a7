"""Side-by-side figures: one picture explained by several methods, each as an overlay."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from gradmap import contract
from gradmap.runtime.methods import MethodSpec
from gradmap.runtime.model import SaliencyModel
from gradmap.runtime.postprocess import scale_to_percentile
from gradmap.runtime.render import OVERLAY_ALPHA, OVERLAY_PERCENTILE, _draw_centered, _font, _panel, render_overlay
from gradmap.runtime.saliency import iter_saliency

__all__ = ["explain_with_methods", "render_comparison"]


def explain_with_methods(model: SaliencyModel, picture: Image.Image | str, methods: Sequence[MethodSpec], *,
                         target: str = "top1") -> tuple[Image.Image, list[tuple[str, np.ndarray, np.ndarray]], str]:
    """The overlay's map (min-max, scaled to its 99th percentile) of ``picture`` by each method,
    mapped onto the picture.

    Returns the RGB picture, (method, values, covered) per method, and a caption with the
    predicted label and probability.
    """
    panels = []
    caption = ""
    shown = None
    for spec in methods:
        (result,) = iter_saliency(model, [picture], target=target, method=spec, batch_size=1)
        if result.error is not None:
            raise result.error
        saliency = result.maps[0]
        values, covered = result.on_original(scale_to_percentile(saliency.saliency_map, OVERLAY_PERCENTILE))
        panels.append((spec.name, values, covered))
        shown = result.picture
        probability = float(result.probabilities[saliency.target_index])
        caption = f"{saliency.target_label}: {probability:.1%}"
    return shown, panels, caption


def render_comparison(picture: Image.Image, panels: Sequence[tuple[str, np.ndarray, np.ndarray]], *,
                      caption: str = "", colormap: str = contract.DEFAULT_COLORMAP, alpha: float = OVERLAY_ALPHA,
                      panel_size: int = 220) -> Image.Image:
    """The original and one overlay per method in a row (opacity ``alpha * value``), titled, with an
    optional caption."""
    images = [("original", picture.convert("RGB"))]
    images += [(name, render_overlay(picture, values, covered, colormap, alpha, weighted=True))
               for name, values, covered in panels]
    title_font, caption_font = _font(14), _font(16)
    margin, title_h, caption_h = 10, 22, 28 if caption else 0
    width = margin + len(images) * (panel_size + margin)
    figure = Image.new("RGB", (width, caption_h + title_h + panel_size + margin), "white")
    draw = ImageDraw.Draw(figure)
    if caption:
        _draw_centered(draw, caption, width // 2, 6, width - 2 * margin, caption_font)
    for i, (title, image) in enumerate(images):
        left = margin + i * (panel_size + margin)
        _draw_centered(draw, title, left + panel_size // 2, caption_h + 3, panel_size, title_font)
        figure.paste(_panel(image, (panel_size, panel_size)), (left, caption_h + title_h))
    return figure
