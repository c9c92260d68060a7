"""Run an ONNX model on the inference engines gradmap's portable graphs target.

    from tests.engines import run
    outputs = run("openvino", "model.onnx", {"image": x, "target": t}, ["logits", "gradient"])

Engines (``ENGINES``):

- ``ort_cpu``: onnxruntime in Python, CPU provider, graph optimization ``ORT_ENABLE_ALL`` (its
  default), one thread.
- ``ort_wasm_node``: onnxruntime-web's WebAssembly backend under Node.js (``run_wasm.cjs``), graph
  optimization ``all``, one thread.
- ``ort_wasm_chromium``, ``ort_webgpu``: onnxruntime-web in headless Chromium (``page.html``), the
  WebAssembly backend (``ort.wasm.min.js``) or WebGPU (``ort.webgpu.min.js``, on SwiftShader here);
  the page is served from 127.0.0.1 with cross-origin isolation headers, tensors travel as base64.
  A WebGPU run fails when the page gets no WebGPU adapter: it never falls back to WebAssembly.
- ``openvino``: OpenVINO's CPU plugin reading the ONNX file, f32 inference precision, one thread.

onnxruntime-web comes from ``npm ci`` in this folder (``package.json`` pins the version range;
``node_modules`` is not committed). Every failure raises :class:`EngineError` naming the engine, the
model and the reason.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ENGINES", "ENGINE_BUGS", "EngineError", "EngineResult", "available", "run", "run_engine", "versions"]

HERE = Path(__file__).resolve().parent
NODE_MODULES = Path(os.environ.get("GRADMAP_ENGINES_NODE_MODULES", HERE / "node_modules"))
ORT_WEB_DIST = NODE_MODULES / "onnxruntime-web" / "dist"
CHROMIUM = os.environ.get("GRADMAP_CHROMIUM", "/usr/bin/chromium")

#: Seconds an engine run may take (GRADMAP_ENGINE_TIMEOUT) before it counts as failed (node, Chromium).
TIMEOUT = float(os.environ.get("GRADMAP_ENGINE_TIMEOUT", "1800"))

ENGINES = ("ort_cpu", "ort_wasm_node", "ort_wasm_chromium", "ort_webgpu", "openvino")

#: How each engine optimizes the graph before running it (recorded beside results).
GRAPH_OPTIMIZATION = {
    "ort_cpu": "ORT_ENABLE_ALL",
    "ort_wasm_node": "all",
    "ort_wasm_chromium": "all",
    "ort_webgpu": "all",
    "openvino": "CPU plugin defaults, INFERENCE_PRECISION_HINT f32",
}


#: Engine bugs the matrix met, each isolated to a minimal graph (python -m tests.engines.diverge finds the
#: first diverging node; the repros are described here so they can be reported upstream). Each pass of
#: gradmap/graph/lowering/engines.py names the bug it works around by its key here.
ENGINE_BUGS = {
    "openvino-shared-square-constant": (
        "OpenVINO 2026.4.1 CPU plugin with INFERENCE_PRECISION_HINT f32: an initializer read by two ops that need "
        "it in different layouts, when its shape is square (a CxC Conv kernel, an NxN Gemm weight), gets one layout "
        "for both: with W shared by Conv(X, W) and ConvTranspose(G, W), the ConvTranspose computes with W's first "
        "two axes swapped; with W shared by Gemm(X, W, transB=1) and Gemm(G, W, transB=0) (or MatMul(G, W)), the "
        "second gives G W^T. Non-square weights, unshared copies and the default (bf16) precision are right; an "
        "in-graph Identity, Transpose or Mul by 1 folds back to the same constant and does not help. gradmap's "
        "engine pass own_weight_copy reads such weights through two reversals of the first axis, which OpenVINO "
        "folds into a constant of its own."),
    "openvino-empty-concat": (
        "OpenVINO 2026.4.1 ONNX frontend: a Concat one of whose inputs is an empty Gather(Shape(X), indices=[]) "
        "fails to convert ('Accessing out-of-range dimension', shape_util.cpp:66); the model does not load. gradmap's "
        "engine pass drop_empty_concat_pieces drops such pieces (the Gather rule's shapes for a 1-D dynamic input)."),
    "webgpu-split-outputs": (
        "onnxruntime-web 1.31.1 WebGPU: a Split with 10 or more outputs fails ('Too many storage buffers in shader. "
        "Current: 11, Max is 10', shader_helper.cc:354, SwiftShader adapter); Concat chunks its inputs and runs "
        "with 33, Split does not chunk its outputs."),
    "webgpu-grouped-convtranspose-2x2": (
        "onnxruntime-web 1.31.1 WebGPU: a grouped ConvTranspose with one-hot 2x2 kernels and stride 2 (the "
        "portable MaxPool gradient's col2im for 2x2 stride-2 pools) gives a wrong result (gradient error 0.8 "
        "against onnxruntime CPU; 3x3 kernels with stride 2 or 3 are right), so googlenet was wrong. gradmap's engine "
        "pass tiled_pool_depth_to_space places the gradients of pools whose windows tile the input with "
        "DepthToSpace instead."),
    "onnxruntime-cpu-scatternd-repeated-indices": (
        "onnxruntime CPU provider: ScatterND(reduction=add) with repeated indices lost updates when it ran on several "
        "threads (4096 rows summed into 4 came out off by 5.8 on 2 threads, found with adaptive average pooling to a "
        "larger map, which exports as a GatherND). Not reproduced with onnxruntime 1.32.0 (2026-12-07: 40 runs each "
        "on 2 and 4 threads, largest error 1.1e-4, float32 rounding of the sums). gradmap's engine pass "
        "repeated_scatter_as_matmul computes such sums with constant indices as a MatMul with the count matrix."),
}


class EngineError(RuntimeError):
    """An engine could not load or run a model."""

    def __init__(self, engine: str, model: str | os.PathLike, reason: str):
        self.engine, self.model, self.reason = engine, str(model), reason.strip()
        super().__init__(f"{engine} on {Path(model).name}: {self.reason}")


@dataclass
class EngineResult:
    outputs: dict[str, np.ndarray]
    run_ms: list[float]  # wall time of each run inside the engine (first run first)
    notes: list[str] = field(default_factory=list)  # engine messages worth keeping (fallbacks, warnings)


def run(engine: str, model_path, feeds: dict[str, np.ndarray], output_names) -> dict[str, np.ndarray]:
    """The named outputs of ``model_path`` on ``engine`` for ``feeds``."""
    return run_engine(engine, model_path, feeds, output_names).outputs


def run_engine(engine: str, model_path, feeds: dict[str, np.ndarray], output_names, *,
               repeat: int = 1) -> EngineResult:
    """Like :func:`run`, with the time of each of ``repeat`` runs in one session (outputs of the first)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise EngineError(engine, model_path, "model file does not exist")
    ok, why = available(engine)
    if not ok:
        raise EngineError(engine, model_path, f"engine not available: {why}")
    feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
    output_names = list(output_names)
    runner = {"ort_cpu": _run_ort_cpu, "ort_wasm_node": _run_node, "openvino": _run_openvino,
              "ort_wasm_chromium": functools.partial(_run_chromium, "wasm"),
              "ort_webgpu": functools.partial(_run_chromium, "webgpu")}[engine]
    try:
        return runner(model_path, feeds, output_names, repeat)
    except EngineError:
        raise
    except Exception as e:  # noqa: BLE001 - every engine failure becomes one kind of error
        raise EngineError(engine, model_path, f"{type(e).__name__}: {e}") from e


