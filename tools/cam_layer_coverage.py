"""``--cam-layer auto`` on every transformer-style model of the coverage tables, as data: which layer
it finds, the map's grid, and that the map is right; or the exact refusal. Writes
bench/results/cam_layer_auto.json and the "CAM layer (auto)" table of docs/coverage.md.

    python tools/cam_layer_coverage.py                   # every model, resuming rows already recorded
    python tools/cam_layer_coverage.py --only timm:beit --only hf:swin --only torchvision:swin_t
    python tools/cam_layer_coverage.py --tables-only     # the docs table again from the results file
    python tools/cam_layer_coverage.py --layers-only     # which rows a change to auto's rules moves

The models are the coverage tables' own (the same builders and input sizes): torchvision's ViT,
Swin, Swin V2 and MaxViT at their 224x224 with random weights (``gradmap export NAME --weights
none``); the model of every timm family (tools/timm_coverage.py's selection, recorded in
bench/results/coverage.json) and every Transformers architecture of that table whose modules
include attention (a module class named ``*Attention*``, ``*Attn*``, ``MHSA``/``GPSA`` (ConViT) or
``LiteMLA`` (EfficientViT), less the CNNs' channel attention of ResNeSt and SKNet), plus FastViT;
at the input size their coverage row ran at.

Each model is traced as ``gradmap export`` traces it and given the gradient with ``cam_layer="auto"``.
A layer found is checked against float64 torch on the same random pictures (batch 2, the top
class): the layer's output and its gradient, hooked on the torch module the exporter's name
scopes name, reshaped by pytorch-grad-cam's ViT recipe (``tensor[:, p:].reshape(N, h, w, C)``,
channels first) for a token map, ``permute(0, 3, 1, 2)`` for a channels-last (Swin) map, as they
are for an NCHW map; and Grad-CAM against pytorch-grad-cam's GradCAM with that reshape_transform on
the same module (both min-max scaled on the layer's grid). Where timm declares its prefix tokens
(``num_prefix_tokens``), the prefix must equal it. ``found`` needs every error within 1e-4 (of
max|torch| for the maps; absolute for Grad-CAM's [0, 1] maps); otherwise the row is ``failing``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import re
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
import timm_coverage  # noqa: E402

RESULTS = _report.RESULTS / "cam_layer_auto.json"
PAGE, SECTIONS = "coverage.md", ("cam_auto",)
TOLERANCE = 1e-4
TORCHVISION = ("vit_b_16", "swin_t", "swin_v2_t", "maxvit_t")
_ATTENTION_CLASS = re.compile(r"Attention|Attn|^MHSA$|^GPSA$|^LiteMLA$")
_CHANNEL_ATTENTION = {"SplitAttn", "SelectiveKernelAttn"}  # ResNeSt's, SKNet's: CNNs
_ALSO = {"timm": {"fastvit"}}  # FastViT: its smallest model has no attention block; the issue names it


def is_transformer_style(module) -> bool:
    return any(_ATTENTION_CLASS.search(type(m).__name__) and type(m).__name__ not in _CHANNEL_ATTENTION
               for m in module.modules())


def models() -> list[dict]:
    """Every model of the table: source, family, model name, input size (the coverage row's)."""
    import timm
    import torch
    import transformers

    coverage = timm_coverage.load_coverage()
    chosen = [{"source": "torchvision", "family": name, "model": name, "input": [224, 224]} for name in TORCHVISION]
    for family, name in sorted(coverage["selection"].items()):
        row = coverage["timm"].get(family, {})
        if row.get("status") != "ok":
            continue
        with torch.device("meta"):
            module = timm.create_model(name)
        if is_transformer_style(module) or family in _ALSO["timm"]:
            chosen.append({"source": "timm", "family": family, "model": name, "input": row["input"],
                           **({"depth": row["depth"]} if "depth" in row else {})})
    for model_type, row in sorted(coverage["hf"].items()):
        if row.get("status") != "ok":
            continue
        config = timm_coverage._shrink(transformers.AutoConfig.for_model(model_type), row["input"][0])
        model_class = transformers.AutoModelForImageClassification._model_mapping[type(config)]
        model_class = model_class[0] if isinstance(model_class, tuple) else model_class
        with torch.device("meta"):
            module = model_class._from_config(config)
        if is_transformer_style(module):
            chosen.append({"source": "hf", "family": model_type, "model": model_type, "input": row["input"]})
    return chosen


def build(entry: dict):
    """The torch module of a table row, as its coverage row built it (random weights, seed 0)."""
    size = tuple(entry["input"])
    if entry["source"] == "torchvision":
        from gradmap.export._torchvision import load_torchvision

        return load_torchvision(entry["model"], "none")[0]
    if entry["source"] == "timm":
        if "depth" in entry:
            return timm_coverage.timm_shallow(entry["model"], size)
        from gradmap.export._timm import load_timm

        return load_timm(entry["model"], "none", img_size=size)[0]
    return timm_coverage.hf_classifier(entry["model"], size)[0]


def _pictures(size, batch=2, seed=3):
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.standard_normal((batch, 3, *size)), sigma=(0, 0, 2, 2)) * 3).astype(np.float32)


