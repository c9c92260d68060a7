"""Coverage of ``gradmap export keras:NAME`` as data: every ``keras.applications`` model, whether it
exports, how close its gradient comes to TensorFlow's, how long the export takes, and why the others fail.

One row per application (random weights, seeded; the smallest input Keras allows for it, 32x32 for
most), exported as ``gradmap export keras:NAME --weights none --input-size S`` with the export's own
parity check: ``tf.GradientTape`` on a float64 copy of the model, the tolerance ten times TensorFlow's
own float32 error. Each row runs in a child process (a model's memory goes with it, and a stuck
conversion is stopped at ``--timeout``); rows are appended to the results file as they finish, so an
interrupted run resumes. The results file (bench/results/coverage_keras.json) is the table's source;
``--tables-only`` rewrites docs/coverage-keras.md's table from it alone (bench/_report.py's flags).

Row schema (the one of tools/onnx_coverage.py, with the application's preset)::

    {"source": "keras.applications", "model": "ResNet50", "opset": 18, "input_size": [32, 32],
     "preset": "keras-caffe", "status": "exported" | "refused" | "error" | "timeout",
     "logits_error": 3.3e-07, "gradient_error": 6.3e-07, "reference": "float64 Keras model (tf.GradientTape)",
     "export_seconds": 41.2, "forward_nodes": 123, "peak_rss_mb": 2100, "reason": null, "notes": [...]}

``peak_rss_mb`` is the row's process's peak resident memory (absent in rows recorded before it was).

Usage (the keras venv: tensorflow-cpu, keras, tf2onnx; run it niced, it is long):

    nice -n 10 python tools/keras_coverage.py                 # every missing row, then the table
    python tools/keras_coverage.py --only ResNet50 --force
    python tools/keras_coverage.py --tables-only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _report  # noqa: E402

RESULTS = _report.RESULTS / "coverage_keras.json"
PAGE, SECTIONS = "coverage-keras.md", ("keras",)
SIZE = 32
#: Applications whose smallest input Keras allows is larger than SIZE.
MODEL_SIZES = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
DEFAULT_TIMEOUT = 1800
#: The largest applications (hundreds of MB of weights, minutes of conversion): run last.
LARGE = ("ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge", "EfficientNetB5", "EfficientNetB6", "EfficientNetB7",
         "EfficientNetV2L", "EfficientNetV2M", "NASNetLarge", "ResNet152", "ResNet152V2", "InceptionResNetV2")


def _names() -> list[str]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from gradmap.export._keras import application_names

    return sorted(application_names(), key=lambda name: (name in LARGE, name))


def row(name: str) -> dict:
    """Export application ``name`` (in this process) and describe how it went."""
    from gradmap.export._keras import application_names, application_preset, export_keras
    from gradmap.graph import ExportError

    size = MODEL_SIZES.get(name, SIZE)
    out = {"source": "keras.applications", "model": name, "opset": 18, "input_size": [size, size],
           "preset": application_preset(application_names()[name]), "status": "error", "logits_error": None,
           "gradient_error": None, "reference": None, "export_seconds": None, "forward_nodes": None, "reason": None,
           "notes": []}
    start = time.perf_counter()
    try:
        report = export_keras(name, None, weights="none", seed=0, input_size=(size, size))
    except ExportError as e:
        out.update(status="refused", reason=str(e).splitlines()[0][:300])
    except Exception as e:  # a bug: recorded with its type, the run goes on
        out.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        traceback.print_exc()
    else:
        out.update(status="exported", logits_error=report.logits_error, gradient_error=report.gradient_error,
                   reference=report.reference, forward_nodes=report.forward_nodes, notes=report.notes)
    out["export_seconds"] = round(time.perf_counter() - start, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: kB
    return out


def _failed(name: str, status: str, seconds: float, reason: str) -> dict:
    size = MODEL_SIZES.get(name, SIZE)
    return {"source": "keras.applications", "model": name, "opset": 18, "input_size": [size, size], "preset": None,
            "status": status, "logits_error": None, "gradient_error": None, "reference": None,
            "export_seconds": round(seconds, 1), "forward_nodes": None, "peak_rss_mb": None, "reason": reason,
            "notes": []}


def _out_of_memory(pid: int) -> str | None:
    """What the kernel log says when it killed process ``pid`` for memory (its resident size then), or None
    (not killed for memory, or the log is not readable)."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in log.splitlines():
        if f"Killed process {pid} " in line:
            rss = line.split("anon-rss:")[1].split("kB")[0] if "anon-rss:" in line else None
            at = f" at {int(rss) / 2**20:.1f} GiB resident" if rss and rss.isdigit() else ""
            return f"killed by the kernel's out-of-memory killer{at} (the machine's memory is shared)"
    return None


