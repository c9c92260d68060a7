"""The CAM family, the forward-only methods and the attention methods per picture: gradmap's runtime
against the reference implementations.

    python bench/bench_forward.py [--models resnet50 vit_b_16] [--score-cam-models resnet18]
    python bench/bench_forward.py --models vit_b_16 --update --note "..."   # re-measured rows replace
                                                                          # theirs, the others are kept
    python bench/bench_forward.py --tables-only     # the docs table again from bench/results/forward_methods.json

One photograph (scikit-image's chelsea, torchvision's ImageNet preprocessing), top-1 class, random
weights, 2 threads for onnxruntime and torch, the same settings on both sides:

  forward, ``--forward-batch`` masked copies per call: onnxruntime's forward (the cut-out forward part
    that occlusion, RISE and Score-CAM run) against torch's; the floor of those methods;
  occlusion, window 56, stride 56 (4 x 4 = 16 windows on 224 x 224), black baseline:
    gradmap ``attribute`` (``gradmap run --method occlusion``) against Captum's ``Occlusion`` with
    ``perturbations_per_eval`` 16 (the windows 16 at a time);
  RISE, 64 masks, grid 7, p 0.5: gradmap against the paper's recipe in torch, the masks made once
    beforehand (not timed) as the authors' code does, 32 masked copies per forward call;
  HiResCAM, XGradCAM, LayerCAM, EigenCAM: gradmap (one run of the exported graph, forward and
    gradient) against pytorch-grad-cam (forward and backward in torch) on the layer its documentation
    picks: a ResNet's ``layer4``; a ViT's ``encoder.layers[-1].ln_1`` with its ViT
    ``reshape_transform`` (gradmap: ``--cam-layer auto``, which finds the same layer);
  Score-CAM, 64 copies per call on both sides, timed whole on ``--score-cam-models`` (resnet18: 512
    channels, 512 masked forward passes) and on models whose CAM layer has at most
    ``--score-cam-max-channels``; on the others (resnet50's 2048, vit_b_16's 768 take minutes per side
    on 2 cores) the table gives the time per masked copy from the forward row; its floor,
    onnxruntime's forward on pytorch-grad-cam's calls (the picture, then the masked copies 64 at a
    time), is timed in the same rounds, as occlusion's and RISE's are;
  attention rollout (head mean; on the full export and on the forward-only one) and attention
    relevance on a ViT: gradmap (``gradmap export --attention``) against the papers' rules in torch
    (bench/attention_reference.py, the tests' reference) on the ViT with its attention written out.

Each pair is checked to compute the same map first (the largest difference reported in the results;
that call is each side's warm-up); then the two sides run in turn, round by round (bench_speed.py's
interleaving), and the table reports medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

import _report

DEFAULT_MODELS = ["resnet50", "vit_b_16"]
RESULTS = _report.RESULTS / "forward_methods.json"
PAGE, SECTIONS = "benchmarks.md", ("forward-methods-speed",)
WINDOW, STRIDE = 56, 56
MASKS, GRID, P = 64, 7, 0.5
CAM_CLASSES = {"hirescam": "HiResCAM", "xgrad-cam": "XGradCAM", "layer-cam": "LayerCAM", "eigen-cam": "EigenCAM"}
ATTENTION_METHODS = ("attention-rollout", "attention-relevance")
#: gradmap's --cam-layer per model; a ViT's ``auto`` is pytorch-grad-cam's documented layer (checked by the maps)
CAM_LAYERS = {"resnet50": "layer4", "resnet18": "layer4", "vit_b_16": "auto"}
#: masked copies per call of the forward row: the floor of occlusion, RISE and Score-CAM
FORWARD_BATCH = 16
#: masked copies per forward call of Score-CAM on both sides (pytorch-grad-cam's batch_size, gradmap's mask_batch)
SCORE_CAM_BATCH = 64
TARGET = 1.5


def picture(size=(224, 224)) -> np.ndarray:
    from PIL import Image
    from skimage import data

    from gradmap.contract import Preprocessing
    from gradmap.runtime.preprocess import preprocess

    tensor, _ = preprocess(Image.fromarray(data.chelsea()), Preprocessing(crop=size, resize=256))
    return tensor.reshape(1, 3, *size)


def tokens_to_grid(prefix: int = 1):
    """pytorch-grad-cam's ViT ``reshape_transform`` (its vision-transformer tutorial): [N, tokens, C]
    -> [N, C, side, side], the ``prefix`` class tokens dropped."""
    def reshape(tensor):
        patches = tensor[:, prefix:, :]
        side = int(round(patches.shape[1] ** 0.5))
        return patches.reshape(tensor.size(0), side, side, tensor.size(2)).permute(0, 3, 1, 2)
    return reshape


def is_vit(module) -> bool:
    """A torchvision VisionTransformer (its class token and encoder layers)."""
    return hasattr(module, "class_token") and hasattr(module, "encoder")


def reference_cam_layer(module):
    """pytorch-grad-cam's target layer and reshape_transform for a torchvision classifier, as its
    documentation picks them: a ResNet's ``layer4``; a ViT's last encoder block's first LayerNorm
    (``encoder.layers[-1].ln_1``, timm's ``blocks[-1].norm1``) with the class token dropped. Returns
    (layer, reshape_transform or None, the layer's module name)."""
    if is_vit(module):
        names = {m: n for n, m in module.named_modules()}
        layer = module.encoder.layers[-1].ln_1
        return layer, tokens_to_grid(1), names[layer]
    return module.layer4, None, "layer4"


def _scaled(maps: np.ndarray) -> np.ndarray:
    maps = maps - maps.min(axis=(-2, -1), keepdims=True)
    return maps / (maps.max(axis=(-2, -1), keepdims=True) + 1e-7)


def reference_cam(module, method: str, batch: int = SCORE_CAM_BATCH):
    """pytorch-grad-cam's class for ``method`` on ``module``'s documented layer (:func:`reference_cam_layer`)."""
    import pytorch_grad_cam as pgc

    layer, reshape, _ = reference_cam_layer(module)
    cls = "ScoreCAM" if method == "score-cam" else CAM_CLASSES[method]
    cam = getattr(pgc, cls)(model=module, target_layers=[layer], reshape_transform=reshape)
    cam.batch_size = batch
    return cam


def cam_spec(method: str):
    from gradmap.runtime.methods import MethodSpec

    # EigenCAM: the sign pytorch-grad-cam keeps (LAPACK's), so that both compute the same map
    return MethodSpec(method, mask_batch=SCORE_CAM_BATCH, **({"orientation": "svd"} if method == "eigen-cam" else {}))


def reference_attention(module, method: str, size: tuple[int, int]):
    """The papers' attention rollout (head mean) or relevance (bench/attention_reference.py) on a copy
    of torchvision ViT ``module`` with its attention written out: fn(x, target) -> the class token's
    map on the patch grid [side, side] and upsampled (bilinear) to ``size``."""
    import copy

    import torch
    import torch.nn.functional as F

    import attention_reference

    written = copy.deepcopy(module).requires_grad_(True)
    kept = attention_reference.write_out_attention(written)

    def fn(x, target):
        kept.clear()
        if method == "attention-rollout":
            with torch.no_grad():
                written(x)
                row = attention_reference.rollout(kept, "mean")
        else:
            logits = written(x)
            gradients = torch.autograd.grad(logits[0, target], kept)
            row = attention_reference.relevance([a.detach() for a in kept], list(gradients))
        side = int(round(row.shape[1] ** 0.5))
        grid = row.reshape(1, 1, side, side)
        return grid[0, 0], F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]
    return fn


def gradmap_attention_grid(model, method: str, image: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """gradmap's attention map on the patch grid (before upsampling) [side, side], for the comparison."""
    from gradmap import contract
    from gradmap.runtime.attention import attention_relevance, attention_rollout, token_map

    outs = model.run_outputs(image, targets, (contract.OUTPUT_ATTENTION, contract.OUTPUT_ATTENTION_GRADIENT)
                             if method == "attention-relevance" else (contract.OUTPUT_ATTENTION,))
    relevance = (attention_relevance(outs[contract.OUTPUT_ATTENTION], outs[contract.OUTPUT_ATTENTION_GRADIENT])
                 if method == "attention-relevance" else attention_rollout(outs[contract.OUTPUT_ATTENTION], "mean"))
    return token_map(relevance, model.metadata.attention)[0]


def bench_model(name: str, threads: int, repeat: int, budget_s: float, methods: list[str],
                score_cam_max_channels: int = 512, forward_batch: int = FORWARD_BATCH) -> list[dict]:
    import torch

    from bench_speed import _interleaved_times
    from gradmap.export._api import export_torchvision
    from gradmap.export._torchvision import load_torchvision
    from gradmap.runtime import perturbation
    from gradmap.runtime.methods import MethodSpec, attribute, baseline_image
    from gradmap.runtime.model import SaliencyModel

    torch.set_num_threads(threads)
    layer = CAM_LAYERS.get(name)
    folder = Path(tempfile.mkdtemp())
    path = folder / f"{name}.onnx"
    print(f"{name}: exporting (--cam-layer {layer})", flush=True)
    export_torchvision(name, path, weights="none", cam_layer=layer, verify=False)
    model = SaliencyModel(path, provider="cpu", threads=threads)
    module, _ = load_torchvision(name, "none")
    module.eval()
    image = picture(model.input_size)
    x = torch.from_numpy(image)
    target = int(model.run_outputs(image, None, ("target_index",))["target_index"][0])
    targets = np.array([target])
    pre = model.metadata.preprocessing
    black = baseline_image(image, "black", pre.mean, pre.std)
    rows = []

    def record(method, settings, gradmap_fn, reference_fn, reference, error, floor_fn=None, **extra):
        """Time the two sides in turn; ``floor_fn``: onnxruntime's forward on the batches the
        reference's forward calls take, a third variant in the same rounds."""
        print(f"{name} {method}: max difference {error:.3g}; timing", flush=True)
        load_start = _report._load_1min()
        variants = {"gradmap": gradmap_fn, "reference": reference_fn}
        if floor_fn is not None:
            floor_fn()  # its warm-up; the comparison call before was the two sides'
            variants["floor"] = floor_fn
        times = _interleaved_times(variants, warmup=0, repeat=repeat, budget_s=budget_s)
        g, r = statistics.median(times["gradmap"]), statistics.median(times["reference"])
        if floor_fn is not None:
            extra["floor_ms"] = statistics.median(times["floor"])
        rows.append({"model": name, "method": method, "settings": settings, "reference": reference,
                     "gradmap_ms": g, "reference_ms": r, "speedup": r / g, "rounds": len(times["gradmap"]),
                     "max_difference": error, "load_average_start": load_start,
                     "load_average_end": _report._load_1min(),
                     "times_ms": {k: [round(t, 1) for t in v] for k, v in times.items()}, **extra})
        print(f"  gradmap {g:.0f} ms, {reference} {r:.0f} ms, {r / g:.2f}x"
              + (f", floor {extra['floor_ms']:.0f} ms" if "floor_ms" in extra else ""), flush=True)

    if "forward" in methods:
        # the floor of the forward-only methods: onnxruntime's forward (the cut-out forward part that
        # occlusion, RISE and Score-CAM run) against torch's, on the same masked copies
        copies = np.repeat(black + 0.5 * (image - black), forward_batch, axis=0)
        xc = torch.from_numpy(copies)

        def torch_forward():
            with torch.no_grad():
                return module(xc)

        error = float(np.abs(model.logits(copies) - torch_forward().numpy()).max()
                      / np.abs(torch_forward().numpy()).max())
        record("forward", f"{forward_batch} copies per call", lambda: model.logits(copies), torch_forward,
               "torch forward (no_grad)", error, kind="forward", batch=forward_batch)

    if "occlusion" in methods:
        from captum.attr import Occlusion

        spec = MethodSpec("occlusion", window=WINDOW, stride=STRIDE)
        occ = Occlusion(module)

        def captum_occlusion():
            with torch.no_grad():
                return occ.attribute(x, sliding_window_shapes=(3, WINDOW, WINDOW), strides=(3, STRIDE, STRIDE),
                                     baselines=torch.from_numpy(black), target=target, perturbations_per_eval=16)

        ours = attribute(model, spec, image, targets)[2]
        logits = model.logits(image)
        error = float(np.abs(ours - captum_occlusion().numpy()).max() / np.abs(logits).max())
        windows = perturbation.occlusion_windows(model.input_size, WINDOW, STRIDE)
        occluded = np.repeat(image, len(windows), axis=0)
        for k, (t, b, l, r) in enumerate(windows):
            occluded[k, :, t:b, l:r] = black[0, :, t:b, l:r]

        def occlusion_floor():  # Captum's forward calls: the clean picture, then the windows 16 at a time
            model.logits(image)
            for start in range(0, len(occluded), 16):
                model.logits(occluded[start:start + 16])

        record("occlusion", f"window {WINDOW}, stride {STRIDE}", lambda: attribute(model, spec, image, targets),
               captum_occlusion, "Captum Occlusion (16 windows per call)", error, floor_fn=occlusion_floor,
               kind="forward-only")

    if "rise" in methods:
        rng = np.random.default_rng(0)
        grids = (rng.random((MASKS, GRID, GRID)) < P).astype(np.float32)
        shifts = rng.integers(0, int(np.ceil(image.shape[2] / GRID)), size=(MASKS, 2))
        masks = torch.from_numpy(perturbation.rise_masks(grids, shifts, model.input_size))[:, None]
        b = torch.from_numpy(black)

        def paper_rise():
            total = torch.zeros(model.input_size, dtype=torch.float64)
            with torch.no_grad():
                for start in range(0, MASKS, 32):
                    m = masks[start:start + 32]
                    p = torch.softmax(module(b + m * (x - b)), dim=1)[:, target]
                    total += (p[:, None, None].double() * m[:, 0].double()).sum(0)
            return total / MASKS / P

        def ours_explicit():
            return perturbation.rise(model, image, targets, black, masks=MASKS, grid=GRID, probability=P,
                                     grids=grids, shifts=shifts).values[0, 0]

        expected = paper_rise().numpy()
        error = float(np.abs(ours_explicit() - expected).max() / np.abs(expected).max())
        spec = MethodSpec("rise", masks=MASKS, grid=GRID, probability=P)
        masked = (b + masks * (x - b)).numpy()

        def rise_floor():  # the recipe's forward calls: the masked copies 32 at a time
            for start in range(0, MASKS, 32):
                model.logits(masked[start:start + 32])

        record("rise", f"{MASKS} masks, grid {GRID}, p {P}", lambda: attribute(model, spec, image, targets),
               paper_rise, "the paper's recipe in torch (masks made beforehand)", error, floor_fn=rise_floor,
               kind="forward-only")

    cams = [m for m in methods if m in CAM_CLASSES or m == "score-cam"]
    if layer and cams:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        module.requires_grad_(True)
        _, _, layer_name = reference_cam_layer(module)
        where = f"layer {layer_name}" + (f" (gradmap: --cam-layer {layer})" if layer != layer_name else "")
        channels = model.run_outputs(image, targets, ("cam_activation",))["cam_activation"].shape[1]
        for method in cams:
            cam = reference_cam(module, method)
            spec = cam_spec(method)
            if method == "score-cam" and channels > score_cam_max_channels:
                forward = next((r for r in rows if r["method"] == "forward"), None)
                rows.append({"model": name, "method": method, "kind": "not-run", "channels": channels,
                             "settings": where, "per_copy_ms": None if forward is None else
                             {"gradmap": forward["gradmap_ms"] / forward["batch"],
                              "reference": forward["reference_ms"] / forward["batch"]}})
                print(f"{name} score-cam: {channels} channels, not run (over --score-cam-max-channels)", flush=True)
                continue

            def reference(cam=cam):
                return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])

            ours = attribute(model, spec, image, targets)[2][:, 0]
            error = float(np.abs(_scaled(ours) - reference()).max())
            floor_fn = None
            if method == "score-cam":
                activation = model.forward_outputs(image, targets, ("cam_activation",))["cam_activation"][0]
                masked = image * perturbation.score_cam_masks(activation, model.input_size)[:, None]

                def floor_fn(masked=masked):  # pytorch-grad-cam's forward calls: the picture, then the copies 64 at a time
                    model.logits(image)
                    for start in range(0, len(masked), SCORE_CAM_BATCH):
                        model.logits(masked[start:start + SCORE_CAM_BATCH])
            record(method, where + (f", {SCORE_CAM_BATCH} copies per call" if method == "score-cam" else "")
                   + (", --orientation svd" if method == "eigen-cam" else ""),
                   lambda spec=spec: attribute(model, spec, image, targets), reference,
                   f"pytorch-grad-cam {cam.__class__.__name__}", error, floor_fn=floor_fn,
                   kind="forward-only" if method == "score-cam" else "cam")

    attention = [m for m in methods if m.startswith("attention-")]
    if attention:
        for gradient in (True, False):
            kind_of_file = "full export" if gradient else "forward-only export (--no-gradient)"
            if not gradient and "attention-rollout" not in attention:
                continue
            apath = folder / f"{name}-attention-{gradient}.onnx"
            print(f"{name}: exporting (--attention, {kind_of_file})", flush=True)
            export_torchvision(name, apath, weights="none", attention=True, gradient=gradient, verify=False)
            amodel = SaliencyModel(apath, provider="cpu", threads=threads)
            for method in attention if gradient else ["attention-rollout"]:
                fn = reference_attention(module, method, model.input_size)
                spec = MethodSpec(method)
                expected = fn(x, target)[0].detach().numpy()
                ours = gradmap_attention_grid(amodel, method, image, targets)
                error = float(np.abs(ours - expected).max() / np.abs(expected).max())
                settings = ("head mean, " if method == "attention-rollout" else "") + kind_of_file
                record(method, settings, lambda spec=spec, amodel=amodel: attribute(amodel, spec, image, targets),
                       lambda fn=fn: fn(x, target), "the paper's rule in torch (attention written out)", error,
                       kind="attention")
    return rows


