"""gradmap's gradient graph against two other ways of getting an input gradient as an ONNX graph.

    python bench/bench_foreign.py --python /work/venv-foreign/bin/python [--models resnet50 ...] [--batches 1 8]
    python bench/bench_foreign.py --tables-only    # the docs table again from bench/results/foreign.json

Run it with gradmap's own venv (torch, onnx_ir, onnxruntime, gradmap). ``--python`` names a second
venv that has onnxruntime-training 1.19.2 and onnx-ad 0.3.0 (onnxruntime-training is imported as
``onnxruntime`` too, so it must never go into gradmap's venv):

    python3.11 -m venv /work/venv-foreign
    /work/venv-foreign/bin/pip install onnxruntime-training==1.19.2 onnx-ad==0.3.0 numpy onnx

Per model, the plain forward export and gradmap's gradient model are made as in bench/bench_speed.py
(random weights, dynamic batch) and saved to a temporary directory. That directory is handed to this
same file run with ``--worker`` by the second venv's python (the worker imports numpy, onnx,
onnxruntime-training and onnx_ad, never gradmap or torch), which builds

  (e) onnxruntime-training's GradientGraphBuilder graph: the forward export plus a ``target`` input
      and ``loss = ReduceSum(GatherElements(logits, Unsqueeze(target, 1), axis=1))``, built with
      ``GradientGraphBuilder(bytes, {"loss"}, {"image"}, "loss").build()``; its output
      ``image_grad``. It needs onnxruntime-training's own kernels (ConvGrad, ReluGrad, ... in the
      com.microsoft domain), so the worker times it there, against onnxruntime 1.19.2's forward of
      the plain export: the two in turn, round by round, in that one process;
  (f) onnx-ad's reverse-mode graph, ``onnx_ad.reverse(model, inputs=["image"], outputs=["logits"],
      layout="onnx")``, seeded with ``adj_logits`` [N, K, 1] one-hot at the target; output
      ``adj_image`` [N, 3, H, W, 1]. onnx-ad's Conv rule needs a fully static input shape, so (f) is
      built once per batch size from the export with its batch dimension pinned. Its graph is
      standard ONNX: this process times it on gradmap's onnxruntime, round by round with
      (a) onnxruntime's forward of the plain export and (b) gradmap's gradient graph.

Every gradient is d sum_n logits[n, t_n] / d image with t_n gradmap's resolved top-1 class on the
same input (gradmap itself is timed with target -1, as in bench_speed.py, and resolves the same t_n).
Before a foreign graph is timed its gradient is checked against gradmap's: max |g - g_gradmap| over
max |g_gradmap|; a NaN, a wrong shape or a difference over --tolerance is reported, not timed. A
builder that fails is reported by its error message. A foreign method is not timed at a batch whose
single run takes more than --slow seconds (predicted linearly from its median at the smaller batch,
or seen in a warm single run); the smallest batch is always timed (at least three rounds). Medians
after warm-up, each call --pause s after the previous one. Writes bench/results/foreign.json (after every
model, so that a crash keeps what was measured) and the table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _report  # noqa: E402  (standard library only: the foreign venv's worker imports it too)

RESULTS = _report.RESULTS / "foreign.json"
PAGE, SECTIONS = "benchmarks.md", ("foreign",)
DEFAULT_MODELS = ["resnet50", "vgg19", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "vit_b_16",
                  "convnext_tiny"]
DEFAULT_PYTHON = "/work/venv-foreign/bin/python"


def _bench_speed():
    """bench_speed.py, for its interleaved timer and CPU session helper (that module imports numpy
    and the standard library only, so the foreign venv's worker can import it too)."""
    import bench_speed

    return bench_speed


def _one_line(error: BaseException) -> str:
    """An exception as one short line; onnxruntime's C++ errors lose their source location and signature."""
    text = " ".join(str(error).split())
    running = re.search(r"while running (\S+) node\. Name:'([^']*)'", text)
    tail = re.search(r" was false\. (.*)$", text)
    if tail:  # "<file>:<line> <C++ signature> <condition> was false. <message>"
        text = tail.group(1)
    else:  # no message after the failed condition: keep the file, the line and the condition
        bare = re.search(r"(\w+\.(?:h|cc):\d+) .*?\) (?:const )?(\S.* was false\.)$", text)
        if bare:
            text = f"{bare.group(1)}: {bare.group(2)}"
    if running:
        text = f"{running.group(1)} node {running.group(2)}: {text}"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def _relative_difference(gradient: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(gradient - reference).max() / max(float(np.abs(reference).max()), 1e-30))


def _check(gradient: np.ndarray, reference: np.ndarray, tolerance: float) -> tuple[float | None, str | None]:
    """(max relative difference, error or None) of a foreign gradient against gradmap's."""
    if gradient.shape != reference.shape:
        return None, f"wrong gradient shape {list(gradient.shape)}, expected {list(reference.shape)}"
    if not np.isfinite(gradient).all():
        return None, "NaN or inf in the gradient"
    diff = _relative_difference(gradient, reference)
    if not diff <= tolerance:
        return diff, f"gradient differs from gradmap's: max relative difference {diff:.3g}"
    return diff, None


def _summary(times: dict[str, list[float]], method: str, reference: str) -> dict:
    """Medians, the ratio of the medians and the quartiles of the per-round ratio."""
    per_round = np.asarray(times[method]) / np.asarray(times[reference])
    return {f"{name}_ms": statistics.median(values) for name, values in times.items()} | {
        f"{method}_over_forward": statistics.median(times[method]) / statistics.median(times[reference]),
        f"{method}_over_forward_quartiles": [float(q) for q in np.percentile(per_round, [25, 50, 75])],
        f"{method}_rounds": len(per_round),
    }


def _too_slow(single_ms: dict[int, float], batch: int, slow_s: float) -> str | None:
    """Why a method's run at ``batch`` would take too long, from its single-run time at a smaller batch."""
    smaller = [b for b in single_ms if b < batch]
    if not smaller:
        return None
    b = max(smaller)
    predicted = single_ms[b] / b * batch / 1000
    if predicted > slow_s:
        return f"not timed: ~{predicted:.0f} s per run predicted from batch {b} (over {slow_s:g} s)"
    return None


def _warm_ms(first_ms: float, slow_s: float, run) -> float:
    """A single run's time in ms: the first run's, or a second run's when the first (cold) one was over ``slow_s``."""
    if first_ms <= slow_s * 1000:
        return first_ms
    t = time.perf_counter()
    run()
    return (time.perf_counter() - t) * 1000


# --- the worker, run by the foreign venv's python: numpy, onnx, onnxruntime-training, onnx_ad only ----------------


def _pin_batch(model, batch: int):
    """A copy of ``model`` whose input and output have a static batch dimension (onnx-ad's Conv needs it)."""
    pinned = type(model)()
    pinned.CopyFrom(model)
    del pinned.graph.value_info[:]
    for value in list(pinned.graph.input) + list(pinned.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    return pinned


def _with_loss(model):
    """The forward model plus a ``target`` input and a scalar ``loss`` = sum_n logits[n, target[n]]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    lossy = onnx.ModelProto()
    lossy.CopyFrom(model)
    graph = lossy.graph
    graph.input.append(helper.make_tensor_value_info("target", TensorProto.INT64, ["batch"]))
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "loss_axis"))
    graph.node.extend([
        helper.make_node("Unsqueeze", ["target", "loss_axis"], ["loss_target"]),
        helper.make_node("GatherElements", ["logits", "loss_target"], ["loss_selected"], axis=1),
        helper.make_node("ReduceSum", ["loss_selected"], ["loss"], keepdims=0),
    ])
    graph.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    return lossy


def _build_onnx_ad(model, batches: list[int], directory: Path) -> dict:
    import onnx
    import onnx_ad

    built = {}
    for batch in batches:
        start = time.perf_counter()
        try:
            adjoint = onnx_ad.reverse(_pin_batch(model, batch), inputs=["image"], outputs=["logits"], layout="onnx")
            path = directory / f"onnx_ad_b{batch}.onnx"
            onnx.save(adjoint, str(path))
            built[batch] = {"path": str(path), "build_s": time.perf_counter() - start, "nodes": len(adjoint.graph.node)}
        except Exception as e:  # noqa: BLE001 - anything onnx-ad raises is a result
            built[batch] = {"error": _one_line(e)}
    return built


def _time_ort_training(model, spec: dict, directory: Path) -> dict:
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    result: dict = {"batches": {}}
    start = time.perf_counter()
    try:
        builder = GradientGraphBuilder(_with_loss(model).SerializeToString(), {"loss"}, {"image"}, "loss")
        builder.build()
        gradient_model = builder.get_model()
    except Exception as e:  # noqa: BLE001
        result["error"] = _one_line(e)
        return result
    result["build_s"] = time.perf_counter() - start
    threads = spec["threads"]
    s_forward = _bench_speed().cpu_session(str(directory / "forward.onnx"), threads)
    s_gradient = _bench_speed().cpu_session(gradient_model, threads)
    grad_index = [o.name for o in s_gradient.get_outputs()].index("image_grad")
    single_ms: dict[int, float] = {}
    for batch in spec["batches"]:
        image = np.load(directory / f"image_b{batch}.npy")
        target = np.load(directory / f"target_b{batch}.npy")
        reference = np.load(directory / f"gradient_b{batch}.npy")
        row: dict = {}
        result["batches"][str(batch)] = row
        skip = _too_slow(single_ms, batch, spec["slow_s"])
        if skip:
            row["error"] = skip
            continue
        feeds = {"image": image, "target": target}
        t = time.perf_counter()
        try:
            gradient = s_gradient.run(None, feeds)[grad_index]
        except Exception as e:  # noqa: BLE001
            row["error"] = _one_line(e)
            continue
        single_ms[batch] = row["single_ms"] = _warm_ms((time.perf_counter() - t) * 1000, spec["slow_s"],
                                                       lambda: s_gradient.run(None, feeds))
        row["rel_diff"], error = _check(gradient, reference, spec["tolerance"])
        if error:
            row["error"] = error
            continue
        if batch != min(spec["batches"]) and single_ms[batch] > spec["slow_s"] * 1000:
            row["error"] = f"not timed: a single run took {single_ms[batch] / 1000:.1f} s (over {spec['slow_s']:g} s)"
            continue
        times = _bench_speed()._interleaved_times({
            "ort_training_forward": lambda: s_forward.run(None, {"image": image}),
            "ort_training": lambda: s_gradient.run(None, feeds),
        }, warmup=spec["warmup"], repeat=spec["repeat"], budget_s=spec["budget_s"], pause_s=spec["pause_s"])
        row.update(_summary(times, "ort_training", "ort_training_forward"))
        single_ms[batch] = row["ort_training_ms"]
    return result


def worker(spec_path: Path) -> int:
    import onnx
    import onnx_ad
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    spec = json.loads(spec_path.read_text())
    directory = Path(spec["dir"])
    model = onnx.load(str(directory / "forward.onnx"))
    result = {"versions": {"onnxruntime": ort.__version__, "onnx_ad": onnx_ad.__version__, "onnx": onnx.__version__,
                           "python": platform.python_version()},
              "onnx_ad": _build_onnx_ad(model, spec["batches"], directory),
              "ort_training": _time_ort_training(model, spec, directory)}
    (directory / "worker.json").write_text(json.dumps(result, indent=1))
    return 0


# --- the main process: gradmap's venv ------------------------------------------------------------------------------


def _export(name: str, directory: Path):
    """Forward and gradmap's gradient model exactly as bench_speed.py makes them; returns their sizes and bytes."""
    from bench_speed import export_pair

    _, size, forward, gradient = export_pair(name)
    (directory / "forward.onnx").write_bytes(forward)
    (directory / "gradmap.onnx").write_bytes(gradient)
    return size, forward, gradient


def _run_worker(python: str, spec: dict, directory: Path, timeout_s: float) -> dict:
    spec_path = directory / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    log = directory / "worker.log"
    try:
        with log.open("w") as out:
            proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": _one_line(e)}
    result_path = directory / "worker.json"
    if proc.returncode != 0 or not result_path.exists():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        error = f"worker exited {proc.returncode}: {lines[-1] if lines else 'no output'}"
        return {"error": error[:300]}
    return json.loads(result_path.read_text())


def bench_model(name: str, args) -> tuple[list[dict], dict]:
    import onnxruntime as ort

    rows = []
    with tempfile.TemporaryDirectory(prefix=f"bench_foreign_{name}_") as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        size, forward, gradient = _export(name, directory)
        export_s = time.perf_counter() - start
        from gradmap.runtime.model import session_options  # gradmap's graph as gradmap's runtime loads it

        s_forward = _bench_speed().cpu_session(forward, args.threads)
        s_gradmap = _bench_speed().cpu_session(gradient, args.threads, session_options(args.threads))
        inputs = {}
        for batch in args.batches:
            rng = np.random.default_rng(batch)
            image = rng.standard_normal((batch, 3, *size), dtype=np.float32)
            minus_one = np.full(batch, -1, dtype=np.int64)
            out = dict(zip([o.name for o in s_gradmap.get_outputs()],
                           s_gradmap.run(None, {"image": image, "target": minus_one})))
            inputs[batch] = (image, minus_one, out["target_index"], out["gradient"])
            np.save(directory / f"image_b{batch}.npy", image)
            np.save(directory / f"target_b{batch}.npy", out["target_index"])
            np.save(directory / f"gradient_b{batch}.npy", out["gradient"])
        spec = {"dir": str(directory), "batches": args.batches, "threads": args.threads, "repeat": args.repeat,
                "budget_s": args.budget, "pause_s": args.pause, "warmup": args.warmup, "slow_s": args.slow,
                "tolerance": args.tolerance}
        start = time.perf_counter()
        foreign = _run_worker(args.python, spec, directory, timeout_s=600 + 4 * args.budget * len(args.batches))
        worker_s = time.perf_counter() - start
        versions = foreign.get("versions", {})
        training = foreign.get("ort_training", {})
        built = foreign.get("onnx_ad", {})
        f_single_ms: dict[int, float] = {}
        for batch in args.batches:
            image, minus_one, target, reference = inputs[batch]
            row: dict = {"model": name, "batch": batch, "threads": args.threads}
            e_row = training.get("batches", {}).get(str(batch), {})
            e_error = foreign.get("error") or training.get("error") or e_row.get("error")
            row.update({k: v for k, v in e_row.items() if k != "error"})
            if "single_ms" in row:
                row["ort_training_single_ms"] = row.pop("single_ms")
            if "rel_diff" in row:
                row["ort_training_rel_diff"] = row.pop("rel_diff")
            if e_error:
                row["ort_training_error"] = e_error
            variants = {
                "ort_forward": lambda: s_forward.run(None, {"image": image}),
                "gradmap": lambda: s_gradmap.run(None, {"image": image, "target": minus_one}),
            }
            f_error = foreign.get("error") or built.get(str(batch), {}).get("error")
            if not f_error and str(batch) not in built:
                f_error = "onnx-ad graph missing"
            f_error = f_error or _too_slow(f_single_ms, batch, args.slow)
            if not f_error:
                f_error = _check_onnx_ad(ort, built[str(batch)], image, target, reference, row, f_single_ms, args)
            if f_error:
                row["onnx_ad_error"] = f_error
            else:
                s_onnx_ad, seed = row.pop("_session")
                variants["onnx_ad"] = lambda: s_onnx_ad.run(None, {"image": image, "adj_logits": seed})
            times = _bench_speed()._interleaved_times(variants, warmup=args.warmup, repeat=args.repeat,
                                                      budget_s=args.budget, pause_s=args.pause)
            row.update(_summary(times, "gradmap", "ort_forward"))
            if "onnx_ad" in times:
                row.update({k: v for k, v in _summary(times, "onnx_ad", "ort_forward").items()
                            if k.startswith("onnx_ad")})
                f_single_ms[batch] = row["onnx_ad_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    timing = {"model": name, "export_s": round(export_s, 1), "worker_s": round(worker_s, 1), "versions": versions}
    return rows, timing


def _check_onnx_ad(ort, built: dict, image, target, reference, row: dict, single_ms: dict, args) -> str | None:
    """Load onnx-ad's graph, run it once and check its gradient; on success leave the session in ``row``."""
    try:
        session = _bench_speed().cpu_session(built["path"], args.threads)
        classes = session.get_inputs()[1].shape[1]
        seed = np.zeros((len(image), classes, 1), dtype=np.float32)
        seed[np.arange(len(image)), target, 0] = 1
        names = [o.name for o in session.get_outputs()]
        t = time.perf_counter()
        gradient = session.run(None, {"image": image, "adj_logits": seed})[names.index("adj_image")]
    except Exception as e:  # noqa: BLE001
        return _one_line(e)
    batch = len(image)
    single_ms[batch] = row["onnx_ad_single_ms"] = _warm_ms(
        (time.perf_counter() - t) * 1000, args.slow, lambda: session.run(None, {"image": image, "adj_logits": seed}))
    if gradient.ndim == reference.ndim + 1 and gradient.shape[-1] == 1:
        gradient = gradient[..., 0]
    row["onnx_ad_rel_diff"], error = _check(gradient, reference, args.tolerance)
    if error:
        return error
    if batch != min(args.batches) and single_ms[batch] > args.slow * 1000:
        return f"not timed: a single run took {single_ms[batch] / 1000:.1f} s (over {args.slow:g} s)"
    row["_session"] = (session, seed)
    return None


def _cell(row: dict, key: str, digits: int = 1) -> str:
    value = row.get(key)
    return "–" if value is None else f"{value:.{digits}f}"


def render(rows: list[dict], meta: dict) -> str:
    v = meta.get("foreign_versions", {})
    lines = [
        _report.machine_line(meta),
        "",
        f"`python bench/bench_foreign.py --python /work/venv-foreign/bin/python`: medians in ms, {meta['threads']} threads, "
        f"random weights; the gradient of sum_n logits[n, top-1 of n] with respect to the image. "
        f"(a) onnxruntime {meta['versions']['onnxruntime']} forward of the plain export, (b) gradmap, "
        f"(f) onnx-ad {v.get('onnx_ad', '?')}'s reverse-mode graph (batch pinned) on onnxruntime {meta['versions']['onnxruntime']}: "
        f"run in turn, round by round, in one process. "
        f"(e) onnxruntime-training {v.get('onnxruntime', '?')}'s GradientGraphBuilder graph, timed round by round with "
        f"its own onnxruntime's forward, in a second process: each ratio is over the forward it ran beside. "
        f"Gradients checked against gradmap's before timing (max |difference| ÷ max |gradmap|).",
        "",
        "| model | batch | ORT forward | gradmap | gradmap ÷ fwd | onnx-ad (f) | (f) ÷ fwd | (f) diff | "
        "ORT 1.19 forward | ORT-training (e) | (e) ÷ its fwd | (e) diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []

    def failed(row, method, label):
        error = row.get(f"{method}_error")
        if not error:
            return None
        if error not in notes:
            notes.append(error)
        return f"{label} [{notes.index(error) + 1}]"

    for r in rows:
        f_fail = failed(r, "onnx_ad", "–")
        e_fail = failed(r, "ort_training", "–")
        diff = lambda key: f"{r[key]:.1e}" if r.get(key) is not None else "–"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['batch']} | {_cell(r, 'ort_forward_ms')} | {_cell(r, 'gradmap_ms')} | "
            f"{_cell(r, 'gradmap_over_forward', 2)} | {f_fail or _cell(r, 'onnx_ad_ms')} | "
            f"{'–' if f_fail else _cell(r, 'onnx_ad_over_forward', 2)} | {diff('onnx_ad_rel_diff')} | "
            f"{_cell(r, 'ort_training_forward_ms')} | {e_fail or _cell(r, 'ort_training_ms')} | "
            f"{'–' if e_fail else _cell(r, 'ort_training_over_forward', 2)} | {diff('ort_training_rel_diff')} |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {note}" + ("  " if i < len(notes) else "") for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"foreign": render(data["rows"], data["meta"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=DEFAULT_PYTHON,
                        help="python of the venv with onnxruntime-training 1.19.2 and onnx-ad 0.3.0")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15, help="rounds (each runs every variant once)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of rounds per model, batch and process at most (after three rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between two timed calls")
    parser.add_argument("--slow", type=float, default=5.0, help="do not time a foreign method whose run takes longer (s)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest max |g - g_gradmap| / max |g_gradmap| still counted as the same gradient")
    _report.add_flags(parser, RESULTS)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = _report.parse_args(parser)
    if args.worker:
        return worker(args.worker)

    def measure():
        meta = _report.start_run(PAGE, SECTIONS, threads=args.threads, pause_s=args.pause, repeat=args.repeat,
                                 budget_s=args.budget, warmup=args.warmup, slow_s=args.slow, tolerance=args.tolerance,
                                 target="gradient of sum_n logits[n, t_n], t_n = gradmap's top-1 (target -1) on the "
                                        "same input")
        start = time.perf_counter()
        rows, timings = [], []
        for i, name in enumerate(args.models):
            model_rows, timing = bench_model(name, args)
            rows += model_rows
            timings.append(timing)
            print(json.dumps(timing), flush=True)
            meta["foreign_versions"] = next((t["versions"] for t in timings if t["versions"]), {})
            meta["per_model_s"] = [{k: v for k, v in t.items() if k != "versions"} for t in timings]
            meta["total_s"] = round(time.perf_counter() - start, 1)
            # after every model: a crash later keeps what was measured
            data = _report.write_results(args.out, meta, rows, final=i == len(args.models) - 1)
        return data

    data = _report.render_or_measure(args, PAGE, sections, measure)
    print(render(data["rows"], data["meta"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
