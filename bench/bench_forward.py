"""The CAM family and the forward-only methods per picture: gradmap's runtime against the reference implementations.

    python bench/bench_forward.py [--models resnet50 vit_b_16] [--score-cam-model resnet18]
    python bench/bench_forward.py --tables-only     # the docs table again from bench/results/forward_methods.json

One photograph (scikit-image's chelsea, torchvision's ImageNet preprocessing), top-1 class, random
weights, 2 threads for onnxruntime and torch, the same settings on both sides:

  occlusion, window 56, stride 56 (4 x 4 = 16 windows on 224 x 224), black baseline:
    gradmap ``attribute`` (``gradmap run --method occlusion``) against Captum's ``Occlusion`` with
    ``perturbations_per_eval`` 16 (the windows 16 at a time);
  RISE, 64 masks, grid 7, p 0.5: gradmap against the paper's recipe in torch, the masks made once
    beforehand (not timed) as the authors' code does, 32 masked copies per forward call;
  HiResCAM, XGradCAM, LayerCAM, EigenCAM on the last convolutional block: gradmap (one run of the
    exported graph, forward and gradient) against pytorch-grad-cam (forward and backward in torch);
  Score-CAM on ``--score-cam-model`` (resnet18: 512 channels, so 512 masked forward passes; resnet50's
    2048 would take minutes per side on 2 cores), 64 copies per call on both sides.

Each pair is checked to compute the same map first (the largest difference reported in the results);
then the two sides run in turn, round by round (bench_speed.py's interleaving), and the table reports
medians. The CAM family is not run on the ViT: a token map needs ``--cam-layer auto`` to find it
(issue 30's transformer item).
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
CAM_LAYERS = {"resnet50": "layer4", "resnet18": "layer4"}


def picture(size=(224, 224)) -> np.ndarray:
    from PIL import Image
    from skimage import data

    from gradmap.contract import Preprocessing
    from gradmap.runtime.preprocess import preprocess

    tensor, _ = preprocess(Image.fromarray(data.chelsea()), Preprocessing(crop=size, resize=256))
    return tensor.reshape(1, 3, *size)


def _scaled(maps: np.ndarray) -> np.ndarray:
    maps = maps - maps.min(axis=(-2, -1), keepdims=True)
    return maps / (maps.max(axis=(-2, -1), keepdims=True) + 1e-7)


def bench_model(name: str, threads: int, repeat: int, budget_s: float, methods: list[str]) -> list[dict]:
    import torch

    from bench_speed import _interleaved_times
    from gradmap.export._api import export_torchvision
    from gradmap.export._torchvision import load_torchvision
    from gradmap.runtime import perturbation
    from gradmap.runtime.methods import MethodSpec, attribute, baseline_image
    from gradmap.runtime.model import SaliencyModel

    torch.set_num_threads(threads)
    layer = CAM_LAYERS.get(name)
    path = Path(tempfile.mkdtemp()) / f"{name}.onnx"
    export_torchvision(name, path, weights="none", cam_layer=layer)
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

    def record(method, settings, gradmap_fn, reference_fn, reference, error):
        print(f"{name} {method}: max difference {error:.3g}; timing", flush=True)
        times = _interleaved_times({"gradmap": gradmap_fn, "reference": reference_fn}, warmup=1, repeat=repeat,
                                   budget_s=budget_s)
        g, r = statistics.median(times["gradmap"]), statistics.median(times["reference"])
        rows.append({"model": name, "method": method, "settings": settings, "reference": reference,
                     "gradmap_ms": g, "reference_ms": r, "speedup": r / g, "rounds": len(times["gradmap"]),
                     "max_difference": error})
        print(f"  gradmap {g:.0f} ms, {reference} {r:.0f} ms, {r / g:.2f}x", flush=True)

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
        record("occlusion", f"window {WINDOW}, stride {STRIDE}", lambda: attribute(model, spec, image, targets),
               captum_occlusion, "Captum Occlusion (16 windows per call)", error)

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
        record("rise", f"{MASKS} masks, grid {GRID}, p {P}", lambda: attribute(model, spec, image, targets),
               paper_rise, "the paper's recipe in torch (masks made beforehand)", error)

    cams = [m for m in methods if m in CAM_CLASSES or m == "score-cam"]
    if layer and cams:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        module.requires_grad_(True)
        for method in cams:
            cls = "ScoreCAM" if method == "score-cam" else CAM_CLASSES[method]
            cam = getattr(pgc, cls)(model=module, target_layers=[getattr(module, layer)])
            cam.batch_size = 64
            # EigenCAM: the sign pytorch-grad-cam keeps (LAPACK's), so that both compute the same map
            spec = MethodSpec(method, mask_batch=64, **({"orientation": "svd"} if method == "eigen-cam" else {}))

            def reference(cam=cam):
                return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])

            ours = attribute(model, spec, image, targets)[2][:, 0]
            error = float(np.abs(_scaled(ours) - reference()).max())
            record(method, f"layer {layer}" + (", 64 copies per call" if method == "score-cam" else "")
                   + (", --orientation svd" if method == "eigen-cam" else ""),
                   lambda spec=spec: attribute(model, spec, image, targets), reference,
                   f"pytorch-grad-cam {cls}", error)
    return rows


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        _report.machine_line(meta),
        "",
        f"`python bench/bench_forward.py`: one photograph (chelsea) per call, top-1 class, medians in ms of "
        f"interleaved rounds, {meta['threads']} threads, random weights"
        f"{'; ' + meta['note'] if meta.get('note') else ''}. gradmap: `gradmap.runtime.methods.attribute` "
        "(what `gradmap run --method` calls); each reference at the same settings. Max difference: occlusion "
        "against the largest |logit|, RISE against the largest value, the CAMs on maps scaled to [0, 1] as "
        "pytorch-grad-cam returns them. Target: at least 1.5x faster than the reference.",
        "",
        "| model | method | settings | gradmap ms | reference | reference ms | speed-up | max difference | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['settings']} | {r['gradmap_ms']:.0f} | {r['reference']} | "
                     f"{r['reference_ms']:.0f} | {r['speedup']:.2f}× | {r['max_difference']:.2g} | "
                     f"{'yes' if r['speedup'] >= 1.5 else '**no**'} |")
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"forward-methods-speed": render(data["rows"], data["meta"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--score-cam-model", default="resnet18")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of rounds per model and method at most")
    _report.add_flags(parser, RESULTS, note=True)
    args = _report.parse_args(parser)

    def measure():
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "captum", "grad-cam"),
                                 threads=args.threads, note=args.note)
        rows = []
        for name in args.models:
            methods = ["occlusion", "rise", *CAM_CLASSES] if name in CAM_LAYERS else ["occlusion", "rise"]
            rows += bench_model(name, args.threads, args.repeat, args.budget, methods)
        if args.score_cam_model:
            rows += bench_model(args.score_cam_model, args.threads, args.repeat, args.budget, ["score-cam"])
        return _report.write_results(args.out, meta, rows)

    _report.render_or_measure(args, PAGE, sections, measure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