def _reference_reshape(layout: str, prefix: int, grid):
    """pytorch-grad-cam's reshape_transform for the layer: its ViT recipe for tokens (``prefix``
    tokens dropped, the rest on the (h, w) grid), a permute for channels last."""
    def tokens(tensor):
        patches = tensor[:, prefix:, :]
        return patches.reshape(tensor.size(0), grid[0], grid[1], tensor.size(2)).permute(0, 3, 1, 2)

    def channels_last(tensor):
        return tensor.permute(0, 3, 1, 2)

    return {"tokens": tokens, "nhwc": channels_last, "nchw": None}[layout]


def _tap(root, name: str):
    """An Identity on the output of ``root``'s module ``name``, installed around it: a Transformers
    block returns a tuple, whose first tensor is the layer; hooks (pytorch-grad-cam's too) need a tensor."""
    import torch

    class Tapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.tap = inner, torch.nn.Identity()

        def forward(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            return (self.tap(out[0]), *out[1:]) if isinstance(out, tuple) else self.tap(out)

    parent, _, child = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    wrapped = Tapped(getattr(owner, child))
    setattr(owner, child, wrapped)
    return wrapped.tap


def _rel(actual, expected) -> float:
    import numpy as np

    if actual.shape != expected.shape:
        raise AssertionError(f"shape {list(actual.shape)} != torch's {list(expected.shape)}")
    scale = float(np.abs(expected).max())
    return float(np.abs(actual - expected).max() / scale) if scale > 0 else float("inf")


def _auto_layer(module, size):
    """(ONNX model, CamLayer): ``module`` traced at ``size`` with its parameters frozen, and the layer
    ``--cam-layer auto`` resolves on it. Raises ExportError where auto refuses."""
    from gradmap.export._trace import trace_to_onnx
    from gradmap.graph.gradient import prepare

    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    model = trace_to_onnx(module, tuple(size), opset=18)
    return model, prepare(model, cam_layer="auto").layer


def _layer_fields(layer) -> dict:
    return {"layer": layer.module, "value": layer.name, "layout": layer.layout,
            "grid": list(layer.grid) if layer.grid else list(layer.value.shape)[2:4]}


def resolve(module, size) -> dict:
    """``--cam-layer auto`` on ``module`` traced at ``size``, unchecked: the row's layer fields, or the
    refusal."""
    from gradmap.graph import ExportError

    try:
        return _layer_fields(_auto_layer(module, size)[1])
    except ExportError as e:
        return {"status": "refused", "reason": str(e)}


def _moved(row: dict, recorded: dict) -> list[str]:
    """How ``row`` (:func:`resolve`) differs from the recorded row: the fields that changed."""
    if row.get("status") == "refused" or recorded.get("status") == "refused":
        same = row.get("status") == recorded.get("status") and row.get("reason") == recorded.get("reason")
        return [] if same else [f"status {recorded.get('status')} -> {row.get('status', 'found')}"]
    return [f"{key} {recorded.get(key)} -> {row[key]}" for key in ("layer", "value", "layout", "grid")
            if recorded.get(key) != row[key]]


def layers_only(entries: list[dict], done: dict) -> int:
    """Resolve auto on each model and compare with its recorded row (nothing written); the count of
    rows that moved, each printed with what changed (re-measure those with --only)."""
    moved = 0
    for entry in entries:
        key = f"{entry['source']}:{entry['family']}"
        try:
            row = resolve(build(entry), entry["input"])
        except Exception as e:  # noqa: BLE001 - a row of the report
            row = {"status": "error", "reason": timm_coverage._first_line(e)}
        finally:
            gc.collect()
        recorded = done.get((entry["source"], entry["family"]))
        changes = ["not traced: " + row["reason"]] if row.get("status") == "error" else (
            ["not recorded"] if recorded is None else _moved(row, recorded))
        moved += bool(changes)
        name = row.get("layer") or row.get("value") or row.get("status")
        print(f"{key}: {'; '.join(changes) if changes else 'same'} ({name})", flush=True)
    print(f"{moved} of {len(entries)} rows moved")
    return moved


def probe(module, size) -> dict:
    """Trace ``module``, resolve ``--cam-layer auto`` and check the map (see the module docstring)."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime
    import torch

    from gradmap import contract
    from gradmap.graph import ExportError
    from gradmap.graph._model import add_gradient
    from gradmap.runtime.cam import grad_cam

    module = module.eval()
    reference = copy.deepcopy(module).double()  # before _auto_layer freezes the module's parameters
    try:
        model, layer = _auto_layer(module, size)
    except ExportError as e:
        return {"status": "refused", "reason": str(e)}
    fields = _layer_fields(layer)
    row = {"status": "found", "layer": fields["layer"], "value": fields["value"], "layout": fields["layout"],
           "prefix": layer.prefix, "grid": fields["grid"]}
    add_gradient(model, cam_layer=layer.name, target="portable")
    session = onnxruntime.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    image = _pictures(size)
    names = [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_CAM_ACTIVATION,
             contract.OUTPUT_CAM_GRADIENT]
    out = dict(zip(names, session.run(names, {"image": image, "target": np.array([-1, -1], dtype=np.int64)})))
    row["map"] = list(out[contract.OUTPUT_CAM_ACTIVATION].shape[1:])
    if layer.module is None:
        row["status"] = "unchecked"
        row["reason"] = f"the ONNX value {layer.name} is no torch module's output: no module to hook for the reference"
        return row
    declared = getattr(module, "num_prefix_tokens", None)
    if layer.layout == "tokens" and isinstance(declared, int) and declared != layer.prefix:
        row["declared_prefix"] = declared
    hooked = _tap(reference, layer.module)
    reshape = _reference_reshape(layer.layout, layer.prefix, layer.grid)
    kept = {}

    def hook(_, __, output):
        output.register_hook(lambda grad: kept.__setitem__("gradient", grad))
        kept["activation"] = output
        kept["calls"] = kept.get("calls", 0) + 1

    handle = hooked.register_forward_hook(hook)
    try:
        logits = reference(torch.from_numpy(image).double())
        targets = torch.from_numpy(out[contract.OUTPUT_TARGET_INDEX])
        logits.gather(1, targets[:, None]).sum().backward()
    finally:
        handle.remove()
    as_map = reshape or (lambda t: t)
    if kept["calls"] > 1:
        row["status"] = "failing"
        row["reason"] = (f"{layer.module} runs {kept['calls']} times in the forward pass (one module instance used "
                         "twice): a hook on it cannot tell which output the map is")
        return row
    row["logits_error"] = _rel(out[contract.OUTPUT_LOGITS], logits.detach().numpy())
    try:
        row["activation_error"] = _rel(out[contract.OUTPUT_CAM_ACTIVATION],
                                       as_map(kept["activation"]).detach().numpy())
    except AssertionError as e:  # the module the name scopes give is not the value's (a scope misattributed)
        row["status"] = "failing"
        row["reason"] = f"the map is not {layer.module}'s output in torch: {e}"
        return row
    row["gradient_error"] = _rel(out[contract.OUTPUT_CAM_GRADIENT], as_map(kept["gradient"]).detach().numpy())
    row["grad_cam_error"] = _grad_cam_error(reference, hooked, reshape, image, out, grad_cam)
    problems = [f"{what} {row[key]:.1e}" for what, key in (("activation", "activation_error"),
                                                            ("gradient", "gradient_error"),
                                                            ("Grad-CAM", "grad_cam_error"))
                if not row[key] <= TOLERANCE]
    if "declared_prefix" in row:
        problems.append(f"{layer.prefix} prefix token(s) dropped, the model declares {row['declared_prefix']}")
    if problems:
        row["status"] = "failing"
        row["reason"] = "; ".join(problems)
    return row


def _grad_cam_error(reference, layer, reshape, image, out, grad_cam) -> float:
    """max|Δ| between gradmap's Grad-CAM and pytorch-grad-cam's on the layer's grid, both min-max scaled."""
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from gradmap import contract

    activation = out[contract.OUTPUT_CAM_ACTIVATION]
    cam = GradCAM(model=reference, target_layers=[layer], reshape_transform=reshape)
    # compare on the layer's grid: pytorch-grad-cam min-max scales, then resizes to this size
    cam.get_target_width_height = lambda input_tensor: (activation.shape[3], activation.shape[2])
    targets = [ClassifierOutputTarget(int(t)) for t in out[contract.OUTPUT_TARGET_INDEX]]
    try:
        expected = cam(input_tensor=torch.from_numpy(image).double(), targets=targets)
    finally:
        cam.activations_and_grads.release()

    def scaled(maps):  # pytorch-grad-cam's scale_cam_image without the resize, per layer then overall
        maps = maps - maps.min(axis=(1, 2), keepdims=True)
        return (maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))).astype(np.float32)

    ours = scaled(scaled(grad_cam(activation, out[contract.OUTPUT_CAM_GRADIENT])))
    return float(np.abs(ours - expected).max())


