"""Exceptions of gradmap's runtime. Each says which file it is about and why."""

from __future__ import annotations

import os

__all__ = ["GradmapModelError", "ImageLoadError", "NonFiniteGradientError", "TargetError", "detached"]


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


def detached(error: BaseException) -> BaseException:
    """``error``, and the errors it was raised from, without their tracebacks: the form of an error
    kept as a value (``ImageSaliency.error``, a server's per-picture result).

    A kept traceback holds the frames the error passed through. The frame that caught it holds the
    result it was stored on, so the two form a reference cycle, and the frames below it (Python 3.11
    links a finished frame to its caller's) hold the partly decoded picture (PIL's ``ImageFile.load``
    and ``open_picture`` keep the image in their locals): a truncated 12-megapixel JPEG's 36 MB,
    freed only when the cyclic garbage collector runs. Without the tracebacks the error is freed
    with its result. Its message, and the type and message of each cause, stay.
    """
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]
    return error
