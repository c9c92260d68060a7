"""Exceptions of gradmap's runtime. Each says which file it is about and why."""

from __future__ import annotations

import os

__all__ = ["GradmapModelError", "ImageLoadError", "NonFiniteGradientError", "TargetError"]


class GradmapModelError(ValueError):
    """A file is not a usable gradmap model: missing, not ONNX, no gradmap metadata, wrong interface."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageLoadError(ValueError):
    """A picture could not be read or converted to RGB (empty, truncated, not an image...)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NonFiniteGradientError(ValueError):
    """The model returned NaN or Inf in a gradient; rendering it would silently show a black map."""


class TargetError(ValueError):
    """A target specification (class index, class name, topK) does not fit the model's labels."""
