"""``gradmap web``: a static site that explains pictures in the browser with onnxruntime-web.

The site is ``index.html``, ``app.js`` (the page), ``gradmap.js`` (gradmap's preprocessing and
postprocessing in JavaScript, equal to :mod:`gradmap.runtime`), ``methods.js`` (the methods the
page computes, one function per row of the method table that names one), ``style.css``, the model,
and ``model.json``: what the page needs from the model's metadata (preprocessing, labels, input
size), from :mod:`gradmap.contract` (tensor names; the method table's rows of the methods the model
has and the page computes, with the page's setting defaults) and from the runtime (the colormap
table, the overlay settings). onnxruntime-web is either copied into ``ort/`` from a local ``dist/`` folder or
loaded from a public CDN at :data:`ORT_WEB_VERSION`.

Torch-free: needs the slim runtime only (the model is loaded once with onnxruntime to check it).
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from gradmap import contract

__all__ = ["ORT_WEB_VERSION", "ORT_CDN", "PAGE_FILES", "PAGE_SETTINGS", "SiteError", "build_site", "make_server",
           "page_method_table", "page_settings", "site_config"]

logger = logging.getLogger(__name__)

#: The onnxruntime-web release the page is written and tested against (tests/web/package.json).
ORT_WEB_VERSION = "1.31.1"
ORT_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
#: onnxruntime-web files per backend: the script and the WebAssembly build it loads.
ORT_FILES = {
    "wasm": ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
    "webgpu": ("ort.webgpu.min.js", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm"),
}
PAGE_FILES = ("index.html", "app.js", "gradmap.js", "methods.js", "style.css")
#: Pictures over this many pixels are refused, as PIL refuses decompression bombs in ``gradmap run``.
MAX_PIXELS = 89_478_485
#: The page's own setting defaults where they differ from the method table's: fewer noisy copies,
#: for a first map in a few seconds in the browser.
PAGE_SETTINGS = {"samples": 25}


class SiteError(ValueError):
    """The site cannot be built: the message names the input at fault and why."""


def _ort_version(dist: Path) -> str:
    package = dist.parent / "package.json"
    try:
        return str(json.loads(package.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "(local copy)"


def page_settings(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`PAGE_SETTINGS` with ``settings`` over them, each checked against the method table;
    :class:`SiteError` names a setting no method has or a wrong value."""
    merged = {**PAGE_SETTINGS, **(settings or {})}
    try:
        return {name: contract.SETTINGS[name].check(value) for name, value in merged.items()}
    except KeyError as e:
        raise SiteError(f"no method has a setting {e.args[0]!r}; the settings are {', '.join(contract.SETTINGS)}") from None
    except contract.MethodSettingError as e:
        raise SiteError(str(e)) from None


def page_method_table(methods: Sequence[str], settings: Mapping[str, Any]) -> list[dict]:
    """The method table's rows of ``methods`` (JSON, see :meth:`gradmap.contract.Method.to_dict`),
    their settings' defaults replaced by ``settings`` (the page's defaults)."""
    rows = []
    for name in methods:
        row = contract.method(name).to_dict()
        for setting in row["settings"]:
            setting["default"] = settings.get(setting["name"], setting["default"])
        rows.append(row)
    return rows


def site_config(model, *, model_file: str, ort_base: str, ort_version: str, examples: Sequence[str],
                settings: Mapping[str, Any] | None = None) -> dict:
    """model.json: everything the page reads, from the model's metadata and the runtime's tables.
    ``settings``: the page's method setting defaults over :data:`PAGE_SETTINGS`, by name."""
    from gradmap.runtime.colormaps import colormap_table
    from gradmap.runtime.render import OVERLAY_ALPHA, OVERLAY_PERCENTILE

    meta = model.metadata
    methods = [m for m in meta.methods if contract.method(m).web]
    colormap = contract.DEFAULT_COLORMAP
    table = (colormap_table(colormap) * 255).astype("uint8")
    return {
        "format": 1,
        "model": model_file,
        "source_model": meta.source_model,
        "weights": meta.weights,
        "target": getattr(meta, "target", "cpu"),  # absent in models written before the key: cpu
        "score": meta.score,
        "labels": list(meta.labels),
        "format_version": meta.format_version,  # the model's: the page refuses one newer than it implements
        "preprocessing": meta.preprocessing.to_dict(),
        "input_size": list(meta.preprocessing.crop),
        "fixed_batch": model.fixed_batch,
        "methods": methods,
        "default_method": contract.DEFAULT_METHOD,
        "method_table": page_method_table(methods, page_settings(settings)),
        "inputs": {"image": contract.INPUT_IMAGE, "target": contract.INPUT_TARGET},
        "outputs": {"logits": contract.OUTPUT_LOGITS, "target_index": contract.OUTPUT_TARGET_INDEX,
                    "gradient": contract.OUTPUT_GRADIENT, "gradient_guided": contract.OUTPUT_GRADIENT_GUIDED,
                    "gradient_deconvnet": contract.OUTPUT_GRADIENT_DECONVNET,
                    "cam_activation": contract.OUTPUT_CAM_ACTIVATION, "cam_gradient": contract.OUTPUT_CAM_GRADIENT},
        "gradient_outputs": list(contract.BACKPROP_OUTPUTS.values()),
        "colormap": {"name": colormap, "table": [int(v) for v in table.reshape(-1)]},
        "overlay": {"percentile": OVERLAY_PERCENTILE, "alpha": OVERLAY_ALPHA},
        "max_pixels": MAX_PIXELS,
        "examples": list(examples),
        "ort": {"base": ort_base, "version": ort_version,
                "wasm_script": ORT_FILES["wasm"][0],
                "webgpu_script": ORT_FILES["webgpu"][0] if getattr(meta, "target", "cpu") == "portable" else None},
    }


