"""The bundled demo: a small CNN trained on synthetic pictures of shapes among clutter, its pictures,
object masks and evaluation set (models/README.md).

They ship inside the package as ``gradmap.demo_assets`` (package data, see pyproject.toml) and live
in ``models/demo`` in a checkout; :func:`demo_assets` finds them in either place, so that ``gradmap
demo``, ``gradmap web`` without a model, the tools and the tests work offline after any install.

    from gradmap.demo import demo_assets, demo_model, demo_pictures
    model = SaliencyModel(str(demo_model()))
    for picture in demo_pictures():
        ...

Standard library only: importing it starts nothing.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from importlib.resources.abc import Traversable

__all__ = ["FIGURE_SETTINGS", "demo_assets", "demo_model", "demo_pictures", "tuned_settings"]

#: Method settings of ``gradmap demo``'s comparison figures: fewer noisy copies and path points than
#: ``gradmap run``'s defaults, so that every method's panel takes a moment.
FIGURE_SETTINGS = {"samples": 25, "steps": 16}


def demo_assets() -> "Traversable":
    """The bundled demo model and pictures: installed package data, or models/demo in a checkout."""
    try:
        assets = resources.files("gradmap.demo_assets")
        if assets.joinpath("shapes.onnx").is_file():
            return assets
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "models" / "demo"


def demo_model() -> "Traversable":
    """The demo classifier, ``shapes.onnx`` (it may be missing from a checkout that has not run
    ``python models/make_demo.py``: check ``is_file()``)."""
    return demo_assets().joinpath("shapes.onnx")


def demo_pictures() -> "list[Traversable]":
    """The demo's pictures (``images/*.png``), by name."""
    return sorted((p for p in demo_assets().joinpath("images").iterdir() if p.name.endswith(".png")),
                  key=lambda p: p.name)


def tuned_settings() -> dict[str, Any]:
    """Method settings chosen for the demo model: SmoothGrad's noise level that
    ``models/evaluate_demo.py`` selected on validation images (``quality.json``), when recorded."""
    quality = demo_assets().joinpath("quality.json")
    if not quality.is_file():
        return {}
    selection = json.loads(quality.read_text()).get("smoothgrad_noise_selection", {})
    return {"noise": selection["noise"]} if "noise" in selection else {}