# -- the table ---------------------------------------------------------------------------------------------------


def _label(row: dict) -> str:
    prefix = {"torchvision": "", "timm": "timm:", "hf": "hf:"}[row["source"]]
    depth = f" (depth {row['depth']})" if "depth" in row else ""
    family = "" if row["source"] == "torchvision" or row["family"] == row["model"] else f" ({row['family']})"
    return f"{prefix}{row['model']}{family}{depth}"


def _map_cell(row: dict) -> str:
    if "grid" not in row:
        return "-"
    grid = "x".join(str(g) for g in row["grid"])
    if row["layout"] == "tokens":
        dropped = f", {row['prefix']} prefix token{'s' if row['prefix'] != 1 else ''} dropped" if row["prefix"] else ""
        cell = f"{grid} tokens{dropped}"
    elif row["layout"] == "nhwc":
        cell = f"{grid}, channels last"
    else:
        cell = f"{grid} feature map"
    return cell + (" (one cell at this input size: Grad-CAM is constant)" if row["grid"] == [1, 1] else "")


def _check_cell(row: dict) -> str:
    status = row.get("status")
    if status == "refused":
        return f"**refused**: {row['reason']}"
    if status in ("error", "not run", "unchecked"):
        return f"**{status}**: {row.get('reason', '')}"
    if "activation_error" not in row or status == "failing" and "gradient_error" not in row:
        return f"**{status}**: {row.get('reason', '')}"
    figures = (f"activation {row['activation_error']:.1e}, gradient {row['gradient_error']:.1e}, "
               f"Grad-CAM {row['grad_cam_error']:.1e}")
    return figures if status == "found" else f"**failing**: {row['reason']} ({figures})"