def _child(name: str, timeout: float) -> dict:
    """``row(name)`` in a child process, or a ``timeout`` / ``error`` row when it does not finish."""
    command = [sys.executable, __file__, "--row", name]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return _failed(name, "timeout", time.perf_counter() - start, f"did not finish within {timeout:.0f} s")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if child.returncode == 0 and lines:
        return json.loads(lines[-1])
    reason = _out_of_memory(child.pid) if child.returncode == -9 else None
    if reason is None:
        tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        reason = f"the child process ended with {child.returncode}: {tail}"
    return _failed(name, "error", time.perf_counter() - start, reason)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.1e}" if isinstance(value, float) else str(value)


def sections(data: dict) -> dict[str, str]:
    """The coverage table of docs/coverage-keras.md, from a results file."""
    rows = data["rows"]
    exported = sum(r["status"] == "exported" for r in rows)
    lines = [_report.machine_line(data["meta"]), "",
             f"{exported} of {len(rows)} applications export. Errors are max|Δ| / max|reference| against "
             "tf.GradientTape on the float64 Keras model.", ""]
    measured = [r for r in rows if r["status"] == "exported" and r["gradient_error"] is not None]
    if measured:
        worst = max(measured, key=lambda r: r["gradient_error"])
        worst_logits = max(measured, key=lambda r: r["logits_error"])
        lines += [f"Largest errors of the exported applications: gradient {worst['gradient_error']:.1e} "
                  f"({worst['model']}), logits {worst_logits['logits_error']:.1e} ({worst_logits['model']}).", ""]
    refused = [r for r in rows if r["status"] != "exported"]
    if refused:
        lines += [f"Not exported ({len(refused)}): " + "; ".join(f"{r['model']} ({r['status']})" for r in refused)
                  + ". The reason column says why.", ""]
    missing = [name for name in data.get("applications", []) if name not in {r["model"] for r in rows}]
    if missing:
        lines += [f"Not run yet ({len(missing)} of {len(data['applications'])}; `tools/keras_coverage.py` resumes "
                  f"with them): {', '.join(missing)}.", ""]
    header = ["model", "size", "preset", "status", "logits", "gradient", "forward nodes", "export s", "peak MiB",
              "reason"]
    cells = []
    for r in rows:
        seconds = "" if r["export_seconds"] is None else format(r["export_seconds"], ".1f")
        cells.append([r["model"], "x".join(str(d) for d in r["input_size"]), r["preset"] or "", r["status"],
                      _fmt(r["logits_error"]), _fmt(r["gradient_error"]), _fmt(r["forward_nodes"]), seconds,
                      _fmt(r.get("peak_rss_mb")),
                      (r["reason"] or "").replace("|", "/")])
    return {"keras": "\n".join(lines + _report.table(header, cells)) + "\n"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="these applications only (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo rows that exist")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds a row may take")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # the child process: one row as JSON on stdout
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(row(args.row), default=float), flush=True)
        return
    if args.tables_only:
        data = _report.read_results(args.out)
    else:
        saved = _report.read_results(args.out) if Path(args.out).exists() else {"meta": {}, "rows": []}
        rows = saved["rows"]
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnx", "onnxruntime", "tensorflow-cpu", "keras",
                                                            "tf2onnx"))
        done_now: list[str] = []
        applications = _names()
        for name in args.only or applications:
            if any(r["model"] == name for r in rows) and not args.force:
                continue
            print(f"{name} ...", flush=True)
            result = _child(name, args.timeout)
            print(f"  {result['status']} {result['export_seconds']} s {result['reason'] or ''}", flush=True)
            rows = sorted([r for r in rows if r["model"] != name] + [result], key=lambda r: r["model"])
            done_now.append(name)
            run = _report.merge_update(meta, saved["meta"], done_now) if saved["rows"] else meta
            data = _report.write_results(args.out, run, rows, final=False, applications=applications)
        run = _report.merge_update(meta, saved["meta"], done_now) if saved["rows"] and done_now else \
            (meta if done_now or not saved["rows"] else saved["meta"])
        data = _report.write_results(args.out, run, rows, final=bool(done_now), applications=applications)
    if not args.no_docs:
        _report.publish(PAGE, sections(data))


if __name__ == "__main__":
    main()
