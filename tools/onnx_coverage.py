"""Coverage of ``gradmap export onnx:PATH`` as data: which ONNX classifiers export, how close they come to
their references, how long they take, and why the others fail.

Rows (one per model file, appended to the JSON as they finish, so an interrupted run resumes):

    torch.onnx   torchvision models exported by torch.onnx's TorchScript exporter at opsets 7-17
                 (random weights, seeded), compared with torch autograd in float64
    fixtures     tests/fixtures/onnx (jax2onnx, paddle2onnx, tf2onnx, old torch.onnx), compared with the
                 float64 values their framework computed (tools/make_onnx_fixtures.py)
    hand-written small graphs of ops that exporters emit but these models do not (LRN, Upsample, ...)

Every row also carries the export's own parity figures (the float64 evaluation of the ONNX graph).
The results file (bench/results/coverage_onnx.json) is the table's source; ``--tables-only`` rewrites
the table of docs/coverage-onnx.md from it alone (bench/_report.py's flags).

Row schema (shared with the Keras rows of docs/coverage-keras.md)::

    {"source": "torch.onnx", "model": "resnet18", "opset": 9, "input_size": [64, 64],
     "status": "exported" | "refused" | "error",
     "logits_error": 4.4e-07, "gradient_error": 5.9e-07,            # the export's parity check
     "reference": "float64 evaluation of the ONNX graph",
     "framework_logits_error": 3e-07, "framework_gradient_error": 6e-07,   # vs the source framework
     "framework_reference": "torch autograd in float64",
     "export_seconds": 8.1, "reason": null, "notes": ["opset 9 upgraded to 18 ..."]}

Usage (the main venv: torch and torchvision for the torch.onnx rows):

    python tools/onnx_coverage.py                 # every missing row, then the table
    python tools/onnx_coverage.py --only fixtures --force
    python tools/onnx_coverage.py --only torch --models googlenet --force
    python tools/onnx_coverage.py --tables-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _report  # noqa: E402

RESULTS = _report.RESULTS / "coverage_onnx.json"
PAGE, SECTIONS = "coverage-onnx.md", ("onnx",)
FIXTURES = ROOT / "tests" / "fixtures" / "onnx"

TORCHVISION = ["resnet18", "alexnet", "squeezenet1_1", "mobilenet_v2", "shufflenet_v2_x0_5", "googlenet",
               "mnasnet0_5", "efficientnet_b0", "densenet121"]
OPSETS = [7, 9, 11, 13, 17]
SIZE = 64
#: Models torch.onnx cannot export at SIZE (AlexNet's adaptive pooling to 6x6 of a smaller map); VGG, whose
#: pooling to 7x7 needs 224x224 too, is left out: numpy's float64 evaluation of it takes minutes and GBs.
MODEL_SIZES = {"alexnet": 224}
#: The opsets tried per model (all of OPSETS for resnet18; three for the others, to bound the run).
MODEL_OPSETS = {"resnet18": OPSETS, "alexnet": [7, 9, 11]}
OTHER_OPSETS = [7, 11, 17]


def _relative(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def _row(source, model, opset, **fields) -> dict:
    row = {"source": source, "model": model, "opset": opset, "input_size": [SIZE, SIZE], "status": "error",
           "logits_error": None, "gradient_error": None, "reference": None, "framework_logits_error": None,
           "framework_gradient_error": None, "framework_reference": None, "export_seconds": None, "reason": None,
           "notes": []}
    row.update(fields)
    return row


def _export(path: str, preset: str, row: dict, **options):
    """Export ``path`` (verified against the float64 graph); fill the row; return the written file or None."""
    from gradmap.graph import ExportError
    from gradmap.export._onnx_file import export_onnx

    out = Path(tempfile.mkdtemp(prefix="gradmap-coverage-")) / "model.onnx"
    start = time.perf_counter()
    try:
        report = export_onnx(path, out, preprocessing_options={"preset_name": preset}, target="cpu", **options)
    except ExportError as e:
        row.update(status="refused", reason=str(e).splitlines()[0][:300], export_seconds=time.perf_counter() - start)
        return None
    except Exception as e:  # a bug: recorded with its type, the run goes on
        row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                   export_seconds=time.perf_counter() - start)
        traceback.print_exc()
        return None
    row.update(status="exported", logits_error=report.logits_error, gradient_error=report.gradient_error,
               reference=report.reference, export_seconds=round(report.seconds, 2), notes=report.notes)
    return out


def _compare(out: Path, image, target, logits, gradient, row: dict, reference: str) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got_logits, got_gradient = session.run(["logits", "gradient"], {"image": image.astype(np.float32),
                                                                    "target": np.asarray(target, np.int64)})
    row.update(framework_logits_error=_relative(got_logits, logits),
               framework_gradient_error=_relative(got_gradient, gradient), framework_reference=reference)


# -- row makers ---------------------------------------------------------------------------------------

def torch_rows():
    for name in TORCHVISION:
        for opset in MODEL_OPSETS.get(name, OTHER_OPSETS):
            yield ("torch.onnx", name, opset), lambda name=name, opset=opset: _torch_row(name, opset)


def _torch_row(name: str, opset: int) -> dict:
    import warnings

    import torch
    import torchvision

    warnings.filterwarnings("ignore")
    size = MODEL_SIZES.get(name, SIZE)
    row = _row("torch.onnx", name, opset, input_size=[size, size])
    torch.manual_seed(0)
    module = getattr(torchvision.models, name)(weights=None, **({"aux_logits": False, "init_weights": True}
                                                               if name == "googlenet" else {})).eval()
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.5, 1.5)
    path = Path(tempfile.mkdtemp(prefix="gradmap-coverage-")) / f"{name}_opset{opset}.onnx"
    try:
        torch.onnx.export(module, torch.zeros(1, 3, size, size), str(path), opset_version=opset, dynamo=False,
                          input_names=["input"], output_names=["output"])
    except Exception as e:
        row.update(status="not exported", reason=f"torch.onnx: {str(e).splitlines()[0][:240]}")
        return row
    out = _export(str(path), "torchvision", row)
    if out is not None:
        image = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
        reference = module.double()
        x = torch.from_numpy(image.astype(np.float64)).requires_grad_(True)
        logits = reference(x)
        target = int(logits.argmax())
        (gradient,) = torch.autograd.grad(logits[0, target], x)
        _compare(out, image, [target], logits.detach().numpy(), gradient.numpy(), row, "torch autograd in float64")
    return row


def fixture_rows():
    import onnx

    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    for name, entry in sorted(manifest.items()):
        header = onnx.load(str(FIXTURES / f"{name}.onnx"), load_external_data=False)
        opset = max(o.version for o in header.opset_import if o.domain in ("", "ai.onnx"))
        yield (entry["source"], name, opset), lambda name=name, entry=entry, opset=opset: _fixture_row(name, entry, opset)


def _fixture_row(name: str, entry: dict, opset) -> dict:
    data = np.load(FIXTURES / f"{name}.npz")
    row = _row(entry["source"], name, opset, input_size=list(data["image"].shape[2:]))
    options = dict(entry["options"])
    preset = options.pop("preset_name")
    out = _export(str(FIXTURES / f"{name}.onnx"), preset, row, cam_layer=entry.get("cam_layer"), **options)
    if out is not None:
        _compare(out, data["image"], data["target"], data["logits"], data["gradient"], row, entry["reference"])
    return row


HAND_WRITTEN = {
    "lrn_alexnet_style": ("""
        g (float[N, 3, 64, 64] data) => (float[N, 10] prob) {
            c1 = Conv <kernel_shape = [5, 5], strides = [2, 2], pads = [2, 2, 2, 2]> (data, w1)
            r1 = Relu (c1)
            n1 = LRN <size = 5, alpha = 0.0001, beta = 0.75> (r1)
            p1 = MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (n1)
            c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (p1, w2)
            r2 = Relu (c2)
            n2 = LRN <size = 5, alpha = 0.0001, beta = 0.75> (r2)
            g = GlobalAveragePool (n2)
            f = Flatten (g)
            z = Gemm <transB = 1> (f, fc, b)
            prob = Softmax (z)
        }""", {"w1": (24, 3, 5, 5), "w2": (32, 24, 3, 3), "fc": (10, 32), "b": (10,)}, 18),
    "activations_zoo": ("""
        g (float[N, 3, 64, 64] data) => (float[N, 10] out) {
            c1 = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (data, w1)
            a1 = Selu (c1)
            c2 = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (a1, w2)
            a2 = PRelu (c2, slope)
            s = Softplus (a2)
            m = Mish (s)
            e = Elu (m)
            g = GlobalMaxPool (e)
            f = Flatten (g)
            out = Gemm <transB = 1> (f, fc, b)
        }""", {"w1": (16, 3, 3, 3), "w2": (16, 16, 3, 3), "slope": (16, 1, 1), "fc": (10, 16), "b": (10,)}, 18),
    "upsample_opset9_linear": ("""
        g (float[N, 3, 64, 64] data) => (float[N, 10] out) {
            c1 = Conv <kernel_shape = [3, 3], strides = [4, 4], pads = [1, 1, 1, 1]> (data, w1)
            r1 = Relu (c1)
            u = Upsample <mode = "linear"> (r1, scales)
            g = GlobalAveragePool (u)
            f = Flatten (g)
            out = Gemm <transB = 1> (f, fc, b)
        }""", {"w1": (8, 3, 3, 3), "fc": (10, 8), "b": (10,), "scales": None}, 9),
}


def hand_written_rows():
    for name, (text, weights, opset) in HAND_WRITTEN.items():
        yield ("hand-written", name, opset), lambda name=name, text=text, weights=weights, opset=opset: \
            _hand_written_row(name, text, weights, opset)


def _hand_written_row(name, text, weights, opset) -> dict:
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(f'<ir_version: {8 if opset >= 18 else 4}, opset_import: ["" : {opset}]>\n' + text)
    for key, shape in weights.items():
        array = np.asarray([1, 1, 2, 2], np.float32) if key == "scales" else \
            (rng.standard_normal(shape) * (0.3 if len(shape) == 4 else 0.5)).astype(np.float32)
        proto.graph.initializer.append(numpy_helper.from_array(array, key))
    path = Path(tempfile.mkdtemp(prefix="gradmap-coverage-")) / f"{name}.onnx"
    path.write_bytes(proto.SerializeToString())
    row = _row("hand-written", name, opset)
    _export(str(path), "torchvision", row)
    return row


# -- the table ----------------------------------------------------------------------------------------

def _fmt(value) -> str:
    return "" if value is None else f"{value:.1e}" if isinstance(value, float) else str(value)


def sections(data: dict) -> dict[str, str]:
    """The coverage table of docs/coverage-onnx.md, from a results file."""
    rows = data["rows"]
    exported = sum(r["status"] == "exported" for r in rows)
    lines = [_report.machine_line(data["meta"]), "",
             f"{exported} of {len(rows)} files export. Errors are max|Δ| / max|reference|.", ""]
    header = ["source", "model", "opset", "size", "status", "parity logits", "parity gradient", "framework logits",
              "framework gradient", "framework reference", "export s", "reason"]
    cells = []
    for r in rows:
        seconds = "" if r["export_seconds"] is None else format(r["export_seconds"], ".1f")
        cells.append([r["source"], r["model"], _fmt(r["opset"]), "x".join(str(d) for d in r["input_size"]),
                      r["status"], _fmt(r["logits_error"]), _fmt(r["gradient_error"]),
                      _fmt(r["framework_logits_error"]), _fmt(r["framework_gradient_error"]),
                      r["framework_reference"] or "", seconds, (r["reason"] or "").replace("|", "/")])
    return {"onnx": "\n".join(lines + _report.table(header, cells)) + "\n"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["torch", "fixtures", "hand-written"], action="append")
    parser.add_argument("--force", action="store_true", help="redo rows that exist")
    parser.add_argument("--models", default=None, metavar="A,B",
                        help="only the rows of these models (e.g. --only torch --models googlenet --force)")
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    if args.tables_only:
        data = _report.read_results(args.out)
    else:
        saved = _report.read_results(args.out) if Path(args.out).exists() else {"meta": {}, "rows": []}
        rows = saved["rows"]
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnx", "onnxruntime", "torch"))
        done_now: list[str] = []
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        makers = {"fixtures": fixture_rows, "hand-written": hand_written_rows, "torch": torch_rows}
        for kind in args.only or list(makers):
            for key, make in makers[kind]():
                if args.models and key[1] not in args.models.split(","):
                    continue
                done = [i for i, r in enumerate(rows) if (r["source"], r["model"], r["opset"]) == key]
                if done and not args.force:
                    continue
                print(f"{key} ...", flush=True)
                row = make()
                print(f"  {row['status']} {row['reason'] or ''}", flush=True)
                rows = [r for r in rows if (r["source"], r["model"], r["opset"]) != key] + [row]
                done_now.append(f"{key[0]}:{key[1]}:{key[2]}")
                rows.sort(key=lambda r: (r["source"], r["model"], r["opset"] or 0))
                run = _report.merge_update(meta, saved["meta"], done_now) if saved["rows"] else meta
                data = _report.write_results(args.out, run, rows, final=False)
        rows.sort(key=lambda r: (r["source"], r["model"], r["opset"] or 0))
        run = _report.merge_update(meta, saved["meta"], done_now) if saved["rows"] and done_now else \
            (meta if done_now or not saved["rows"] else saved["meta"])
        data = _report.write_results(args.out, run, rows, final=bool(done_now))
    if not args.no_docs:
        _report.publish(PAGE, sections(data))


if __name__ == "__main__":
    main()
