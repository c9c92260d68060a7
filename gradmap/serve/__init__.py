"""``gradmap serve``: saliency maps over HTTP, in the protocols model servers speak (``pip install 'gradmap[serve]'``).

    from gradmap.serve import ServeConfig, create_app
    app = create_app(ServeConfig({"resnet18": "resnet18.onnx"}))   # any ASGI server runs it

Endpoints (docs/serve.md has every shape): KServe V1 ``/v1/models/NAME[:predict|:explain]``, the
Open Inference Protocol ``/v2/health/{live,ready}``, ``/v2/models/NAME[/infer]``, ``POST
/explain/NAME`` (a picture in, JSON or a PNG out) and Prometheus ``/metrics``. Requests for the same
model, method and settings share model runs (dynamic batching); every limit is in :class:`Limits`.
"""

from __future__ import annotations

from gradmap.serve.app import create_app
from gradmap.serve.config import DEFAULT_HOST, DEFAULT_PORT, IMAGE_FORMATS, Limits, ServeConfig, model_names

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "IMAGE_FORMATS", "Limits", "ServeConfig", "create_app", "model_names"]
