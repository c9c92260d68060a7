"""gradmap: gradient saliency maps for image classifiers, exported once, run without PyTorch."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
