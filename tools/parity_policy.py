"""Measure the parity policy (gradmap.graph.parity.Tolerance) against correct models and planted wrong rules.

For each model, the exported gradmap model (onnxruntime, CPU, float32) is compared with its float64
reference on a few random batches, as the export's check compares it; each row records, per batch, the
reference's own float32 error (its float32 run with the same decisions against its float64 run) and the
model's error, for the logits and the gradient. Their ratio is what the policy's factor must cover; the
model's error where the own error is tiny is what its floor must cover; the own errors of correct
models are what its cap must grant. Then wrong rules are planted (a vector-Jacobian rule scaled by a
small factor, or with its sign flipped, in one op type) and the same comparison shows the error a
wrong graph makes, which the limits must refuse.

    python tools/parity_policy.py            # measure, write bench/results/parity_policy.json and docs/parity.md's table
    python tools/parity_policy.py --tables-only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import _report  # noqa: E402

RESULTS = _report.RESULTS / "parity_policy.json"
PAGE = "parity.md"
SECTIONS = ("policy",)
BATCHES = 3


def _planted(op: str, factor: float):
    """A context that scales the input gradient of ``op``'s rule by ``factor`` at the graph's first ``op``
    node (-1: flips its sign there; flipped at every node, two flips on one path would cancel)."""
    import contextlib

    from gradmap.graph.gradient import RULES

    @contextlib.contextmanager
    def planted():
        original = RULES[op]
        first = []

        def wrong(ctx, node, dy):
            grads = list(original(ctx, node, dy))
            first.append(first[0] if first else node.name)
            if node.name == first[0] and grads and grads[0] is not None:
                grads[0] = ctx.op("Mul", grads[0], ctx.scalar(factor))
            return grads

        RULES[op] = wrong
        try:
            yield
        finally:
            RULES[op] = original

    return planted()


def _torch_models():
    """(name, size, module factory) of the torch rows: 64x64 where the model allows it."""
    import torch

    def torchvision(name):
        def make():
            from gradmap.export import load_torchvision

            return load_torchvision(name, "none", seed=0)[0]
        return make

    def timm_model(name, **kwargs):
        def make():
            import timm

            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False, **kwargs).eval()
        return make

    def visformer():
        import timm

        torch.manual_seed(5)  # the case: timm's default init after manual_seed(5)
        return timm.create_model("visformer_tiny", pretrained=False).eval()

    return [
        ("resnet18", 64, torchvision("resnet18")),
        ("timm:visformer_tiny (seed 5)", 224, visformer),
        ("timm:vit_tiny_patch16_224 (img_size 64)", 64, timm_model("vit_tiny_patch16_224", img_size=64)),
        ("mobilenet_v3_small", 64, torchvision("mobilenet_v3_small")),
        ("efficientnet_b0", 64, torchvision("efficientnet_b0")),
        ("convnext_tiny", 64, torchvision("convnext_tiny")),
    ]


#: (model, op, factor) of the planted rules
PLANTED = [
    ("resnet18", "Conv", 1.01), ("resnet18", "Conv", 0.999), ("resnet18", "Add", -1.0),
    ("timm:vit_tiny_patch16_224 (img_size 64)", "Softmax", 1.01),
    ("timm:visformer_tiny (seed 5)", "Gelu", 1.01),
    ("onnx:resnet18 (torch.onnx opset 17)", "Conv", 1.01),
]


def _export(module, size, folder, planted=None):
    import contextlib

    import onnx

    from gradmap.contract import Preprocessing
    from gradmap.export import export_module

    path = Path(folder) / "model.onnx"
    with planted or contextlib.nullcontext():
        export_module(module, path, preprocessing=Preprocessing(crop=(size, size), resize=None), verify=False)
    return onnx.load(str(path))


def _measure(proto, reference, size, seed=0):
    """The per-batch figures of the export's own check (gradmap.graph.parity.verify_model's batches)."""
    import numpy as np

    from gradmap import contract
    from gradmap.graph import parity

    exposed = parity.expose_decisions(proto)
    session = parity._session(exposed.proto)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(BATCHES):
        images = rng.standard_normal((2, 3, size, size), dtype=np.float32)
        (plain,) = session.run([contract.OUTPUT_LOGITS], {contract.INPUT_IMAGE: images,
                                                          contract.INPUT_TARGET: np.full(2, -1, np.int64)})
        target = np.array([-1, (int(plain[1].argmax()) + 8) % plain.shape[1]])
        values, decisions = parity.run_model(session, exposed, images, target, ("vanilla",))
        check = parity.check_batch(values, reference, images, target, score="logit", backprops=("vanilla",),
                                   decisions=decisions)
        batches.append({"logits": check.logits_error, "own_logits": check.own_logits,
                        "gradient": check.gradient_error, "own_gradient": check.own_gradient,
                        "replayed": check.replayed, "passed": check.passed,
                        "unverifiable": check.unverifiable, "problems": check.problems})
    return batches


def torch_rows(only: set[str] | None, save=lambda rows: None):
    from gradmap.export._parity import TorchReference

    rows = []
    for name, size, make in _torch_models():
        if only and name not in only:
            continue
        module = make()
        for p in module.parameters():
            p.requires_grad_(False)
        reference = TorchReference(module)
        plants = [(op, f) for m, op, f in PLANTED if m == name]
        for op, factor in [(None, None), *plants]:
            start = time.perf_counter()
            print(f"{name} {op or ''} {factor or ''} ...", flush=True)
            with tempfile.TemporaryDirectory() as folder:
                proto = _export(module, size, folder, _planted(op, factor) if op else None)
            batches = _measure(proto, reference, size)
            rows.append({"model": name, "size": size, "reference": reference.name, "planted": op and f"{op} x{factor:g}",
                         "batches": batches, "seconds": time.perf_counter() - start})
            print("  ", _summary(rows[-1]), flush=True)
            save(rows)
    return rows


def onnx_rows(only: set[str] | None, save=lambda rows: None):
    import torch
    import torchvision

    from gradmap.export._foreign import prepare_classifier
    from gradmap.export._onnx_file import load_onnx
    from gradmap.export._onnx_reference import OnnxReference

    name = "onnx:resnet18 (torch.onnx opset 17)"
    if only and name not in only:
        return []
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "resnet18.onnx"
        torch.manual_seed(0)
        module = torchvision.models.resnet18().eval()
        torch.onnx.export(module, (torch.zeros(1, 3, 64, 64),), str(source), opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["scores"],
                          dynamic_axes={"input": {0: "N"}, "scores": {0: "N"}})
        reference = OnnxReference(prepare_classifier(load_onnx(source)).model)
        plants = [(op, f) for m, op, f in PLANTED if m == name]
        for op, factor in [(None, None), *plants]:
            start = time.perf_counter()
            print(f"{name} {op or ''} {factor or ''} ...", flush=True)
            import contextlib

            from gradmap.contract import Preprocessing
            from gradmap.export._foreign import export_graph

            import onnx

            out = Path(folder) / "model.onnx"
            with _planted(op, factor) if op else contextlib.nullcontext():
                export_graph(prepare_classifier(load_onnx(source)), out,
                             preprocessing=Preprocessing(crop=(64, 64), resize=None), verify=False)
            # the planted rule sits in the exported model only: the float64 graph's gradient is the correct one's
            batches = _measure(onnx.load(str(out)), reference, 64)
            rows.append({"model": name, "size": 64, "reference": reference.name,
                         "planted": op and f"{op} x{factor:g}", "batches": batches,
                         "seconds": time.perf_counter() - start})
            print("  ", _summary(rows[-1]), flush=True)
            save(rows)
    return rows


def _summary(row) -> str:
    b = row["batches"]
    return (f"logits {max(x['logits'] for x in b):.2g} (own {max(x['own_logits'] for x in b):.2g}), "
            f"gradient {max(x['gradient'] for x in b):.2g} (own {max(x['own_gradient'] for x in b):.2g}), "
            f"{sum(x['passed'] for x in b)}/{len(b)} batches pass")


def sections(data: dict) -> dict[str, str]:
    from gradmap.graph.parity import TOLERANCE

    rows = data["rows"]
    lines = [_report.machine_line(data["meta"]), "",
             f"Policy: limit = max({TOLERANCE.floor:g}, {TOLERANCE.factor:g} × own error), cap {TOLERANCE.cap:g}. "
             f"{BATCHES} random batches of 2 per row; errors are max|Δ| / max|float64 reference|, the largest over "
             "the batches; *ratio* is the largest model error / own error of a batch.", ""]
    header = ["model", "size", "planted rule", "logits (own)", "gradient (own)", "ratio logits / gradient",
              "batches within limits"]
    cells = []
    for r in rows:
        b = r["batches"]
        ratio = lambda k: max((x[k] / x[f"own_{k}"] for x in b if x[f"own_{k}"] > 0), default=float("nan"))  # noqa: E731
        cells.append([r["model"], r["size"], r["planted"] or "none (correct)",
                      f"{max(x['logits'] for x in b):.2g} ({max(x['own_logits'] for x in b):.2g})",
                      f"{max(x['gradient'] for x in b):.2g} ({max(x['own_gradient'] for x in b):.2g})",
                      f"{ratio('logits'):.2g} / {ratio('gradient'):.2g}" if not r["planted"] else "",
                      f"{sum(x['passed'] for x in b)}/{len(b)}"])
    return {"policy": "\n".join(lines + _report.table(header, cells)) + "\n"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="only this row's model (repeatable)")
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    if args.tables_only:
        data = _report.read_results(args.out)
    else:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        only = set(args.model) if args.model else None
        saved = _report.read_results(args.out) if Path(args.out).exists() else {"meta": {}, "rows": []}
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnx", "onnxruntime", "torch", "timm"))
        done: list[dict] = []

        def save(new_rows, final=False):
            measured = {r["model"] for r in [*done, *new_rows]}
            kept = [r for r in saved["rows"] if r["model"] not in measured]
            return _report.write_results(args.out, meta, kept + done + list(new_rows), final=final)

        done += onnx_rows(only, save)
        done += torch_rows(only, save)
        data = save([], final=True)
    if not args.no_docs:
        _report.publish(PAGE, sections(data))


if __name__ == "__main__":
    main()
