"""onnxruntime-web in headless Chromium, driven by Playwright: one browser and one local server per
process, one page per run. The server binds 127.0.0.1 on a free port and sends the cross-origin
isolation headers (COOP/COEP) that WebAssembly threads need; it serves page.html, onnxruntime-web's
dist folder and the model files registered for the run, nothing else."""

from __future__ import annotations

import atexit
import os
import base64
import http.server
import itertools
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

from . import CHROMIUM, HERE, ORT_WEB_DIST, EngineError, EngineResult, _ORT_TO_NUMPY, _ort_dtype

CHROMIUM_ARGS = [
    "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--use-vulkan=swiftshader",
    "--enable-features=Vulkan", "--use-angle=swiftshader", "--no-sandbox",
]
#: Page script per backend: the plain WebAssembly build, or the WebGPU build (native WebGPU EP).
BUNDLES = {"wasm": "ort.wasm.min.js", "webgpu": "ort.webgpu.min.js"}
RUN_TIMEOUT_MS = int(float(os.environ.get("GRADMAP_ENGINE_TIMEOUT", "1800")) * 1000)


class _Handler(http.server.BaseHTTPRequestHandler):
    models: dict[str, Path] = {}

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = urllib.parse.urlparse(self.path).path
        if path == "/favicon.ico":
            self.send_response(204)
            self.end_headers()
            return
        if path == "/page.html":
            file = HERE / "page.html"
        elif path.startswith("/ort/"):
            file = ORT_WEB_DIST / Path(path[len("/ort/"):]).name
        elif path.startswith("/model/"):
            file = self.models.get(path[len("/model/"):])
        else:
            file = None
        if file is None or not file.is_file():
            self.send_error(404)
            return
        types = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript",
                 ".wasm": "application/wasm"}
        self.send_response(200)
        self.send_header("Content-Type", types.get(file.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(file.stat().st_size))
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        with open(file, "rb") as f:
            try:
                shutil.copyfileobj(f, self.wfile, 1 << 20)
            except (BrokenPipeError, ConnectionResetError):
                pass


class _Browser:
    def __init__(self):
        from playwright.sync_api import sync_playwright

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        self.version = self.browser.version
        self.ids = itertools.count()

    def close(self):
        try:
            self.browser.close()
            self.playwright.stop()
        finally:
            self.server.shutdown()
            self.server.server_close()


_BROWSER: _Browser | None = None


def _browser() -> _Browser:
    global _BROWSER
    if _BROWSER is None:
        _BROWSER = _Browser()
        atexit.register(_BROWSER.close)
    return _BROWSER


def _reset() -> None:
    global _BROWSER
    if _BROWSER is not None:
        try:
            _BROWSER.close()
        except Exception:  # noqa: BLE001 - closing a crashed browser
            pass
        atexit.unregister(_BROWSER.close)
        _BROWSER = None


def browser_run(engine: str, backend: str, model_path: Path, feeds, output_names, repeat) -> EngineResult:
    b = _browser()
    key = f"{next(b.ids)}/{model_path.name}"
    _Handler.models[key] = model_path.resolve()
    messages: list[str] = []
    page = b.browser.new_page()
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    try:
        page.goto(f"{b.origin}/page.html?bundle={BUNDLES[backend]}")
        page.wait_for_function("window.gradmapReady !== undefined", timeout=60_000)
        if page.evaluate("window.gradmapReady") is not True:
            raise EngineError(engine, model_path, f"page did not load onnxruntime-web: {page.evaluate('window.gradmapReady')}")
        inputs = [{"name": name, "dtype": _ort_dtype(a), "dims": list(a.shape),
                   "b64": base64.b64encode(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).decode()}
                  for name, a in feeds.items()]
        page.set_default_timeout(RUN_TIMEOUT_MS)
        result = page.evaluate("([url, backend, inputs, outputs, repeat]) => window.gradmapRun(url, backend, inputs, outputs, repeat)",
                               [f"/model/{key}", backend, inputs, output_names, repeat])
    except EngineError:
        raise
    except Exception as e:  # noqa: BLE001 - a crashed page, a timeout: the engine failed
        _reset()  # the browser may be gone with the page: start afresh next time
        raise EngineError(engine, model_path, f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        try:
            page.close()
        except Exception:  # noqa: BLE001 - already closed with its browser
            pass
        _Handler.models.pop(key, None)
    if result.get("error"):
        raise EngineError(engine, model_path, result["error"])
    if result.get("backend") != backend:
        raise EngineError(engine, model_path, f"the page ran on {result.get('backend')!r}, not {backend!r}")
    outputs = {}
    for out in result["outputs"]:
        dtype = np.dtype(_ORT_TO_NUMPY[out["dtype"]])
        data = np.frombuffer(base64.b64decode(out["b64"]), dtype=dtype.newbyteorder("<")).astype(dtype)
        outputs[out["name"]] = data.reshape(out["dims"])
    notes = [m for m in messages if not m.startswith("log:")]
    if result.get("adapter"):
        notes.insert(0, f"adapter: {result['adapter']}")
    return EngineResult(outputs, result["run_ms"], notes)


def browser_version() -> str:
    return _browser().version