def table(data: dict) -> str:
    measured = {(r["source"], r["family"]) for r in data["rows"]}
    rows = data["rows"] + [{**e, "status": "not run", "reason": "not reached yet"}
                           for e in data.get("selection", []) if (e["source"], e["family"]) not in measured]
    counts = {s: sum(1 for r in rows if r.get("status") == s)
              for s in ("found", "unchecked", "refused", "failing", "error", "not run")}
    lines = [
        _report.machine_line(data["meta"]), "",
        f"Generated by `python tools/cam_layer_coverage.py`: `--cam-layer auto` on the {len(rows)} transformer-style "
        "models of the tables above (same builders, random weights, same input sizes). "
        f"{counts['found']} found and checked, "
        + (f"{counts['unchecked']} found without a torch module to check against, " if counts["unchecked"] else "")
        + f"{counts['refused']} refused with the reason, "
        f"{counts['failing']} failing the check" + (f", {counts['error']} not traced" if counts["error"] else "")
        + (f", {counts['not run']} not run yet" if counts["not run"] else "") + ". "
        "Check: the layer's output and gradient against float64 torch hooked on the same module (max|Δ| / "
        "max|torch|), through pytorch-grad-cam's reshape (its ViT recipe for tokens, a permute for channels last), "
        "and Grad-CAM against pytorch-grad-cam's GradCAM with that reshape_transform (max|Δ| of [0, 1] maps); "
        f"each within {TOLERANCE:.0e}.", "",
    ]
    body = [[_label(r), "x".join(map(str, r["input"])), f"`{r['layer']}`" if r.get("layer") else
             (f"`{r['value']}`" if r.get("value") else "-"), _map_cell(r), _check_cell(r).replace("|", "\\|")]
            for r in sorted(rows, key=lambda r: ({"torchvision": 0, "timm": 1, "hf": 2}[r["source"]], r["family"]))]
    lines += _report.table(["model", "input", "CAM layer (auto)", "map", "check"], body)
    return "\n".join(lines) + "\n"


