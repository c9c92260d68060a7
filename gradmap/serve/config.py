"""What ``gradmap serve`` serves and the limits it keeps; every default is documented in docs/serve.md."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from PIL import Image

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "IMAGE_FORMATS", "Limits", "ServeConfig", "model_names"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
#: Picture formats a request may send (PIL's names): decoding nothing else keeps PIL's other,
#: rarely used decoders out of reach of untrusted bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Limits:
    """The server's limits. A request over one gets a 4xx (or 503) JSON error naming the limit.

    Attributes:
        max_body_bytes: largest request body; refused (413) from its Content-Length, or as soon as
            more arrives, before it is read whole.
        max_pixels: largest picture, width x height, checked from its header before decoding (413):
            the runtime's decompression-bomb limit (PIL's ``Image.MAX_IMAGE_PIXELS``) by default.
        request_timeout: seconds from a request's arrival to its answer (504 after).
        read_timeout: seconds for a request's headers and body to arrive (slow clients: 408).
        max_batch: most pictures in one model run (1: no dynamic batching).
        max_wait: seconds the first picture of a batch waits for others to join.
        max_queue: most pictures admitted and not yet answered, over all models; more get 503
            with ``Retry-After``.
        max_instances: most pictures in one request.
        max_top: largest K of a ``topK`` target.
        max_passes: most model runs one picture may take (``gradmap.runtime.methods.model_runs``:
            SmoothGrad's ``samples``, a path's ``steps``, RISE's ``masks``, occlusion's windows,
            Score-CAM's channels); more is refused (400) before any work.
        max_connections: most open connections per process (uvicorn's limit; 503 above).
        image_formats: accepted picture formats (PIL names).
        retry_after: seconds a 503 asks the client to wait.
    """

    max_body_bytes: int = 20 * 2**20
    max_pixels: int = int(Image.MAX_IMAGE_PIXELS or 0)
    request_timeout: float = 30.0
    read_timeout: float = 10.0
    max_batch: int = 8
    max_wait: float = 0.005
    max_queue: int = 64
    max_instances: int = 16
    max_top: int = 10
    max_passes: int = 256
    max_connections: int = 128
    image_formats: tuple[str, ...] = IMAGE_FORMATS
    retry_after: int = 1

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_pixels", "max_batch", "max_queue", "max_instances", "max_top",
                     "max_passes", "max_connections", "retry_after"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout", "read_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {self.max_wait}")
        formats = tuple(f.upper() for f in self.image_formats)
        unknown = [f for f in formats if f not in Image.registered_extensions().values()]
        if unknown or not formats:
            raise ValueError(f"image formats {', '.join(unknown) or '(none)'} are not PIL formats")
        object.__setattr__(self, "image_formats", formats)


@dataclass(frozen=True)
class ServeConfig:
    """The models to serve (name -> ``.onnx`` path) and how.

    Attributes:
        models: model name (as in ``/v2/models/NAME``) to the file ``gradmap export`` wrote.
        limits: see :class:`Limits`.
        provider, threads: onnxruntime's provider and intra-op threads per model (see
            :class:`~gradmap.runtime.SaliencyModel`).
        warmup: run each model once on a blank picture at startup, so that the first request does
            not pay onnxruntime's first-run allocations.
    """

    models: dict[str, str]
    limits: Limits = field(default_factory=Limits)
    provider: str = "cpu"
    threads: int | None = None
    warmup: bool = True

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no model to serve")
        for name in self.models:
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(f"model name {name!r}: use letters, digits, '_', '.' and '-' (it goes in URLs)")


def model_names(paths: list[str], names: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Name each model: its file stem (``resnet18.onnx`` -> ``resnet18``), or the given ``names`` in order.

    Raises:
        ValueError: more names than models, or two models with one name.
    """
    if len(names) > len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} models")
    chosen = list(names) + [os.path.basename(p).split(".onnx")[0] or os.path.basename(p) for p in paths[len(names):]]
    models: dict[str, str] = {}
    for name, path in zip(chosen, paths):
        if name in models:
            raise ValueError(f"two models are named {name!r} ({models[name]} and {path}): give --name for each")
        models[name] = path
    return models
