"""Side-by-side speed of saliency maps: gradmap's default export, as its runtime loads it, against the alternatives.

    python bench/export_baseline.py --rev f082100 --out /tmp/gradmap-baseline   # optional, see --baseline
    python bench/bench_speed.py [--models resnet50 vgg19 ...] [--batches 1 8] [--threads 2]
                                [--baseline /tmp/gradmap-baseline] [--compile] [--no-floor]
    python bench/bench_speed.py --tables-only     # the docs tables again from bench/results/speed.json

In one process, per model and batch, medians after warm-up of (run in turn, round after round, so
that a shared machine's load drifts hit all variants alike, each call 0.1 s after the previous one):
  (a) onnxruntime forward only, of the plain export (no gradient), onnxruntime's default options;
  (b) gradmap: the file ``gradmap export MODEL --weights none`` writes (the portable graph, the
      default) loaded by ``gradmap.runtime.SaliencyModel`` on the CPU provider, which lowers it for
      this CPU's channel block (no cache: every load lowers) and runs it with gradmap's session
      options (logits + gradient): what a user of the default export gets;
  (c) PyTorch eager autograd as in the ResNet-50 recipe (input requires grad, parameters frozen);
  (d) Captum's Saliency (abs=False) on the same module;
  (e) unless --no-floor, bench/floor.py's floor graph (gradmap's graph with every activation's rule
      cut to one product and every max pool's routing to one Resize, lowered for the same block):
      the least any exact standard-op gradient of the model costs on onnxruntime's CPU provider, timed
      in the same rounds. Its rows also go to bench/results/floor.json (bench/floor.py's table);
  with --compile, (f) the same autograd on ``torch.compile(module, dynamic=False)`` in steady state
      (its first call, which compiles, timed apart);
  with --baseline DIR, (g) the gradient models an earlier gradmap commit exported
      (bench/export_baseline.py: same weights), to show a change costs no speed.
Random weights, random inputs at the models' own input size, a fixed thread count for onnxruntime
and torch. Writes bench/results/speed.json and the speed table of docs/benchmarks.md; a row that
misses its target names the floor that stops it, from the floor graph of the same rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _report

RESULTS = _report.RESULTS / "speed.json"
PAGE, SECTIONS = "benchmarks.md", ("speed",)
FLOOR_RESULTS = _report.RESULTS / "floor.json"
#: Vanilla target: gradmap at least this many times faster than the faster of PyTorch eager and Captum.
TARGET = 1.5
#: How close to its floor an exact graph is taken to get (bench/floor.py's target): a row whose
#: target is below this times the floor graph's time is stopped by the floor.
FLOOR_MARGIN = 1.10

DEFAULT_MODELS = ["resnet50", "vgg19", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "vit_b_16",
                  "convnext_tiny"]


def _interleaved_times(variants: dict, *, warmup: int, repeat: int, budget_s: float,
                       pause_s: float = 0.1) -> dict[str, list[float]]:
    """Times in ms per variant, one per round, the variants run in turn within each round (A B C D, then D C B A on the
    next round) so that load drifts on a shared machine hit all of them alike: the ratios between
    variants are what the table reports. Stops after ``repeat`` rounds, or after the budget once
    three rounds are in.

    Each call starts ``pause_s`` after the previous one ended, untimed: onnxruntime's idle pool
    threads spin for a while after a run, and a torch call started at once shares the cores with
    them (mobilenet_v3_large, batch 1, 2 threads: PyTorch eager 84 ms right after a gradmap run,
    43 ms after a 0.2 s pause; gradmap's own time the same)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeat and (rounds < 3 or time.perf_counter() - start < budget_s):
        for name in (names if rounds % 2 == 0 else names[::-1]):
            time.sleep(pause_s)
            t = time.perf_counter()
            variants[name]()
            times[name].append((time.perf_counter() - t) * 1000)
        rounds += 1
    return times


def export_pair(name: str):
    """A torchvision model with random weights, frozen; its input size; the serialized plain forward
    export and gradmap's gradient model."""
    import onnx_ir as ir

    from gradmap.export._api import build_gradient_model
    from gradmap.export._torchvision import input_size_of, load_torchvision
    from gradmap.export._trace import trace_to_onnx

    module, _ = load_torchvision(name, "none")
    for p in module.parameters():
        p.requires_grad_(False)
    size = input_size_of(name)
    forward = ir.serde.serialize_model(trace_to_onnx(module, size)).SerializeToString()
    gradient_model, _ = build_gradient_model(module, size)
    gradient = ir.serde.serialize_model(gradient_model).SerializeToString()
    return module, size, forward, gradient


def export_portable(module, size) -> bytes:
    """gradmap's gradient model of ``module`` for the portable target, serialized."""
    import onnx_ir as ir

    from gradmap.export._api import build_gradient_model

    model, _ = build_gradient_model(module, size, target="portable")
    return ir.serde.serialize_model(model).SerializeToString()


def export_default(name: str, folder: Path, threads: int):
    """gradmap's default export of ``name`` with random weights (``gradmap export NAME --weights none``:
    the portable graph, the same seeded weights as :func:`export_pair`'s module), written to
    ``folder`` and loaded as gradmap's runtime loads it on the CPU provider: lowered for this CPU's
    block, no cache. Returns the loaded ``SaliencyModel`` (its ``lowering`` says the block used)."""
    from gradmap.export._api import export_torchvision
    from gradmap.runtime.model import SaliencyModel

    path = Path(folder) / f"{name}.onnx"
    export_torchvision(name, path, weights="none", verify=False)
    model = SaliencyModel(path, provider="cpu", threads=threads, cache_dir=False)
    if model.lowering is None or model.lowering.state not in ("memory", "written", "read"):
        state = "none" if model.lowering is None else f"{model.lowering.state} ({model.lowering.message})"
        raise SystemExit(f"{name}: gradmap's runtime did not lower the default export for this CPU: {state}")
    return model


def cpu_session(model, threads: int, options=None):
    """An onnxruntime CPU session (``model``: bytes or a path) with ``threads`` intra-op threads and
    one inter-op thread; onnxruntime's default options unless ``options`` are given."""
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def bench_model(name: str, batches: list[int], threads: int, repeat: int, budget_s: float,
                pause_s: float = 0.1, baseline: Path | None = None, compile_torch: bool = False,
                floor: bool = True, eager: bool = True) -> list[dict]:
    """One model's rows, one per batch. ``eager=False``: the onnxruntime variants only (forward,
    gradmap, floor), as bench/floor.py times them."""
    import torch

    torch.set_num_threads(threads)
    module, _ = _frozen(name)
    from gradmap.export._torchvision import input_size_of
    from gradmap.export._trace import trace_to_onnx
    import onnx_ir as ir

    size = input_size_of(name)
    forward = ir.serde.serialize_model(trace_to_onnx(module, size)).SerializeToString()
    with tempfile.TemporaryDirectory(prefix="gradmap-speed-") as folder:
        loaded = export_default(name, Path(folder), threads)
    block = loaded.lowering.block
    # the plain forward with onnxruntime's default options; gradmap's graph as gradmap's runtime loads it
    s_forward = cpu_session(forward, threads)
    s_gradient = loaded.session
    run_floor = None
    if floor:
        from floor import build_floor_model, floor_runner

        floor_model = build_floor_model(module, size, block=block)
        run_floor = floor_runner(ir.serde.serialize_model(floor_model).SerializeToString(), threads)
    from gradmap.runtime.model import session_options

    # the same model exported by an earlier commit (bench/export_baseline.py)
    s_baseline = cpu_session(str(baseline / f"{name}.onnx"), threads, session_options(threads)) if baseline else None
    try:
        from captum.attr import Saliency
    except ImportError:  # captum is optional here
        Saliency = None
    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        image = rng.standard_normal((batch, 3, *size), dtype=np.float32)
        target = np.full(batch, -1, dtype=np.int64)
        row = {"model": name, "batch": batch, "threads": threads, "block": block,
               "lowering": loaded.lowering.state, "load_average_start": _report._load_1min()}

        def autograd():
            x = torch.from_numpy(image).requires_grad_(True)
            out = module(x)
            score, _ = torch.max(out, 1)
            score.sum().backward()
            return x.grad

        variants = {
            "ort_forward_ms": lambda: s_forward.run(None, {"image": image}),
            "gradmap_ms": lambda: s_gradient.run(None, {"image": image, "target": target}),
        }
        if eager:
            variants["torch_eager_ms"] = autograd
        if run_floor is not None:
            variants["floor_ms"] = lambda: run_floor({"image": image, "target": target})
        if compile_torch:
            # torch.compile (inductor, static shapes: one compilation per model and batch, as a user
            # who picks speed would run it); the first call compiles the forward and the backward
            import torch._dynamo

            torch._dynamo.reset()
            compiled = torch.compile(module, dynamic=False)

            def compiled_saliency():
                x = torch.from_numpy(image).requires_grad_(True)
                score, _ = torch.max(compiled(x), 1)
                score.sum().backward()
                return x.grad

            t = time.perf_counter()
            compiled_saliency()
            row["torch_compile_first_s"] = time.perf_counter() - t
            variants["torch_compile_ms"] = compiled_saliency
        if s_baseline is not None:
            variants["baseline_ms"] = lambda: s_baseline.run(None, {"image": image, "target": target})
        if Saliency is not None and eager:
            saliency = Saliency(module)
            x = torch.from_numpy(image)
            with torch.no_grad():
                top = module(x).argmax(1)
            variants["captum_ms"] = lambda: saliency.attribute(x, target=top, abs=False)
        times = _interleaved_times(variants, warmup=2, repeat=repeat, budget_s=budget_s, pause_s=pause_s)
        row["load_average_end"] = _report._load_1min()
        row.update({name: statistics.median(values) for name, values in times.items()})
        row["gradmap_over_forward"] = row["gradmap_ms"] / row["ort_forward_ms"]
        # the same ratio round by round (the two ran side by side): its quartiles show the noise
        per_round = np.asarray(times["gradmap_ms"]) / np.asarray(times["ort_forward_ms"])
        row["gradmap_over_forward_quartiles"] = [float(q) for q in np.percentile(per_round, [25, 50, 75])]
        row["rounds"] = len(per_round)
        if "floor_ms" in row:
            row["floor_over_forward"] = row["floor_ms"] / row["ort_forward_ms"]
            row["gradmap_over_floor"] = row["gradmap_ms"] / row["floor_ms"]
        if "torch_compile_ms" in row:
            row["speedup_vs_torch_compile"] = row["torch_compile_ms"] / row["gradmap_ms"]
        if "baseline_ms" in times:
            row["baseline_over_forward"] = row["baseline_ms"] / row["ort_forward_ms"]
            per_round = np.asarray(times["gradmap_ms"]) / np.asarray(times["baseline_ms"])
            row["gradmap_over_baseline"] = row["gradmap_ms"] / row["baseline_ms"]
            row["gradmap_over_baseline_quartiles"] = [float(q) for q in np.percentile(per_round, [25, 50, 75])]
        row["times_ms"] = {name: [round(v, 3) for v in values] for name, values in times.items()}
        if "torch_eager_ms" in row:
            row["speedup_vs_torch"] = row["torch_eager_ms"] / row["gradmap_ms"]
        if "captum_ms" in row:
            row["speedup_vs_captum"] = row["captum_ms"] / row["gradmap_ms"]
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
        rows.append(row)
    return rows


def _frozen(name: str):
    """A torchvision model with random weights (load_torchvision's seed 0, as the export's), frozen."""
    from gradmap.export._torchvision import load_torchvision

    module, described = load_torchvision(name, "none")
    for p in module.parameters():
        p.requires_grad_(False)
    return module, described


def verdict(r: dict, floor_ratio: float | None = None) -> tuple[str, str | None]:
    """Whether a row meets the vanilla target, and for a row that misses it, what stops it.

    The target: gradmap at most ``min(eager, Captum) / TARGET``. A miss is put down to the floor when
    ``FLOOR_MARGIN`` times the floor graph's time (measured in the same rounds, or ``floor_ratio``
    times this run's forward) is over the target too: no exact graph of standard ops is expected to
    meet it on this provider. Returns ("yes" | "floor" | "no", the reason in words or None)."""
    torch_best = min(r["torch_eager_ms"], r.get("captum_ms", r["torch_eager_ms"]))
    needed = torch_best / TARGET
    if r["gradmap_ms"] <= needed:
        return "yes", None
    floor_ms = r.get("floor_ms")
    measured = floor_ms is not None
    if floor_ms is None and floor_ratio is not None:
        floor_ms = floor_ratio * r["ort_forward_ms"]
    faster = "Captum" if r.get("captum_ms", float("inf")) < r["torch_eager_ms"] else "PyTorch eager"
    head = (f"needs ≤ {needed:.1f} ms ({faster} {torch_best:.1f} ms ÷ {TARGET:g}), "
            f"{needed / r['ort_forward_ms']:.2f}× the forward")
    if floor_ms is None:
        return "no", f"{head}; gradmap {r['gradmap_ms']:.1f} ms; no floor measured"
    where = "in the same rounds" if measured else "floor table's floor ÷ forward × this run's forward"
    floor_text = (f"the floor graph ({where}) takes {floor_ms:.1f} ms, {floor_ms / r['ort_forward_ms']:.2f}× the "
                  f"forward")
    if floor_ms > r["gradmap_ms"]:
        # the floor graph does less work than gradmap's: measured slower, it is the run's noise, and
        # gradmap's own time is the lower bound the row has
        floor_text += f", more than gradmap's own {r['gradmap_ms']:.1f} ms (noise), which stands for it"
        floor_ms = r["gradmap_ms"]
    part = floor_stops(floor_ms, needed)
    if part:
        return "floor", f"{head}; {floor_text}: {part}"
    return "no", (f"{head}; {floor_text}, so a graph within {FLOOR_MARGIN:.2f}× its floor would meet it: "
                  f"gradmap is {r['gradmap_ms'] / floor_ms:.2f}× its floor")


def floor_stops(floor_ms: float, needed_ms: float) -> str | None:
    """Why the floor stops a row that needs ``needed_ms`` (FLOOR_MARGIN times the floor graph's
    ``floor_ms`` is over it), or None when a graph within that margin of its floor would meet it."""
    if FLOOR_MARGIN * floor_ms <= needed_ms:
        return None
    return ("the floor itself is over the target" if floor_ms > needed_ms
            else f"{FLOOR_MARGIN:.2f}× the floor is over the target")


def _quartiles(r: dict, key: str) -> str:
    q = r.get(key)
    return f"{q[0]:.2f}–{q[2]:.2f}" if q else "–"


def _ms(r: dict, key: str) -> str:
    return f"{r[key]:.1f}" if key in r else "–"


def floor_ratios(path: Path = FLOOR_RESULTS) -> dict:
    """floor ÷ forward per (model, batch) from bench/floor.py's last run, if there is one (for rows
    recorded without a floor of their own)."""
    if not path.exists():
        return {}
    return {(r["model"], r["batch"]): r["floor_over_forward"] for r in json.loads(path.read_text())["rows"]}


def render(rows: list[dict], meta: dict) -> str:
    floors = floor_ratios()
    blocks = sorted({r["block"] for r in rows if r.get("block") is not None})
    loaded = (f"the default export (portable) as gradmap's runtime loads it, lowered at load for this CPU's "
              f"{'/'.join(map(str, blocks))}-channel block" if blocks else "the `cpu` target")
    has_floor = any("floor_ms" in r for r in rows)
    lines = [
        _report.machine_line(meta),
        "",
        f"`{meta.get('command', 'python bench/bench_speed.py --baseline DIR --compile')}`: medians in ms of "
        "interleaved rounds (every "
        f"variant once per round, {meta['pause_s']:g} s apart), {meta['threads']} thread{'s' if meta['threads'] != 1 else ''}, random weights"
        f"{'; ' + meta['note'] if meta.get('note') else ''}. ORT forward: the plain export, "
        f"onnxruntime's default session options; gradmap: {loaded}, with gradmap's runtime "
        "options; PyTorch eager autograd as in the ResNet-50 recipe; Captum's Saliency"
        + ("; floor: bench/floor.py's floor graph in the same rounds" if has_floor else "")
        + ("; torch.compile: the same autograd on `torch.compile(module, dynamic=False)` (inductor) in steady "
           "state, its first call (compilation) beside it in seconds" if any("torch_compile_ms" in r for r in rows)
           else "")
        + f". Target: gradmap at least {TARGET:g}× faster than the faster of PyTorch eager and Captum; \"floor\" "
        f"where {FLOOR_MARGIN:.2f} × the floor graph (the least an exact standard-op gradient costs on this "
        "provider) is not that fast either, so the floor stops the row on this CPU.",
        "",
    ]
    header = ["model", "batch", "ORT forward", "gradmap", "gradmap ÷ forward", "PyTorch eager", "Captum Saliency"]
    if has_floor:
        header += ["floor (÷ forward)", "gradmap ÷ floor"]
    compiled_any = any("torch_compile_ms" in r for r in rows)
    if compiled_any:
        header.append("torch.compile (first call)")
    header += ["speed-up vs eager / Captum" + (" / compile" if compiled_any else ""),
               f"≥ {TARGET:g}× eager and Captum"]
    body, misses = [], []
    for r in rows:
        met, why = verdict(r, floors.get((r["model"], r["batch"])))
        keys = ("torch_eager_ms", "captum_ms") + (("torch_compile_ms",) if compiled_any else ())
        speedups = " / ".join(f"{r[k] / r['gradmap_ms']:.2f}×" if k in r else "–" for k in keys)
        cells = [r["model"], r["batch"], f"{r['ort_forward_ms']:.1f}", f"{r['gradmap_ms']:.1f}",
                 f"{r['gradmap_over_forward']:.2f}", f"{r['torch_eager_ms']:.1f}", _ms(r, "captum_ms")]
        if has_floor:
            cells += [f"{r['floor_ms']:.1f} ({r['floor_over_forward']:.2f})" if "floor_ms" in r else "–",
                      f"{r['gradmap_over_floor']:.2f}" if "floor_ms" in r else "–"]
        if compiled_any:
            cells.append(f"{r['torch_compile_ms']:.1f} ({r['torch_compile_first_s']:.0f} s)"
                         if "torch_compile_ms" in r else "–")
        cells += [speedups, _report.target_cell(met)]
        body.append(cells)
        if why:
            misses.append(f"- {r['model']}, batch {r['batch']} ({met}): {why}.")
    lines += _report.table(header, body)
    lines += _report.misses_lines(misses)
    if any("baseline_ms" in r for r in rows):
        lines += ["", *render_baseline(rows, meta)]
    return "\n".join(lines)


def render_baseline(rows: list[dict], meta: dict) -> list[str]:
    """gradmap's graph against the graph an earlier commit exported (--baseline), each over the
    forward of the same rounds."""
    base = meta.get("baseline") or {}
    lines = [f"The same rounds' gradient models of commit {base.get('commit', '?')[:7]} "
             "(`bench/export_baseline.py`, the same weights); gradmap ÷ before per round: quartiles of the "
             "ratio of the two runs side by side in each round.", ""]
    body = [[r["model"], r["batch"], r["rounds"], f"{r['baseline_over_forward']:.2f}", f"{r['gradmap_over_forward']:.2f}",
             f"{r['gradmap_over_baseline']:.2f} ({_quartiles(r, 'gradmap_over_baseline_quartiles')})"]
            for r in rows if "baseline_ms" in r]
    return lines + _report.table(["model", "batch", "rounds", "before ÷ forward", "gradmap ÷ forward",
                                  "gradmap ÷ before (per round)"], body)


def sections(data: dict) -> dict[str, str]:
    """The docs table of a results file."""
    return {"speed": render(data["rows"], data["meta"])}


def readme_sections(data: dict) -> dict[str, str]:
    """README's line on the speed of one gradient, from the same results."""
    rows, meta = data["rows"], data["meta"]
    floors = floor_ratios()
    verdicts = [verdict(r, floors.get((r["model"], r["batch"])))[0] for r in rows]
    over_forward = [r["gradmap_over_forward"] for r in rows]
    speedups = [min(r["torch_eager_ms"], r.get("captum_ms", r["torch_eager_ms"])) / r["gradmap_ms"] for r in rows]
    missed = [f"{r['model']} batch {r['batch']}" for r, v in zip(rows, verdicts) if v == "no"]
    # the load during the rows themselves (an --update run's own start and end cover its rows only)
    loads = [r[k] for r in rows for k in ("load_average_start", "load_average_end") if r.get(k) is not None]
    start, end = (min(loads), max(loads)) if loads else _report.load_average(meta)
    counts = (f"{verdicts.count('yes')} of {len(rows)} rows meet the {TARGET:g}x target, "
              f"{verdicts.count('floor')} are stopped by the floor (1.10x the least an exact standard-op graph costs "
              "on that provider is over the target)")
    counts += f", {len(missed)} miss it ({', '.join(missed)})" if missed else ""
    line = (f"- One gradient of the default export, lowered at load, cost {min(over_forward):.1f} to "
            f"{max(over_forward):.1f} forward passes on onnxruntime's CPU provider, and was {min(speedups):.2f} to "
            f"{max(speedups):.2f} times as fast as the faster of PyTorch eager autograd and Captum on the speed "
            f"table's {len(rows)} rows; {counts} (`bench/bench_speed.py` on {_report.cpu_text(meta)}, "
            f"{meta.get('date') or 'date ' + _report.NOT_RECORDED}, 1-minute load average "
            f"{_report._or_not(start)} to {_report._or_not(end)} during its rows; `bench/results/speed.json`, "
            "[speed table](docs/benchmarks.md#speed-of-one-gradient)).")
    return {"speed-summary": line}


def floor_rows(rows: list[dict]) -> list[dict]:
    """bench/floor.py's rows from the rows of a run that timed the floor graph."""
    keep = ("model", "batch", "threads", "rounds", "ort_forward_ms", "gradmap_ms", "floor_ms",
            "gradmap_over_forward", "floor_over_forward", "gradmap_over_floor")
    out = []
    for r in rows:
        if "floor_ms" in r:
            out.append({**{k: r[k] for k in keep},
                        "times_ms": {k: r["times_ms"][k] for k in ("ort_forward_ms", "gradmap_ms", "floor_ms")}})
    return out


def model_batches(spec: str, batches: list[int]) -> tuple[str, list[int]]:
    """``NAME`` (the run's --batches) or ``NAME:B1,B2`` (those batches for that model)."""
    name, _, own = spec.partition(":")
    if not own:
        return name, batches
    try:
        return name, [int(b) for b in own.split(",")]
    except ValueError:
        raise SystemExit(f"--models {spec}: expected NAME or NAME:B1,B2 with whole batch sizes") from None


def measure_apart(name: str, batches: list[int], args) -> list[dict]:
    """One model's rows, measured in a process of its own: its sessions, arenas and torch's memory go
    when it ends, so a run of large models at batch 8 peaks at one model's memory."""
    with tempfile.TemporaryDirectory(prefix="gradmap-speed-rows-") as folder:
        out = Path(folder) / "rows.json"
        cmd = [sys.executable, __file__, "--rows-to", str(out), "--models", name, "--batches", *map(str, batches),
               "--threads", str(args.threads), "--repeat", str(args.repeat), "--budget", str(args.budget),
               "--pause", str(args.pause)]
        cmd += ["--baseline", str(args.baseline)] if args.baseline else []
        cmd += ["--compile"] if args.compile else []
        cmd += ["--no-floor"] if args.no_floor else []
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: its measuring process failed with exit status {proc.returncode}"
                             + (" (killed: out of memory?)" if proc.returncode in (-9, 137) else ""))
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="model names; NAME:B1,B2 measures that model at those batches instead of --batches")
    parser.add_argument("--rows-to", type=Path, default=None, help=argparse.SUPPRESS)  # measure_apart's child
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15, help="rounds (each runs every variant once)")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of rounds per model and batch at most")
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds between two timed calls (onnxruntime's pool threads spin after a run)")
    _report.add_flags(parser, RESULTS, note=True, update=True)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a folder of gradient models exported by an earlier commit (bench/export_baseline.py), "
                             "timed in the same rounds")
    parser.add_argument("--compile", action="store_true",
                        help="also time PyTorch autograd on torch.compile's module (steady state; compile time recorded)")
    parser.add_argument("--no-floor", action="store_true",
                        help="leave out the floor graph (the table then takes floor ÷ forward from floor.json)")
    args = _report.parse_args(parser)
    if args.rows_to:
        rows = []
        for name in args.models:
            rows += bench_model(name, args.batches, args.threads, args.repeat, args.budget, args.pause,
                                baseline=args.baseline, compile_torch=args.compile, floor=not args.no_floor)
        _report.write_json(args.rows_to, rows)
        return 0

    def measure():
        baseline = json.loads((args.baseline / "baseline.json").read_text()) if args.baseline else None
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "captum"), threads=args.threads,
                                 baseline=baseline, pause_s=args.pause, gradmap_session_options="runtime",
                                 note=args.note)
        previous = {}
        if args.out.exists():
            for r in _report.read_results(args.out)["rows"]:
                previous[(r["model"], r["batch"])] = r["gradmap_over_forward"]
        rows = []
        for spec in args.models:
            name, batches = model_batches(spec, args.batches)
            rows += measure_apart(name, batches, args)
            # saved after every model, so a run cut short keeps what it measured (not published)
            _report.write_results(args.out.parent / "partial" / args.out.name, meta, rows, final=False)
        for r in rows:
            r["previous_gradmap_over_forward"] = previous.get((r["model"], r["batch"]))
        rows, meta = _report.updated(args, meta, rows)
        data = _report.write_results(args.out, meta, rows)
        (args.out.parent / "partial" / args.out.name).unlink(missing_ok=True)
        floors = floor_rows(rows)
        if floors and args.out == RESULTS and not args.update:
            import floor

            floor_meta = {**meta, "docs": [{"page": floor.PAGE, "sections": list(floor.SECTIONS)}],
                          "note": "the floor graph timed by bench/bench_speed.py in the speed table's rounds"
                                  + (f"; {meta['note']}" if meta.get("note") else "")}
            _report.write_json(FLOOR_RESULTS, {"meta": floor_meta, "rows": floors})
            if not args.no_docs:
                _report.write_sections(floor.PAGE, floor.sections(_report.read_results(FLOOR_RESULTS)))
        return data

    _report.render_or_measure(args, PAGE, sections, measure, readme_sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