def sections(data: dict) -> dict[str, str]:
    return {"cam_auto": table(data)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="SOURCE:FAMILY (torchvision:swin_t, timm:beit, hf:vit)")
    parser.add_argument("--skip", action="append", default=[], help="SOURCE:FAMILY to leave out of this run")
    parser.add_argument("--per-model", type=int, default=300, help="CPU seconds for one model")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results")
    parser.add_argument("--memory-gb", type=int, default=8, help="data memory limit of the run (shared machines)")
    parser.add_argument("--layers-only", action="store_true",
                        help="resolve --cam-layer auto on each model (every one, or --only's) and compare with the "
                             "recorded row, without checking the map or writing anything: the rows a change to "
                             "auto's rules moves (exit status 1 if any), to re-measure with --only")
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.tables_only:
        data = _report.read_results(args.out)
        if not args.no_docs:
            _report.publish(PAGE, sections(data))
        return
    import torch

    saved = _report.read_results(args.out) if args.out.exists() and not args.fresh else {"meta": {}, "rows": []}
    done = {(r["source"], r["family"]): r for r in saved["rows"]}
    meta = _report.start_run(PAGE, SECTIONS, versions=("timm", "transformers", "torch", "torchvision", "onnxruntime",
                                                       "grad-cam"))
    entries = selection = models()
    if args.only:
        entries = [e for e in entries if f"{e['source']}:{e['family']}" in args.only
                   or f"{e['source']}:{e['model']}" in args.only]
    elif not args.layers_only:
        entries = [e for e in entries if (e["source"], e["family"]) not in done]
    entries = [e for e in entries if f"{e['source']}:{e['family']}" not in args.skip]
    torch.set_num_threads(1)
    # a model that needs more memory fails with MemoryError instead of waking the OOM killer
    resource.setrlimit(resource.RLIMIT_DATA, (args.memory_gb << 30, resource.RLIM_INFINITY))
    if args.layers_only:
        sys.exit(1 if layers_only(entries, done) else 0)
    signal.signal(signal.SIGPROF, timm_coverage._alarm)
    remeasured = []
    for entry in entries:
        start = time.process_time()
        signal.setitimer(signal.ITIMER_PROF, args.per_model)
        try:
            row = probe(build(entry), entry["input"])
        except timm_coverage.Timeout:
            row = {"status": "error", "reason": f"no result within {args.per_model} CPU seconds"}
        except Exception as e:  # noqa: BLE001 - a row of the table
            traceback.print_exc()
            row = {"status": "error", "reason": timm_coverage._first_line(e)}
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            gc.collect()
        row = {**entry, **row, "seconds": round(time.process_time() - start, 1)}
        done[(entry["source"], entry["family"])] = row
        remeasured.append(f"{entry['source']}:{entry['family']}")
        print(f"{_label(row)}: {row['status']} {row.get('layer') or ''} {_map_cell(row)} {row.get('reason', '')}",
              flush=True)
        run_meta = _report.merge_update(meta, saved["meta"], remeasured) if saved["meta"] else meta
        data = _report.write_results(args.out, run_meta, list(done.values()), final=False, selection=selection)
    run_meta = _report.merge_update(meta, saved["meta"], remeasured) if saved["meta"] and remeasured else meta
    data = _report.write_results(args.out, run_meta, list(done.values()), final=True, selection=selection)
    if not args.no_docs:
        _report.publish(PAGE, sections(data))


if __name__ == "__main__":
    main()
