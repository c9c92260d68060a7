"""The prepared GPU run (bench/gpu/run.sh starts it; bench/gpu/README.md says how and what it measures).

For resnet50, mobilenet_v3_large and vit_b_16 (torchvision, seeded random weights: no network):

1. export the portable graph (``gradmap export --target portable``) at 224x224;
2. parity: the gradient of each gradmap provider (CUDA, WebGPU plugin, and the CPU provider as the
   reference point) against float64 torch replaying that provider's own ReLU/max-pool decisions, as
   the engine matrix does (tests/engines/parity.py; within the export tolerance, 1e-4 of max|torch|);
3. timing, batch 1 and 32: the vanilla gradient, SmoothGrad-25 and IG-32 (black baseline) with
   gradmap on each GPU provider, against PyTorch eager (``torch.autograd.grad`` on the input,
   parameters frozen, the noisy / path images in chunks) and Captum (``Saliency``,
   ``NoiseTunnel(Saliency)``, ``IntegratedGradients``) on the same GPU, and ``torch.compile`` of the
   eager gradient where its compile time fits the budget. Medians of up to 3 timed runs after one
   warm-up, ``torch.cuda.synchronize`` around each.

Everything runs under one time budget (default 270 s, run.sh's limit is 300 s): what does not fit is
skipped with the reason, never left out silently. ``--dry-run`` (for machines without CUDA) is the
same code at tiny sizes (resnet18 at 32x32, batch 1 and 2, SmoothGrad-3, IG-4, an 80 s budget) on
the CPU provider and torch on the CPU, which CI runs to keep this script working; its times say
nothing about a GPU. Writes one JSON file and prints a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# torch first: its CUDA libraries (cuBLAS, cuDNN from the nvidia-* wheels) are then loaded for onnxruntime-gpu too
import torch  # noqa: E402
import torchvision  # noqa: E402

import onnxruntime as ort  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _report  # noqa: E402  (the machine's CPU, as every bench/ results file records it)

from gradmap import contract  # noqa: E402
from gradmap.runtime.providers import CUDA, find_webgpu_devices  # noqa: E402

FULL = dict(models=("resnet50", "mobilenet_v3_large", "vit_b_16"), size=224, batches=(1, 32), samples=25, steps=32,
            parity_batch=2, torch_chunk=128, repeats=3)
DRY = dict(models=("resnet18",), size=32, batches=(1, 2), samples=3, steps=4, parity_batch=2, torch_chunk=8, repeats=1)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def environment() -> dict:
    webgpu = find_webgpu_devices()
    icds = sorted(glob.glob("/usr/share/vulkan/icd.d/*.json") + glob.glob("/etc/vulkan/icd.d/*.json"))
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": _report.machine(),
        "webgpu": {"devices": [f"{d.device.type.name} {d.device.vendor}" for d in webgpu.devices], "gpu": webgpu.gpu,
                   "reason": webgpu.reason, "vulkan_icds": os.environ.get("VK_ICD_FILENAMES", "").split(":") if
                   os.environ.get("VK_ICD_FILENAMES") else icds},
    }
    try:
        import captum
        env["captum"] = captum.__version__
    except ImportError as e:
        env["captum"] = None
        env["captum_reason"] = f"captum does not import ({e}): bring it with tools/gpu_carry.py"
    return env


def torch_model(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    module = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def export(module, name: str, size: int, folder: Path) -> tuple[Path, float]:
    from gradmap.contract import Preprocessing
    from gradmap.export import export_module

    path = folder / f"{name}.portable.onnx"
    start = time.perf_counter()
    export_module(module, path, preprocessing=Preprocessing(crop=(size, size), resize=None), source_model=name,
                  verify=False, target="portable")
    return path, time.perf_counter() - start


def parity(module, path: Path, providers: list[str], batch: int, size: int) -> list[dict]:
    """Each provider's logits and gradient against float64 torch replaying its own decisions."""
    import copy

    import onnx

    from gradmap.export._parity import DEFAULT_TOLERANCE, expose_decisions, relative_error, replay_reference
    from gradmap.runtime.providers import plan_providers
    from gradmap.runtime.model import session_options

    exposed = expose_decisions(onnx.load(str(path)))
    exposed_bytes = exposed.proto.SerializeToString()
    reference_module = copy.deepcopy(module).to(torch.float64).cpu()
    rng = np.random.default_rng(0)
    image = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    target = np.full(batch, -1, np.int64)
    names = [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_GRADIENT] + exposed.names
    rows = []
    for provider in providers:
        row = {"provider": provider, "tolerance": DEFAULT_TOLERANCE}
        try:
            session = plan_providers(provider).session(exposed_bytes, session_options())
            row["session_providers"] = session.get_providers()
            values = dict(zip(names, session.run(names, {contract.INPUT_IMAGE: image, contract.INPUT_TARGET: target})))
            overrides: list[float] = []
            reference = replay_reference(reference_module, image, target, "logit", exposed.split(values),
                                         overrides=overrides)
            row["logits_error"] = relative_error(values[contract.OUTPUT_LOGITS], reference.logits)
            row["gradient_error"] = relative_error(values[contract.OUTPUT_GRADIENT], reference.gradient)
            row["largest_override"] = max(overrides, default=0.0)
            row["target_index_equal"] = bool(np.array_equal(values[contract.OUTPUT_TARGET_INDEX], reference.target_index))
            row["ok"] = bool(row["logits_error"] <= DEFAULT_TOLERANCE and row["gradient_error"] <= DEFAULT_TOLERANCE
                             and row["target_index_equal"] and row["largest_override"] <= 1e-5)
        except Exception as e:  # noqa: BLE001 - a provider that fails is a result
            row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, budget: Budget, repeats: int = 3) -> dict:
    """One warm-up, then up to ``repeats`` timed runs while the budget lasts: median and runs in ms."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = (time.perf_counter() - start) * 1000
    runs = []
    for _ in range(repeats):
        if runs and budget.left() < 2 * runs[-1] / 1000 + 5:
            break
        start = time.perf_counter()
        fn()
        sync()
        runs.append((time.perf_counter() - start) * 1000)
    if not runs:
        runs = [first]
    return {"median_ms": statistics.median(runs), "runs_ms": runs, "first_ms": first}


# ---------------------------------------------------------------- PyTorch eager and Captum
def eager_gradient(module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    score = module(x).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, x)
    return grad


def eager_method(module, kind: str, x, target, cfg, gradient=eager_gradient):
    """The same method as gradmap's, in PyTorch: the noisy or path images in chunks of cfg['torch_chunk']."""
    if kind == "vanilla":
        return gradient(module, x, target)
    n, chunk = x.shape[0], cfg["torch_chunk"]
    if kind == "smoothgrad":
        k = cfg["samples"]
        span = (x.reshape(n, -1).max(1).values - x.reshape(n, -1).min(1).values) * 0.15
        copies = (x[:, None] + torch.randn((n, k, *x.shape[1:]), device=x.device) * span[:, None, None, None, None])
        copies, weights = copies.reshape(n * k, *x.shape[1:]), None
    else:
        k = cfg["steps"]
        alphas, w = np.polynomial.legendre.leggauss(k)
        alphas = torch.tensor(0.5 * (alphas + 1), dtype=x.dtype, device=x.device)
        weights = torch.tensor(0.5 * w, dtype=x.dtype, device=x.device)
        baseline = torch.zeros_like(x)
        copies = (baseline[:, None] + alphas[None, :, None, None, None] * (x - baseline)[:, None]).reshape(n * k, *x.shape[1:])
    repeated = target.repeat_interleave(k)
    grads = torch.cat([gradient(module, copies[s:s + chunk], repeated[s:s + chunk]) for s in range(0, n * k, chunk)])
    grads = grads.reshape(n, k, *x.shape[1:])
    if weights is None:
        return grads.mean(1)
    return (x - 0) * (grads * weights[None, :, None, None, None]).sum(1)


