"""The ASGI app of ``gradmap serve``: KServe V1, the Open Inference Protocol and a plain endpoint.

    GET  /v2/health/live, /v2/health/ready          Open Inference Protocol health
    GET  /v2, /v2/models/NAME, /v2/models/NAME/ready  server and model metadata
    POST /v2/models/NAME/infer                      pictures as a BYTES tensor -> maps as FP32 tensors
    GET  /v1/models/NAME                            KServe V1 model status
    POST /v1/models/NAME:predict                    {"instances": [{"image": {"b64": ...}}]} -> classes
    POST /v1/models/NAME:explain                    the same -> {"explanations": [...]}
    POST /explain/NAME                              a picture as the body -> JSON, or the overlay PNG
    GET  /metrics                                   Prometheus

docs/serve.md gives every request and response shape. Model runs happen on each model's thread
(:mod:`gradmap.serve._batching`), decoding JSON and drawing pictures on worker threads: the event
loop only moves bytes. Nothing is read from or written to disk per request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, Sequence
from urllib.parse import quote

import anyio.to_thread
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Route

from gradmap import __version__
from gradmap.runtime import (EncodedPicture, GradmapModelError, ImageLoadError, ImageSaliency, SaliencyMap,
                             SaliencyModel, iter_saliency, open_picture, preprocess)
from gradmap.runtime.errors import NonFiniteGradientError, detached
from gradmap.runtime.io import png_bytes
from gradmap.runtime.model import before_run
from gradmap.runtime.jobs import TOP_PREDICTIONS
from gradmap.runtime.postprocess import top_k
from gradmap.runtime.render import RenderOptions, figure_caption, render_outputs
from gradmap.serve._batching import BatchAbandoned, DynamicBatcher, QueueFull, batch_abandoned
from gradmap.serve._metrics import CONTENT_TYPE_LATEST, Metrics
from gradmap.serve._settings import (ARRAY_OUTPUTS, PICTURE_OUTPUTS, PREDICT, BatchKey, BadRequest, ResponseOptions,
                                     over_max_passes, read_settings)
from gradmap.serve.config import MODEL_NAME, ServeConfig

__all__ = ["Served", "create_app"]

logger = logging.getLogger(__name__)

#: Open Inference Protocol output names and what each holds (see docs/serve.md).
V2_OUTPUTS = {"saliency_map": "map", "equalized_map": "equalized", "attribution": "attribution",
              "heatmap": "heatmap", "overlay": "overlay", "figure": "figure"}
V2_ALWAYS = ("target_index", "predictions")
V2_DEFAULT = ("saliency_map", "target_index", "predictions")


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


@dataclass
class Served:
    """One loaded model and its batcher."""

    name: str
    model: SaliencyModel
    batcher: DynamicBatcher


def _predict_batch(model: SaliencyModel, pictures: Sequence[EncodedPicture]) -> list[Any]:
    """Top classes of each picture, decoded and preprocessed as ``gradmap run`` does."""
    tensors, results = [], []
    for picture in pictures:
        try:
            image, _ = open_picture(picture.path, picture.data)
            tensors.append(preprocess(image, model.metadata.preprocessing)[0])
            results.append(None)
        except ImageLoadError as e:  # a value, without the traceback that would hold the picture
            results.append(detached(e))
    if tensors:
        probabilities = iter(model.probabilities(np.stack(tensors)))
        results = [r if r is not None else next(probabilities) for r in results]
    return results


def _stop_when_abandoned(abandoned: threading.Event | None) -> Callable[[], None]:
    """The check before each onnxruntime run of a batch: stop once nobody waits for its results (a
    RISE or occlusion request that timed out must not hold the model for minutes)."""
    runs = [0]

    def check() -> None:
        if abandoned is not None and abandoned.is_set():
            raise BatchAbandoned(f"every request in it was given up (timed out or disconnected), after "
                                 f"{runs[0]} model runs")
        runs[0] += 1

    return check


def _explain_batch(model: SaliencyModel, key: BatchKey, pictures: Sequence[EncodedPicture]) -> list[Any]:
    """One model run for all ``pictures`` (one batch of :func:`~gradmap.runtime.iter_saliency`)."""
    results = list(iter_saliency(model, pictures, target=key.target, reduce=key.reduce, clip=key.clip,
                                 no_crop=key.no_crop, batch_size=len(pictures), method=key.method))
    return [r.error if r.error is not None else r for r in results]  # errors come detached (errors.detached)


def _classes(model: SaliencyModel, probabilities: np.ndarray, k: int = TOP_PREDICTIONS) -> list[dict]:
    labels = model.labels
    return [{"index": int(i), "label": labels[i], "probability": float(probabilities[i])}
            for i in top_k(probabilities, min(k, len(probabilities)))]


def _array(values: np.ndarray) -> dict:
    """A float32 array as base64 of its little-endian bytes, with dtype and shape."""
    values = np.ascontiguousarray(values, dtype="<f4")
    return {"b64": base64.b64encode(values.tobytes()).decode("ascii"), "dtype": "float32",
            "shape": list(values.shape)}


def _map_arrays(result: ImageSaliency) -> dict[str, list[np.ndarray]]:
    return {"map": [m.saliency_map for m in result.maps], "equalized": [m.equalized_map for m in result.maps],
            "attribution": [m.attribution for m in result.maps]}


def _pngs(result: ImageSaliency, saliency: SaliencyMap, kinds: Sequence[str],
          render: RenderOptions) -> Iterator[tuple[str, bytes]]:
    """The pictures among ``kinds`` of one map as PNG bytes: drawn by the step that draws what
    ``gradmap run`` writes (:func:`~gradmap.runtime.render.render_outputs`, the same caption), encoded
    as :func:`~gradmap.runtime.io.save_png` encodes, one full-size picture held at a time."""
    pictures = [kind for kind in kinds if kind in PICTURE_OUTPUTS]
    if pictures:
        for kind, picture in render_outputs(result, saliency, pictures, render, figure_caption(result, saliency)):
            yield kind, png_bytes(picture)


def explanation(result: ImageSaliency, options: ResponseOptions) -> dict:
    """One picture's explanation as JSON: its top classes and, per map, the outputs asked for."""
    doc = {"predictions": [{"index": p.index, "label": p.label, "probability": p.probability}
                           for p in result.predictions(TOP_PREDICTIONS)], "maps": [], "notes": list(result.notes)}
    for saliency in result.maps:
        entry: dict[str, Any] = {
            "rank": saliency.rank, "method": saliency.method,
            "target": {"index": saliency.target_index, "label": saliency.target_label,
                       "probability": float(result.probabilities[saliency.target_index])},
            "completeness_gap": saliency.completeness_gap}
        arrays = {"map": saliency.saliency_map, "equalized": saliency.equalized_map,
                  "attribution": saliency.attribution}
        for name in options.outputs:
            if name in ARRAY_OUTPUTS:
                entry[name] = _array(arrays[name])
        for kind, png in _pngs(result, saliency, options.outputs, options.render):
            entry[kind] = {"b64": base64.b64encode(png).decode("ascii"), "content_type": "image/png"}
        doc["maps"].append(entry)
    return doc


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