def _kind(r: dict) -> str:
    """forward (the floor row), forward-only, cam, attention or not-run; rows recorded before the
    kinds existed are told by their method."""
    return r.get("kind") or ("forward-only" if r["method"] in ("occlusion", "rise", "score-cam") else "cam")


def verdict(r: dict, forward: dict | None) -> tuple[str, str | None]:
    """("yes" | "floor" | "no", for a miss what stops it): gradmap at most the reference's time ÷ 1.5.
    A forward-only method's miss is the floor's when it would miss even at onnxruntime's forward
    against torch's, with FLOOR_MARGIN to spare: onnxruntime's forward on the reference's batches in
    the same rounds where measured (``floor_ms``), else the reference's time × onnxruntime's forward ÷
    torch's from the model's forward row."""
    from bench_speed import FLOOR_MARGIN, floor_stops

    needed = r["reference_ms"] / TARGET
    if r["gradmap_ms"] <= needed:
        return "yes", None
    head = (f"needs ≤ {needed:.0f} ms (the reference's {r['reference_ms']:.0f} ms ÷ {TARGET:g}), "
            f"gradmap {r['gradmap_ms']:.0f} ms")
    if _kind(r) != "forward-only":
        return "no", head
    if "floor_ms" in r:
        floor_text = (f"onnxruntime's forward on the reference's batches takes {r['floor_ms']:.0f} ms in the same "
                      "rounds")
        part = floor_stops(r["floor_ms"], needed)
        if part:
            return "floor", f"{head}; {floor_text}: {part}"
        return "no", (f"{head}; {floor_text}, so a run within {FLOOR_MARGIN:.2f}× of it would meet it: gradmap "
                      f"spends {r['gradmap_ms'] - r['floor_ms']:.0f} ms above it")
    if forward is None:
        return "no", f"{head}; no forward measured"
    ratio = forward["gradmap_ms"] / forward["reference_ms"]
    floor_ms = r["reference_ms"] * ratio
    floor_text = (f"onnxruntime's forward takes {ratio:.2f}× torch's on {forward['batch']} copies, so the "
                  f"reference's forwards at onnxruntime's speed take {floor_ms:.0f} ms")
    part = floor_stops(floor_ms, needed)
    if part:
        return "floor", f"{head}; {floor_text}: {part}"
    return "no", f"{head}; {floor_text}, so a run within {FLOOR_MARGIN:.2f}× of it would meet it"