def captum_method(module, kind: str, x, target, cfg):
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    if kind == "vanilla":
        return Saliency(module).attribute(x, target=target, abs=False)
    if kind == "smoothgrad":
        n = x.shape[0]
        span = float((x.reshape(n, -1).max(1).values - x.reshape(n, -1).min(1).values).mean() * 0.15)
        return NoiseTunnel(Saliency(module)).attribute(
            x, nt_type="smoothgrad", nt_samples=cfg["samples"], stdevs=span, target=target, abs=False,
            nt_samples_batch_size=max(1, cfg["torch_chunk"] // max(1, n)))
    return IntegratedGradients(module).attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=cfg["steps"],
                                                 method="gausslegendre", internal_batch_size=cfg["torch_chunk"])


# ---------------------------------------------------------------- gradmap
def gradmap_method(model, kind: str, images: np.ndarray, cfg, chunk: int):
    from gradmap.runtime.methods import MethodSpec, attribute

    spec = {"vanilla": MethodSpec("vanilla"),
            "smoothgrad": MethodSpec("smoothgrad", samples=cfg["samples"], noise=0.15),
            "integrated-gradients": MethodSpec("integrated-gradients", steps=cfg["steps"], baseline="black")}[kind]
    return attribute(model, spec, images, np.full(len(images), -1), batch_size=chunk)


KINDS = ("vanilla", "smoothgrad", "integrated-gradients")


def method_label(kind: str, cfg) -> str:
    return {"vanilla": "vanilla", "smoothgrad": f"SmoothGrad-{cfg['samples']}",
            "integrated-gradients": f"IG-{cfg['steps']}"}[kind]


def run(args) -> dict:
    cfg = dict(DRY if args.dry_run else FULL)
    if args.models:
        cfg["models"] = tuple(args.models.split(","))
    budget = Budget(args.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    result = {"dry_run": args.dry_run, "config": cfg, "environment": env, "exports": [], "parity": [], "timings": [],
              "skipped": []}
    providers = []
    if CUDA in ort.get_available_providers():
        providers.append("cuda")
    else:
        result["skipped"].append({"what": "gradmap on onnxruntime CUDA", "why": f"onnxruntime {ort.__version__} has no "
                                  "CUDA provider (onnxruntime-gpu not brought in: see bench/gpu/README.md)"})
    if env["webgpu"]["devices"]:
        providers.append("webgpu")
        if not env["webgpu"]["gpu"]:
            result["skipped"].append({"what": "WebGPU as a GPU number", "why": "the WebGPU plugin's device is no GPU "
                                      "(a software Vulkan): its times are not GPU times"})
    else:
        result["skipped"].append({"what": "gradmap on the WebGPU plugin", "why": env["webgpu"]["reason"]})
    if device.type == "cpu":
        providers.append("cpu")
    parity_providers = providers + ([] if "cpu" in providers else ["cpu"])
    if not torch.cuda.is_available() and not args.dry_run:
        result["skipped"].append({"what": "the GPU run", "why": "torch sees no CUDA device: run with --dry-run"})
        return result
    folder = Path(tempfile.mkdtemp(prefix="gradmap-gpu-"))
    from gradmap.runtime import SaliencyModel

    for name in cfg["models"]:
        if budget.left() < 20:
            result["skipped"].append({"what": name, "why": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        module = torch_model(name, cfg["size"])
        try:
            path, seconds = export(module, name, cfg["size"], folder)
        except Exception as e:  # noqa: BLE001
            result["exports"].append({"model": name, "error": f"{type(e).__name__}: {e}"})
            continue
        result["exports"].append({"model": name, "seconds": seconds, "mb": path.stat().st_size / 1e6})
        print(f"exported {name} in {seconds:.1f} s", flush=True)
        for row in parity(module, path, parity_providers, cfg["parity_batch"], cfg["size"]):
            result["parity"].append(dict(row, model=name))
        gpu_module = module.to(device)
        loaded = {}
        for provider in providers:
            try:
                loaded[provider] = SaliencyModel(path, provider=provider, cache_dir=False)
            except Exception as e:  # noqa: BLE001
                result["skipped"].append({"what": f"{name} on {provider}", "why": f"{type(e).__name__}: {e}"})
        if args.dry_run and "cpu" in loaded:  # the CUDA provider's device path, on the CPU provider's I/O binding
            bound = SaliencyModel(path, provider="cpu", cache_dir=False)
            bound.io_device = "cpu"
            loaded["cpu, I/O binding"] = bound
        compiled = None
        for batch in cfg["batches"]:
            for kind in KINDS:
                rng = np.random.default_rng(batch)
                images = rng.standard_normal((batch, 3, cfg["size"], cfg["size"]), dtype=np.float32)
                x = torch.from_numpy(images).to(device)
                with torch.no_grad():
                    target = gpu_module(x).argmax(1)
                row_base = {"model": name, "method": method_label(kind, cfg), "batch": batch}
                engines = [(f"gradmap {p}", lambda m=m: gradmap_method(m, kind, images, cfg, max(batch, cfg["torch_chunk"])))
                           for p, m in loaded.items()]
                engines.append((f"torch eager ({device.type})", lambda: eager_method(gpu_module, kind, x, target, cfg)))
                if env["captum"]:
                    engines.append((f"captum ({device.type})", lambda: captum_method(gpu_module, kind, x, target, cfg)))
                if kind == "vanilla" and device.type == "cuda" and not args.no_compile:
                    if compiled is None and budget.left() > 120:
                        compiled = torch.compile(eager_gradient)
                    if compiled is not None:
                        engines.append(("torch.compile (cuda)", lambda: eager_method(gpu_module, kind, x, target, cfg,
                                                                                     gradient=compiled)))
                for engine, fn in engines:
                    if budget.left() < 10:
                        result["skipped"].append({**row_base, "what": engine, "why": "time budget spent"})
                        continue
                    try:
                        measured = timed(fn, budget, cfg["repeats"])
                        result["timings"].append({**row_base, "engine": engine, **measured})
                    except Exception as e:  # noqa: BLE001
                        result["timings"].append({**row_base, "engine": engine,
                                                  "error": f"{type(e).__name__}: {str(e)[:300]}"})
        del loaded, gpu_module
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = args.budget_s - budget.left()
    return result


def table(result: dict) -> str:
    lines = []
    env = result["environment"]
    lines.append(f"gradmap GPU run{' (DRY RUN: tiny sizes, no GPU)' if result['dry_run'] else ''}: "
                 f"{env['gpu'] or 'no GPU'}; torch {env['torch']}, onnxruntime {env['onnxruntime']}")
    lines.append("")
    lines.append(f"{'parity':<22} {'provider':<10} {'logits':>10} {'gradient':>10}  ok")
    for p in result["parity"]:
        if "error" in p:
            lines.append(f"{p['model']:<22} {p['provider']:<10} error: {p['error'][:80]}")
        else:
            lines.append(f"{p['model']:<22} {p['provider']:<10} {p['logits_error']:>10.2e} {p['gradient_error']:>10.2e}  "
                         f"{'yes' if p['ok'] else 'NO'}")
    lines.append("")
    lines.append(f"{'model':<20} {'method':<16} {'batch':>5}  {'engine':<24} {'median ms':>10}  torch eager / this")
    eager = {(t["model"], t["method"], t["batch"]): t["median_ms"] for t in result["timings"]
             if t["engine"].startswith("torch eager") and "median_ms" in t}
    for t in result["timings"]:
        key = (t["model"], t["method"], t["batch"])
        if "error" in t:
            lines.append(f"{t['model']:<20} {t['method']:<16} {t['batch']:>5}  {t['engine']:<24} error: {t['error'][:60]}")
            continue
        ratio = (f"{eager[key] / t['median_ms']:.2f}x" if key in eager and t["median_ms"]
                 and not t["engine"].startswith("torch eager") else "")
        lines.append(f"{t['model']:<20} {t['method']:<16} {t['batch']:>5}  {t['engine']:<24} {t['median_ms']:>10.1f}  {ratio}")
    if result["skipped"]:
        lines.append("")
        lines.append("skipped:")
        for s in result["skipped"]:
            where = " ".join(str(s[k]) for k in ("model", "method", "batch") if k in s)
            lines.append(f"  {s['what']}{' (' + where + ')' if where else ''}: {s['why']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new rows after this many seconds (default 270, dry run 80)")
    parser.add_argument("--models", default=None, help="comma-separated torchvision names instead of the default three")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    args = parser.parse_args()
    if args.budget_s is None:
        args.budget_s = 80.0 if args.dry_run else 270.0
    if args.dry_run:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        result = run(args)
    except Exception:  # noqa: BLE001 - write what is known, then fail
        result = {"dry_run": args.dry_run, "error": traceback.format_exc()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(result["error"], file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(table(result))
    print(f"\nwrote {args.out}")
    # gradmap's own failures fail the run; a baseline that fails (torch.compile, Captum) is a result in the table
    bad = [p for p in result["parity"] if not p.get("ok")] + \
        [t for t in result["timings"] if "error" in t and t["engine"].startswith("gradmap")]
    if bad:
        print(f"{len(bad)} parity failure(s) or failed gradmap row(s): see the table", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