def build_site(model_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
               ort_dist: str | os.PathLike[str] | None = None, examples: Sequence[str | os.PathLike[str]] = (),
               settings: Mapping[str, Any] | None = None) -> dict:
    """Write the static site for ``model_path`` into ``out_dir`` and return its model.json.

    Args:
        model_path: a gradmap model (single file: the page fetches one file).
        out_dir: created if missing; the site's own files in it are replaced, nothing else is touched.
        ort_dist: a local copy of onnxruntime-web's ``dist/`` folder to copy into ``out_dir/ort``;
            ``None``: the page loads onnxruntime-web :data:`ORT_WEB_VERSION` from :data:`ORT_CDN`.
        examples: pictures copied into ``out_dir/examples`` and offered on the page.
        settings: method settings' defaults on the page, by name (e.g. ``{"noise": 0.1}``), over
            :data:`PAGE_SETTINGS` and the method table's defaults.

    Raises:
        SiteError: the model has external data, ``ort_dist`` lacks files, an example is missing, a
            setting is unknown or its value wrong.
        GradmapModelError: the model is not a valid gradmap model.
    """
    from gradmap.runtime import SaliencyModel
    from gradmap.runtime._onnx_header import read_external_data

    model_path = Path(model_path)
    page_settings(settings)  # wrong settings are refused before anything is written
    model = SaliencyModel(model_path, provider="cpu", threads=1, cpu_block="off")  # checked, not lowered: the page gets the file
    if read_external_data(str(model_path)):
        raise SiteError(f"{model_path}: the model keeps tensors in external data files; the page fetches one file, "
                        "so save it as a single .onnx (onnx.save with save_as_external_data=False, under 2 GB)")
    if not any(contract.method(m).web for m in model.metadata.methods):
        page = [m.name for m in contract.METHOD_TABLE if m.web]
        raise SiteError(f"{model_path}: the page computes none of the methods this model supports "
                        f"({', '.join(model.metadata.methods)}); it computes {', '.join(page)}"
                        + ("" if model.metadata.gradient else
                           f": export the model without {contract.NO_GRADIENT_OPTION}"))
    missing = [str(e) for e in examples if not Path(e).is_file()]
    if missing:
        raise SiteError(f"example pictures not found: {', '.join(missing)}")
    backends = ["wasm", "webgpu"] if getattr(model.metadata, "target", "cpu") == "portable" else ["wasm"]
    if ort_dist is not None:
        dist = Path(ort_dist)
        needed = [name for b in backends for name in ORT_FILES[b]]
        absent = [name for name in needed if not (dist / name).is_file()]
        if absent:
            raise SiteError(f"--ort-dist {dist}: not an onnxruntime-web dist folder, missing {', '.join(absent)} "
                            f"(npm install onnxruntime-web@{ORT_WEB_VERSION}; use node_modules/onnxruntime-web/dist)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = resources.files("gradmap.web")
    for name in PAGE_FILES:
        (out / name).write_bytes(page.joinpath(name).read_bytes())
    shutil.copyfile(model_path, out / "model.onnx")
    if ort_dist is not None:
        if (out / "ort").exists():
            shutil.rmtree(out / "ort")
        (out / "ort").mkdir()
        for name in dict.fromkeys(n for b in backends for n in ORT_FILES[b]):
            shutil.copyfile(dist / name, out / "ort" / name)
        ort_base, ort_version = "ort/", _ort_version(dist)
    else:
        ort_base, ort_version = ORT_CDN, ORT_WEB_VERSION
    if (out / "examples").exists():
        shutil.rmtree(out / "examples")
    names = []
    if examples:
        (out / "examples").mkdir()
        for example in examples:
            name = Path(example).name
            shutil.copyfile(example, out / "examples" / name)
            names.append(f"examples/{name}")
    config = site_config(model, model_file="model.onnx", ort_base=ort_base, ort_version=ort_version,
                         examples=names, settings=settings)
    (out / "model.json").write_text(json.dumps(config, indent=1) + "\n")
    return config


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with the cross-origin isolation headers that threaded WebAssembly needs."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".onnx": "application/octet-stream", ".json": "application/json"}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def make_server(directory: str | os.PathLike[str], port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for the site on 127.0.0.1 (``port`` 0: any free port); call ``serve_forever``."""
    handler = functools.partial(_Handler, directory=os.fspath(directory))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