class _JSONBytes(Response):
    media_type = "application/json"


class GradmapApp:
    """The handlers and the state they share (models, limits, metrics, admission count)."""

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = metrics or Metrics()
        self.served: dict[str, Served] = {}
        self.admitted = 0
        self.ready = False

    # -- lifecycle -----------------------------------------------------------------------------------
    def load(self) -> None:
        """Load every model (the server does not answer ready before this is done)."""
        Image.MAX_IMAGE_PIXELS = self.limits.max_pixels  # the runtime's decompression-bomb limit, per process
        for name, path in self.config.models.items():
            model = SaliencyModel(path, provider=self.config.provider, threads=self.config.threads)
            if self.config.warmup:
                blank = np.zeros((1, 3, *model.input_size), np.float32)
                model.run_outputs(blank, None, model.metadata.outputs)  # a forward-only model has no gradient
                model.probabilities(blank)  # predict's forward part is cut out now, not on a request

            def run(key: BatchKey, items: Sequence[EncodedPicture], model: SaliencyModel = model) -> list[Any]:
                token = before_run.set(_stop_when_abandoned(batch_abandoned.get()))
                try:
                    return _predict_batch(model, items) if key.kind == PREDICT else _explain_batch(model, key, items)
                finally:
                    before_run.reset(token)

            def on_batch(key: BatchKey, size: int, seconds: float, name: str = name) -> None:
                self.metrics.batch_size.labels(name).observe(size)
                self.metrics.batch_seconds.labels(name).observe(seconds)

            self.served[name] = Served(name, model, DynamicBatcher(run, name, max_batch=self.limits.max_batch,
                                                                   max_wait=self.limits.max_wait, on_batch=on_batch))
            logger.info("model %s: %s (%s)", name, path, ", ".join(model.metadata.methods))
            for method, reason in over_max_passes(model, self.limits.max_passes).items():
                logger.warning("model %s: a %s request at default settings will be refused: %s", name, method, reason)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        if not self.served:
            await anyio.to_thread.run_sync(self.load)
        for served in self.served.values():
            served.batcher.start()
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            for served in self.served.values():
                await served.batcher.stop()

    # -- shared steps --------------------------------------------------------------------------------
    def _model(self, request: Request) -> Served:
        name = request.path_params["name"]
        served = self.served.get(name)
        if served is None:
            raise BadRequest(f"no model named {name!r}; this server has {', '.join(self.served)}", 404)
        return served

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) once it passes the limit and abandoned (408) when it is slow;
        not read at all when the queue is full already (503)."""
        if self.admitted >= self.limits.max_queue:
            raise QueueFull()
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise BadRequest(f"Content-Length {length!r} is not a number")
            if int(length) > limit:
                raise BadRequest(f"the body is {int(length):,} bytes, over this server's limit of {limit:,} "
                                 "(--max-body-mb)", 413)
        chunks, size = [], 0

        async def receive() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(f"the body is over this server's limit of {limit:,} bytes (--max-body-mb)", 413)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive(), self.limits.read_timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"the request body did not arrive within {self.limits.read_timeout:g} s "
                             "(--read-timeout)", 408) from None
        except ClientDisconnect:
            raise BadRequest("the client closed the connection before sending the whole body", 400) from None
        return b"".join(chunks)

    async def _json(self, request: Request) -> dict:
        body = await self._body(request)
        if not body:
            raise BadRequest("the body is empty; send a JSON document")

        def parse() -> Any:
            try:
                return json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadRequest(f"the body is not valid JSON: {e}") from None
            except RecursionError:
                raise BadRequest("the body is not valid JSON: nested too deeply") from None

        doc = await anyio.to_thread.run_sync(parse) if len(body) > 65536 else parse()
        if not isinstance(doc, dict):
            raise BadRequest(f"the body must be a JSON object, not {type(doc).__name__}")
        return doc

    def _check_picture(self, data: bytes, where: str) -> EncodedPicture:
        """Refuse what is not a picture of an accepted format, or too many pixels, from its header."""
        if not data:
            raise BadRequest(f"{where}: empty picture", 422)
        formats = self.limits.image_formats
        try:
            with Image.open(io.BytesIO(data), formats=list(formats)) as opened:
                width, height = opened.size
        except Image.UnidentifiedImageError:
            raise BadRequest(f"{where}: not a picture in an accepted format ({', '.join(formats)})", 415) from None
        except Image.DecompressionBombError:
            width = height = math.inf
        except Exception as e:  # a header PIL recognizes but cannot parse
            raise BadRequest(f"{where}: cannot read the picture's header: {e}", 422) from None
        if width * height > self.limits.max_pixels:
            size = "more pixels" if width == math.inf else f"{width}x{height} = {width * height:,} pixels"
            raise BadRequest(f"{where}: refused as a possible decompression bomb: {size}, over this server's limit "
                             f"of {self.limits.max_pixels:,} (--max-pixels)", 413)
        return EncodedPicture(where, data)

    def _decode_instances(self, pictures: Sequence[Any], where: Callable[[int], str]) -> list[EncodedPicture]:
        """base64 strings -> checked pictures (runs on a worker thread)."""
        checked = []
        for i, text in enumerate(pictures):
            if not isinstance(text, str):
                raise BadRequest(f"{where(i)}: expected a base64 string, got {type(text).__name__}")
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as e:
                raise BadRequest(f"{where(i)}: not valid base64 ({e})") from None
            checked.append(self._check_picture(data, where(i)))
        return checked

    async def _run(self, served: Served, key: BatchKey, pictures: list[EncodedPicture]) -> list[Any]:
        """Admit the pictures (503 when the queue is full) and wait for their results."""
        n = len(pictures)
        if self.admitted + n > self.limits.max_queue:
            raise QueueFull()
        self.admitted += n
        gauge = self.metrics.queue_depth.labels(served.name)
        try:
            tasks = [asyncio.ensure_future(served.batcher.submit(key, p)) for p in pictures]
            gauge.set(served.batcher.waiting)
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        finally:
            self.admitted -= n
            gauge.set(served.batcher.waiting)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is None:
            return results
        # new exceptions, raised outside any except block: nothing chains back to these frames
        if isinstance(failed, ImageLoadError):
            raise BadRequest(str(failed), 413 if "decompression bomb" in failed.reason else 422)
        if isinstance(failed, NonFiniteGradientError):
            raise BadRequest(f"the model's output holds NaN or Inf for this picture: {failed}", 422)
        raise RuntimeError(f"the model failed: {type(failed).__name__}: {failed}")

    async def _settings(self, served: Served, params: Any, kind: str = "explain") -> tuple[BatchKey, ResponseOptions]:
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise BadRequest(f"'parameters' must be a JSON object, not {type(params).__name__}")
        return read_settings(params, served.name, served.model.metadata, max_top=self.limits.max_top,
                             max_passes=self.limits.max_passes, kind=kind, model=served.model)

    def _instances(self, doc: dict) -> list[str]:
        instances = doc.get("instances")
        if not isinstance(instances, list) or not instances:
            raise BadRequest("the body needs \"instances\": a non-empty list of {\"image\": {\"b64\": \"...\"}}")
        if len(instances) > self.limits.max_instances:
            raise BadRequest(f"{len(instances)} instances; this server takes at most {self.limits.max_instances} "
                             "per request (--max-instances)", 413)
        extra = sorted(set(doc) - {"instances", "parameters"})
        if extra:
            raise BadRequest(f"unknown key {', '.join(map(repr, extra))}; a V1 request has \"instances\" and "
                             "\"parameters\"")
        texts = []
        for i, instance in enumerate(instances):
            image = instance.get("image") if isinstance(instance, dict) else None
            if not isinstance(image, dict) or not isinstance(image.get("b64"), str):
                raise BadRequest(f"instances[{i}] must be {{\"image\": {{\"b64\": \"<base64 picture>\"}}}}")
            texts.append(image["b64"])
        return texts

    # -- endpoints -----------------------------------------------------------------------------------
    async def v1_model(self, request: Request) -> Response:
        served = self._model(request)
        return JSONResponse({"name": served.name, "ready": self.ready})

    async def v1_predict(self, request: Request) -> Response:
        served = self._model(request)
        doc = await self._json(request)
        key, _ = await self._settings(served, doc.get("parameters"), PREDICT)
        texts = self._instances(doc)
        pictures = await anyio.to_thread.run_sync(self._decode_instances, texts, lambda i: f"instances[{i}]")
        results = await self._run(served, key, pictures)
        return JSONResponse({"predictions": [{"predictions": _classes(served.model, p)} for p in results]})

    async def v1_explain(self, request: Request) -> Response:
        served = self._model(request)
        doc = await self._json(request)
        key, options = await self._settings(served, doc.get("parameters"))
        texts = self._instances(doc)
        pictures = await anyio.to_thread.run_sync(self._decode_instances, texts, lambda i: f"instances[{i}]")
        results = await self._run(served, key, pictures)
        body = await anyio.to_thread.run_sync(
            lambda: _dumps({"explanations": [explanation(r, options) for r in results]}))
        return _JSONBytes(body)

    async def plain_explain(self, request: Request) -> Response:
        served = self._model(request)
        params = dict(request.query_params)
        accept = request.headers.get("accept", "")
        as_png = "image/png" in accept and "application/json" not in accept
        if as_png:
            params.setdefault("format", "overlay")
        key, options = await self._settings(served, params)
        if as_png and (len(options.outputs) != 1 or options.outputs[0] in ARRAY_OUTPUTS or key.target.count != 1):
            raise BadRequest("an image/png answer holds one picture of one map: give format=heatmap, overlay or "
                             "figure and a single target, or ask for application/json", 406)
        body = await self._body(request)
        picture = await anyio.to_thread.run_sync(self._check_picture, body, "body")
        (result,) = await self._run(served, key, [picture])
        if as_png:
            saliency = result.maps[0]

            def draw() -> bytes:
                ((_, png),) = _pngs(result, saliency, options.outputs, options.render)
                return png

            png = await anyio.to_thread.run_sync(draw)
            probability = float(result.probabilities[saliency.target_index])
            return Response(png, media_type="image/png", headers={
                "X-Gradmap-Class-Index": str(saliency.target_index),
                "X-Gradmap-Class-Label": quote(saliency.target_label),
                "X-Gradmap-Class-Probability": repr(probability)})
        return _JSONBytes(await anyio.to_thread.run_sync(lambda: _dumps(explanation(result, options))))

    async def v2_server(self, request: Request) -> Response:
        return JSONResponse({"name": "gradmap", "version": __version__, "extensions": []})

    async def v2_live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def v2_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def v2_model_ready(self, request: Request) -> Response:
        self._model(request)
        return JSONResponse({"name": request.path_params["name"], "ready": self.ready},
                            status_code=200 if self.ready else 503)

    async def v2_model(self, request: Request) -> Response:
        served = self._model(request)
        meta = served.model.metadata
        h, w = served.model.input_size
        shapes = {"saliency_map": [-1, -1, h, w], "equalized_map": [-1, -1, h, w],
                  "attribution": [-1, -1, -1, h, w], "heatmap": [-1, -1], "overlay": [-1, -1], "figure": [-1, -1]}
        outputs = [{"name": name, "datatype": "FP32" if V2_OUTPUTS[name] in ARRAY_OUTPUTS else "BYTES",
                    "shape": shapes[name]} for name in V2_OUTPUTS]
        outputs += [{"name": "target_index", "datatype": "INT64", "shape": [-1, -1]},
                    {"name": "predictions", "datatype": "BYTES", "shape": [-1]}]
        return JSONResponse({
            "name": served.name, "versions": [], "platform": "gradmap",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}], "outputs": outputs,
            "parameters": {"source_model": meta.source_model, "methods": list(meta.methods),
                           "input_size": [h, w], "classes": meta.num_classes, "score": meta.score,
                           "max_passes": self.limits.max_passes,
                           "refused_at_default_settings": over_max_passes(served.model, self.limits.max_passes)}})

    async def v2_infer(self, request: Request) -> Response:
        served = self._model(request)
        doc = await self._json(request)
        extra = sorted(set(doc) - {"id", "parameters", "inputs", "outputs"})
        if extra:
            raise BadRequest(f"unknown key {', '.join(map(repr, extra))}; an inference request has \"id\", "
                             "\"parameters\", \"inputs\" and \"outputs\"")
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("'parameters' must be a JSON object")
        if "format" in params:
            raise BadRequest("parameter 'format' is for V1 and /explain; an inference request names its "
                             f"\"outputs\" ({', '.join(list(V2_OUTPUTS) + list(V2_ALWAYS))})")
        wanted = doc.get("outputs")
        if wanted is None:
            names = list(V2_DEFAULT)
        else:
            if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                       for o in wanted):
                raise BadRequest("\"outputs\" must be a list of {\"name\": \"...\"}")
            names = [o["name"] for o in wanted]
            unknown = [n for n in names if n not in V2_OUTPUTS and n not in V2_ALWAYS]
            if unknown:
                raise BadRequest(f"unknown output {', '.join(map(repr, unknown))}; choose among "
                                 f"{', '.join(list(V2_OUTPUTS) + list(V2_ALWAYS))}")
        formats = [V2_OUTPUTS[n] for n in names if n in V2_OUTPUTS] or ["map"]
        key, options = await self._settings(served, {**params, "format": ",".join(formats)})
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise BadRequest("\"inputs\" must hold one tensor: {\"name\": \"image\", \"datatype\": \"BYTES\", "
                             "\"shape\": [N], \"data\": [\"<base64 picture>\", ...]}")
        tensor = inputs[0]
        if tensor.get("name") != "image" or tensor.get("datatype") != "BYTES":
            raise BadRequest(f"input {tensor.get('name')!r} of datatype {tensor.get('datatype')!r}: the model takes "
                             "one input \"image\" of datatype BYTES")
        data = tensor.get("data")
        if not isinstance(data, list) or not data:
            raise BadRequest("input \"image\" needs \"data\": a non-empty list of base64 pictures")
        shape = tensor.get("shape")
        if shape not in ([len(data)], [len(data), 1]):
            raise BadRequest(f"input \"image\" has shape {shape!r} but {len(data)} data elements; use [{len(data)}]")
        if len(data) > self.limits.max_instances:
            raise BadRequest(f"{len(data)} pictures; this server takes at most {self.limits.max_instances} per "
                             "request (--max-instances)", 413)
        pictures = await anyio.to_thread.run_sync(self._decode_instances, data, lambda i: f"image[{i}]")
        results = await self._run(served, key, pictures)

        def build() -> bytes:
            n, k = len(results), key.target.count
            arrays = [_map_arrays(r) for r in results]
            out = []
            for name in names:
                if name in V2_OUTPUTS and V2_OUTPUTS[name] in ARRAY_OUTPUTS:
                    stacked = np.stack([np.stack(arrays[i][V2_OUTPUTS[name]]) for i in range(n)]).astype(np.float32)
                    out.append({"name": name, "datatype": "FP32", "shape": list(stacked.shape),
                                "data": stacked.ravel().tolist()})
                elif name in V2_OUTPUTS:
                    kind = V2_OUTPUTS[name]
                    pngs = [base64.b64encode(png).decode("ascii")
                            for r in results for m in r.maps for _, png in _pngs(r, m, [kind], options.render)]
                    out.append({"name": name, "datatype": "BYTES", "shape": [n, k], "data": pngs,
                                "parameters": {"content_type": "image/png", "encoding": "base64"}})
                elif name == "target_index":
                    out.append({"name": name, "datatype": "INT64", "shape": [n, k],
                                "data": [m.target_index for r in results for m in r.maps]})
                else:
                    out.append({"name": name, "datatype": "BYTES", "shape": [n],
                                "data": [json.dumps({"predictions": explanation(r, ResponseOptions(()))["predictions"],
                                                     "maps": [{"rank": m.rank, "method": m.method,
                                                               "target": {"index": m.target_index,
                                                                          "label": m.target_label,
                                                                          "probability": float(r.probabilities[m.target_index])},
                                                               "completeness_gap": m.completeness_gap}
                                                              for m in r.maps]}) for r in results],
                                "parameters": {"content_type": "application/json"}})
            response = {"model_name": served.name, "outputs": out,
                        "parameters": {"method": key.method.name}}
            if "id" in doc:
                response["id"] = doc["id"]
            return _dumps(response)

        return _JSONBytes(await anyio.to_thread.run_sync(build))

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # -- the wrapper every endpoint goes through -----------------------------------------------------
    def endpoint(self, name: str, handler: Callable[[Request], Awaitable[Response]]):
        async def answer(request: Request) -> Response:
            started = time.monotonic()
            model = request.path_params.get("name")
            model = model if model in self.served else ("-" if model is None else "unknown")
            reason = None

            async def handle() -> Response:
                # Errors become responses here, inside the task wait_for runs: an exception leaving
                # that task would tie it, its traceback and every frame (a request's bytes and
                # results) in a reference cycle, freed only by the cyclic garbage collector.
                nonlocal reason
                try:
                    return await handler(request)
                except BadRequest as e:
                    reason = f"http_{e.status}"
                    return _error(e.status, e.reason)
                except QueueFull:
                    reason = "queue_full"
                    return _error(503, f"the server is busy: {self.limits.max_queue} pictures are queued "
                                       "(--max-queue); retry later", {"Retry-After": str(self.limits.retry_after)})
                except Exception as e:  # a defect or a model failure: said, logged, and the server goes on
                    logger.exception("%s %s failed", request.method, request.url.path)
                    reason = "internal"
                    return _error(500, f"internal error: {type(e).__name__}: {e}")

            try:
                response = await asyncio.wait_for(handle(), self.limits.request_timeout)
            except asyncio.TimeoutError:
                response = _error(504, f"the request took longer than {self.limits.request_timeout:g} s "
                                       "(--request-timeout)")
                reason = "timeout"
            self.metrics.requests.labels(name, model, str(response.status_code)).inc()
            self.metrics.latency.labels(name).observe(time.monotonic() - started)
            if reason is not None:
                self.metrics.failures.labels(reason).inc()
            return response

        return answer


class _ModelName(Convertor):
    """A model name in a path: what :class:`~gradmap.serve.config.ServeConfig` allows (no ':', so
    that ``/v1/models/NAME:explain`` is never read as a model named ``NAME:explain``)."""

    regex = MODEL_NAME.pattern

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model", _ModelName())


def create_app(config: ServeConfig, *, loaded: bool = False) -> Starlette:
    """The ASGI app serving ``config.models``.

    Models load in the app's lifespan startup (``loaded=True`` loads them now, e.g. to fail before a
    server starts). Run it with any ASGI server; ``gradmap serve`` runs it on uvicorn.

    Example:
        >>> app = create_app(ServeConfig({"resnet18": "resnet18.onnx"}))
        >>> uvicorn.run(app, host="127.0.0.1", port=8080)
    """
    state = GradmapApp(config)
    if loaded:
        state.load()
    e = state.endpoint
    routes = [
        Route("/v2", e("v2_server", state.v2_server), methods=["GET"]),
        Route("/v2/health/live", e("v2_live", state.v2_live), methods=["GET"]),
        Route("/v2/health/ready", e("v2_ready", state.v2_ready), methods=["GET"]),
        Route("/v2/models/{name:model}", e("v2_model", state.v2_model), methods=["GET"]),
        Route("/v2/models/{name:model}/ready", e("v2_model_ready", state.v2_model_ready), methods=["GET"]),
        Route("/v2/models/{name:model}/infer", e("v2_infer", state.v2_infer), methods=["POST"]),
        Route("/v1/models/{name:model}:predict", e("v1_predict", state.v1_predict), methods=["POST"]),
        Route("/v1/models/{name:model}:explain", e("v1_explain", state.v1_explain), methods=["POST"]),
        Route("/v1/models/{name:model}", e("v1_model", state.v1_model), methods=["GET"]),
        Route("/explain/{name:model}", e("explain", state.plain_explain), methods=["POST"]),
        Route("/metrics", state.metrics_endpoint, methods=["GET"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no endpoint {request.method} {request.url.path}; see docs/serve.md")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return _error(405, f"{request.method} is not allowed on {request.url.path}")

    app = Starlette(routes=routes, lifespan=state.lifespan, exception_handlers={404: not_found, 405: not_allowed})
    app.state.gradmap = state
    return app