@functools.lru_cache(maxsize=None)
def available(engine: str) -> tuple[bool, str]:
    """Whether ``engine`` can run here, and why not."""
    if engine == "ort_cpu":
        return _importable("onnxruntime")
    if engine == "openvino":
        return _importable("openvino")
    if not (ORT_WEB_DIST / "ort.wasm.min.js").is_file():
        return False, f"onnxruntime-web is not installed ({ORT_WEB_DIST} missing: run `npm ci` in {HERE})"
    if engine == "ort_wasm_node":
        node = shutil.which("node")
        return (True, "") if node else (False, "node (Node.js) not on PATH")
    if not Path(CHROMIUM).is_file():
        return False, f"{CHROMIUM} missing (apt-get install -y chromium)"
    ok, why = _importable("playwright")
    return (ok, why)


def _importable(module: str) -> tuple[bool, str]:
    try:
        __import__(module)
    except ImportError as e:
        return False, f"Python package {module!r} is not installed ({e})"
    return True, ""


@functools.lru_cache(maxsize=None)
def versions() -> dict[str, str]:
    """Versions of every available engine's software."""
    out: dict[str, str] = {}
    if available("ort_cpu")[0]:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    if available("openvino")[0]:
        import openvino

        out["openvino"] = openvino.__version__
    if (ORT_WEB_DIST.parent / "package.json").is_file():
        out["onnxruntime-web"] = json.loads((ORT_WEB_DIST.parent / "package.json").read_text())["version"]
    if shutil.which("node"):
        out["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    if Path(CHROMIUM).is_file():
        text = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout
        out["chromium"] = text.strip().split(" built")[0]
    return out


# --- onnxruntime CPU -----------------------------------------------------------------------------

def _run_ort_cpu(model_path: Path, feeds, output_names, repeat):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise EngineError("ort_cpu", model_path, f"load: {e}") from e
    times, outputs = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            values = session.run(output_names, feeds)
        except Exception as e:  # noqa: BLE001
            raise EngineError("ort_cpu", model_path, f"run: {e}") from e
        times.append((time.perf_counter() - start) * 1e3)
        outputs = outputs or dict(zip(output_names, values))
    return EngineResult(outputs, times)


# --- OpenVINO ------------------------------------------------------------------------------------

def _run_openvino(model_path: Path, feeds, output_names, repeat):
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(str(model_path))
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": 1})
    except Exception as e:  # noqa: BLE001
        raise EngineError("openvino", model_path, f"load: {e}") from e
    request = compiled.create_infer_request()
    times, outputs = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            request.infer(feeds)
        except Exception as e:  # noqa: BLE001
            raise EngineError("openvino", model_path, f"run: {e}") from e
        times.append((time.perf_counter() - start) * 1e3)
        if outputs is None:
            outputs = {}
            for name in output_names:
                try:
                    outputs[name] = np.array(request.get_tensor(name).data, copy=True)
                except Exception as e:  # noqa: BLE001
                    raise EngineError("openvino", model_path, f"output {name!r}: {e}") from e
    return EngineResult(outputs, times)


# --- onnxruntime-web under Node.js ---------------------------------------------------------------

_NUMPY_TO_ORT = {"float32": "float32", "float64": "float64", "int64": "int64", "int32": "int32",
                 "uint8": "uint8", "int8": "int8", "bool": "bool"}
_ORT_TO_NUMPY = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32,
                 "uint8": np.uint8, "int8": np.int8, "bool": np.bool_}