def _ordered(rows: list[dict]) -> list[dict]:
    """Rows grouped by model in the order models first appear, each model's forward row first."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    return sorted(rows, key=lambda r: (models.index(r["model"]), _kind(r) != "forward"))


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        _report.machine_line(meta),
        "",
        f"`python bench/bench_forward.py`: one photograph (chelsea) per call, top-1 class, medians in ms of "
        f"interleaved rounds, {meta['threads']} threads, random weights"
        f"{'; ' + meta['note'] if meta.get('note') else ''}. gradmap: `gradmap.runtime.methods.attribute` "
        "(what `gradmap run --method` calls); each reference at the same settings. Max difference: occlusion "
        "against the largest |logit|, RISE against the largest value, the CAMs on maps scaled to [0, 1] as "
        "pytorch-grad-cam returns them, the attention maps on the patch grid against the largest value, the "
        "forward's logits against the largest |logit|. On the ViT, pytorch-grad-cam hooks its documented layer "
        "(`encoder.layers[-1].ln_1`) with its ViT `reshape_transform` (class token dropped, tokens to the "
        "14 × 14 patch grid), gradmap the layer `--cam-layer auto` finds; the max difference shows they are "
        "the same. The attention methods' reference: the papers' rules in torch (bench/attention_reference.py, "
        "the tests' reference) on torchvision's ViT with its attention written out (its fused attention "
        "returns no probabilities). *forward*: onnxruntime's forward of the exported model against torch's "
        f"on the same masked copies, the floor of the forward-only methods. Target: at least {TARGET:g}× "
        "faster than the reference; \"floor\" where the forward-only method would miss it even at "
        "onnxruntime's forward against torch's.",
        "",
    ]
    rows = _ordered(rows)
    forwards = {r["model"]: r for r in rows if _kind(r) == "forward"}
    header = ["model", "method", "settings", "gradmap ms", "reference", "reference ms", "speed-up",
              "max difference", "met"]
    body, misses, not_run = [], [], []
    for r in rows:
        kind = _kind(r)
        if kind == "not-run":
            not_run.append(r)
            continue
        if kind == "forward":
            met, why = "–", None
        else:
            met, why = verdict(r, forwards.get(r["model"]))
            met = _report.target_cell(met)
        body.append([r["model"], r["method"], r["settings"], f"{r['gradmap_ms']:.0f}", r["reference"],
                     f"{r['reference_ms']:.0f}", f"{r['speedup']:.2f}×", f"{r['max_difference']:.2g}", met])
        if why:
            misses.append(f"- {r['model']}, {r['method']} ({r['settings']}): {why}.")
    lines += _report.table(header, body)
    lines += _report.misses_lines(misses)
    for r in not_run:
        text = (f"Score-CAM on {r['model']} ({r['settings']}, {r['channels']} channels, so {r['channels']} masked "
                "forward passes per picture) was not timed whole")
        per = r.get("per_copy_ms")
        if per:
            text += (f": one masked copy takes {per['gradmap']:.0f} ms in gradmap's forward and "
                     f"{per['reference']:.0f} ms in torch's (the forward row), about "
                     f"{r['channels'] * per['gradmap'] / 1000:.0f} s and {r['channels'] * per['reference'] / 1000:.0f} s "
                     "per picture")
        lines += ["", text + "."]
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"forward-methods-speed": render(data["rows"], data["meta"])}


def merge(saved: list[dict], new: list[dict]) -> list[dict]:
    """``saved`` rows with those re-measured in ``new`` (same model, method and settings) replaced in
    place, the others of ``new`` after them (``--update``)."""
    def key(r):
        return r["model"], r["method"], r.get("settings")

    fresh = {key(r): r for r in new}
    merged = [fresh.pop(key(r), r) for r in saved]
    return merged + [r for r in new if key(r) in fresh]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="the methods to run on --models (default: all each model has; 'forward': the floor row)")
    parser.add_argument("--score-cam-models", "--score-cam-model", nargs="*", default=["resnet18"],
                        help="models to run Score-CAM alone on (none: no such run)")
    parser.add_argument("--score-cam-max-channels", type=int, default=512,
                        help="Score-CAM on a CAM layer of more channels is not timed whole: the table gives its "
                             "time per masked copy from the forward row")
    parser.add_argument("--forward-batch", type=int, default=FORWARD_BATCH, help="masked copies per forward-row call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of rounds per model and method at most")
    _report.add_flags(parser, RESULTS, note=True)
    parser.add_argument("--update", action="store_true",
                        help="keep --out's rows other than the re-measured ones (same model, method and settings; "
                             "say so in --note)")
    args = _report.parse_args(parser)

    def methods_of(name: str) -> list[str]:
        every = ["forward", "occlusion", "rise"]
        if name in CAM_LAYERS:
            every += [*CAM_CLASSES, "score-cam"]
        if name.startswith("vit"):
            every += list(ATTENTION_METHODS)
        return every if args.methods is None else [m for m in every if m in args.methods]

    def measure():
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "captum", "grad-cam"),
                                 threads=args.threads, note=args.note)
        partial = args.out.parent / "partial" / args.out.name
        rows = []
        runs = [(name, methods_of(name)) for name in args.models]
        runs += [(name, ["score-cam"]) for name in args.score_cam_models if name]
        for name, methods in runs:
            if "score-cam" in methods and "forward" not in methods:
                methods = ["forward", *methods]  # a Score-CAM not timed whole is told by its forward's time
            rows += bench_model(name, args.threads, args.repeat, args.budget, methods, args.score_cam_max_channels,
                                args.forward_batch)
            _report.write_results(partial, meta, rows, final=False)  # a crash later keeps what was measured
        if args.update:
            saved = _report.read_results(args.out)
            remeasured = [f"{name} ({', '.join(methods)})" for name, methods in runs]
            rows, meta = merge(saved["rows"], rows), _report.merge_update(meta, saved["meta"], remeasured)
        data = _report.write_results(args.out, meta, rows)
        partial.unlink(missing_ok=True)
        return data

    _report.render_or_measure(args, PAGE, sections, measure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