def _ort_dtype(array: np.ndarray) -> str:
    try:
        return _NUMPY_TO_ORT[array.dtype.name]
    except KeyError:
        raise ValueError(f"no onnxruntime-web tensor type for numpy {array.dtype}") from None


def _run_node(model_path: Path, feeds, output_names, repeat):
    with tempfile.TemporaryDirectory(prefix="gradmap-wasm-") as tmp:
        tmp = Path(tmp)
        inputs = []
        for i, (name, array) in enumerate(feeds.items()):
            file = tmp / f"input_{i}.bin"
            array.astype(array.dtype.newbyteorder("<"), copy=False).tofile(file)
            inputs.append({"name": name, "dtype": _ort_dtype(array), "dims": list(array.shape), "file": str(file)})
        manifest = {"model": str(model_path.resolve()), "inputs": inputs, "outputs": output_names,
                    "out_dir": str(tmp), "threads": 1, "repeat": repeat}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
        proc = subprocess.run(["node", "--max-old-space-size=8192", str(HERE / "run_wasm.cjs"), str(tmp / "manifest.json")],
                              capture_output=True, text=True, env=env, timeout=TIMEOUT)
        result_file = tmp / "result.json"
        if not result_file.is_file():
            raise EngineError("ort_wasm_node", model_path,
                              f"node exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
        result = json.loads(result_file.read_text())
        if "error" in result:
            raise EngineError("ort_wasm_node", model_path, result["error"])
        outputs = {}
        for i, out in enumerate(result["outputs"]):
            data = np.fromfile(tmp / f"output_{i}.bin", dtype=np.dtype(_ORT_TO_NUMPY[out["dtype"]]).newbyteorder("<"))
            outputs[out["name"]] = data.reshape(out["dims"]).astype(_ORT_TO_NUMPY[out["dtype"]])
        return EngineResult(outputs, result["run_ms"])


# --- onnxruntime-web in headless Chromium --------------------------------------------------------

def _run_chromium(backend: str, model_path: Path, feeds, output_names, repeat):
    from ._browser import browser_run

    engine = "ort_webgpu" if backend == "webgpu" else "ort_wasm_chromium"
    return browser_run(engine, backend, model_path, feeds, output_names, repeat)
