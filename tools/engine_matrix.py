"""The engine matrix of issue 19: every family of tests/test_export.py exported by gradmap and run on
every engine of tests/engines, each engine's gradient compared with float64 torch autograd replaying
that engine's own max-pool and ReLU decisions (tests/engines/parity.py), within the export's tolerance policy
(gradmap.graph.parity.Tolerance: ten times torch's own float32 error on the batch, at least 1e-4).

    python tools/engine_matrix.py                       # all 21 families (slow: an hour or more)
    python tools/engine_matrix.py --families resnet,vit # a subset; other entries of the JSON stay
    python tools/engine_matrix.py --tables-only         # the docs table again from the JSON

The portable target runs on every engine, the cpu target on onnxruntime CPU. Each family runs in its
own process (a crashed or exhausted engine takes only that family down). Results go to
bench/results/engine_matrix.json after each family, and the `engines` section of docs/engines.md is
rebuilt from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _report  # noqa: E402

ROOT = _report.ROOT
RESULTS = _report.RESULTS / "engine_matrix.json"
PAGE, SECTIONS = "engines.md", ("engines",)
TARGETS = {"portable": ("ort_cpu", "ort_wasm_node", "ort_wasm_chromium", "ort_webgpu", "openvino"),
           "cpu": ("ort_cpu",)}
BROWSER_TIMEOUT_S = 300
COLUMNS = [("cpu", "ort_cpu", "onnxruntime CPU, cpu target"), ("portable", "ort_cpu", "onnxruntime CPU"),
           ("portable", "ort_wasm_node", "ort-web wasm, Node"), ("portable", "ort_wasm_chromium", "ort-web wasm, Chromium"),
           ("portable", "ort_webgpu", "ort-web WebGPU, Chromium"), ("portable", "openvino", "OpenVINO CPU")]


def families() -> dict[str, str]:
    from tests.test_export import FAMILIES

    return dict(FAMILIES)


def run_family(family: str, model: str, size: int | None, batch: int, work: Path) -> list[dict]:
    """Export ``model`` for each target and check it on that target's engines."""
    from gradmap.export import load_torchvision
    from gradmap.export._torchvision import preprocessing_of
    from tests.engines import versions
    from tests.engines.parity import batch_for, check_engine, export_for_engines

    from tests.engines import _browser

    # WebGPU here is SwiftShader, i.e. the CPU: a large model at 224x224 takes minutes per run (wide_resnet50_2:
    # 259 s). Past this limit the cell says "timed out" and the other engines still get their turn.
    _browser.RUN_TIMEOUT_MS = int(BROWSER_TIMEOUT_S * 1000)
    pre = preprocessing_of(model)
    input_size = (size, size) if size else pre.crop
    records = []
    for target, engines in TARGETS.items():
        if size and model.startswith("vit_"):
            # a ViT's position embeddings fix its input size: build it for --size (as tests/test_engines.py
            # does at 64x64), with the same seed and zero-weight fill as load_torchvision(..., "none")
            import torch
            import torchvision

            from gradmap.export._torchvision import _fill_zero_weights

            torch.manual_seed(0)
            module = torchvision.models.get_model(model, weights=None, image_size=size)
            _fill_zero_weights(module)
            module.eval()
        else:
            module, _ = load_torchvision(model, "none")
        start = time.perf_counter()
        try:
            exported = export_for_engines(module, model, work, input_size, resize=pre.resize, target=target)
        except Exception as e:  # noqa: BLE001 - recorded, the other families go on
            records.extend({"family": family, "model": model, "target": target, "engine": engine, "status": "fails",
                            "reason": f"export: {type(e).__name__}: {e}"} for engine in engines)
            continue
        export_s = time.perf_counter() - start
        image, targets = batch_for(exported, seed=1, batch=batch)
        for engine in engines:
            start = time.perf_counter()
            # WebGPU on SwiftShader (a CPU) takes minutes per run of a large model at 224x224 and its
            # speed says nothing about a GPU's: one run, its time marked as a first run
            repeat = 1 if engine == "ort_webgpu" else 2
            check = check_engine(engine, exported, image, targets, repeat=repeat)
            record = {"family": family, "model": model, "target": target, "engine": engine,
                      "input_size": list(input_size), "batch": batch, "export_note": exported.export_note,
                      "export_s": round(export_s, 1), "status": check.status, "reason": check.error,
                      "problems": check.problems, "logits_error": check.logits_error,
                      "gradient_error": check.gradient_error, "gradient_limit": check.gradient_limit,
                      "own_gradient": check.own_gradient, "vs_ort_cpu": check.vs_ort_cpu,
                      "largest_override": check.largest_override, "replayed": check.replayed,
                      "run_ms": check.run_ms, "runs": repeat, "wall_s": round(time.perf_counter() - start, 1),
                      "notes": check.notes[:5], "versions": versions()}
            print(f"  {family} {target} {engine}: {check.status} "
                  f"{check.error or ''}{'; '.join(check.problems)} grad {check.gradient_error} "
                  f"run {check.run_ms} ms, {record['wall_s']} s", flush=True)
            records.append(record)
        for file in (exported.path, exported.exposed_path):
            file.unlink(missing_ok=True)
    return records


def _load(path: Path | None = None) -> dict:
    path = path or RESULTS
    return _report.read_results(path) if path.exists() else {"meta": {}, "rows": []}


def _merge(records: list[dict], path: Path, meta: dict, code: str | None = None) -> dict:
    """``records`` into the results file at ``path``, replacing the entries of the same family, target
    and engine. ``meta`` is this run's (:func:`_report.start_run`); the file's earlier runs stay beside
    it, so that the table's header names every machine its rows came from."""
    data = _load(path)
    keys = {(r["family"], r["target"], r["engine"]) for r in records}
    rows = [r for r in data["rows"] if (r["family"], r["target"], r["engine"]) not in keys] + records
    rows.sort(key=lambda r: (r["family"], r["target"], r["engine"]))
    run = {**meta, "updated": _report.start_run(PAGE)["started"], "code": code or meta["commit"]}
    earlier = data["meta"]
    if earlier.get("started") == meta["started"]:  # this run's own earlier families: keep what it kept
        run = {**run, **{k: earlier[k] for k in ("remeasured", "earlier_runs") if k in earlier}}
        run["remeasured"] = sorted(set(run.get("remeasured", [])) | {r["family"] for r in records})
    elif earlier:
        run = _report.merge_update(run, earlier, sorted({r["family"] for r in records}))
    return _report.write_results(path, run, rows)


def _run_meta() -> dict:
    return _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "openvino", "torch"))


def _short(reason: str, limit: int = 300) -> str:
    """An engine's error message without its boilerplate, on one line."""
    reason = " ".join(reason.split())
    for marker in ("Failed operations detailed log:", "ERROR_MESSAGE:"):
        if marker in reason:
            stage = reason.split(":", 1)[0]
            reason = f"{stage}: " + reason.split(marker, 1)[1].strip()
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def _cell(record: dict | None, footnotes: dict[str, int]) -> str:
    if record is None:
        return "–"
    if record["status"] == "fails":
        reason = _short(str(record["reason"]))
        number = footnotes.setdefault(reason, len(footnotes) + 1)
        timed_out = "Timeout" in reason or "timed out" in reason
        return f"timed out [{number}]" if timed_out else f"fails [{number}]"
    ms = record.get("run_ms")
    time_text = f", {ms:.0f} ms" if ms is not None else ""
    if ms is not None and record.get("runs") == 1:
        time_text += " (first run)"
    error = record.get("gradient_error")
    if record["status"] == "wrong":
        return f"**wrong** ({error:.2g}){time_text}"
    return f"right ({error:.1g}){time_text}"


def render(data: dict) -> str:
    results = data["rows"]
    meta = data["meta"]
    by_key = {(r["family"], r["target"], r["engine"]): r for r in results}
    fams = sorted({r["family"] for r in results})
    if not fams:
        return "No engine results yet: run `python tools/engine_matrix.py`."
    any_record = results[0]
    versions = next((r.get("versions") for r in results if r.get("versions")), {})
    sizes = sorted({tuple(r["input_size"]) for r in results if r.get("input_size")})
    notes = sorted({r.get("export_note", "") for r in results if r.get("export_note")})
    footnotes: dict[str, int] = {}
    lines = [
        _report.machine_line(meta),
        "",
        "The same exported file on five engines: onnxruntime's CPU provider in Python, onnxruntime-web's "
        "WebAssembly backend under Node.js and in headless Chromium, onnxruntime-web's WebGPU backend in headless "
        "Chromium, and OpenVINO's CPU plugin reading the ONNX file (`tests/engines`; `tests/test_engines.py` runs "
        "resnet18, mobilenet_v3_small, efficientnet_b0, densenet121, vit_b_16 and convnext_tiny at 64x64 on every "
        "engine in CI). Not run: CUDA or any GPU (there is none here: WebGPU ran on SwiftShader, Chromium's CPU "
        "implementation of Vulkan, which checks the WebGPU kernels' semantics, not a GPU's arithmetic or speed), "
        "OpenVINO's GPU and NPU plugins, onnxruntime-node, browsers other than Chromium.",
        "",
        f"`python tools/engine_matrix.py` ({meta.get('updated', '')}{', gradmap ' + meta['code'] if meta.get('code') else ''}): "
        f"{len(fams)} families, seeded random weights, "
        f"batch {any_record.get('batch', 2)}, input {', '.join('x'.join(map(str, s)) for s in sizes)}; exports: "
        f"{'; '.join(notes)}. Each cell: the engine's gradient against float64 torch autograd replaying that "
        "engine's own max-pool and ReLU decisions (max|Δ| / max|torch|; right at or under 1e-4, with logits and "
        "target_index right and every replayed decision a float32 near-tie), and the time of the second run in "
        "one session, one thread (WebGPU: the first run, on SwiftShader, i.e. on the CPU; the machine was shared "
        "and busy, so times are rough). "
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.",
        "",
        "| family | model | " + " | ".join(title for _, _, title in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for fam in fams:
        model = next(r["model"] for r in results if r["family"] == fam)
        cells = [_cell(by_key.get((fam, target, engine)), footnotes) for target, engine, _ in COLUMNS]
        lines.append(f"| {fam} | {model} | " + " | ".join(cells) + " |")
    if footnotes:
        lines.append("")
        lines += [f"[{n}] {reason}  " for reason, n in footnotes.items()]
    from tests.engines import ENGINE_BUGS

    lines += [f"{note}" for note in ([""] + meta["notes"] if meta.get("notes") else [])]
    missing = [f for f in families() if f not in fams]
    if missing:
        lines += ["", f"Not run in this pass (time): {', '.join(missing)}; `python tools/engine_matrix.py --families "
                  f"{','.join(missing)}` adds them."]
    lines += ["", "Engine bugs isolated on minimal graphs (`tests/engines/__init__.py`; `python -m tests.engines.diverge "
              "ENGINE MODEL` lists the first nodes whose outputs leave onnxruntime CPU's):", ""]
    lines += [f"- `{name}`: {text}" for name, text in ENGINE_BUGS.items()]
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"engines": render(data)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", help="comma-separated family names of tests/test_export.py FAMILIES")
    parser.add_argument("--size", type=int, help="square input size instead of each family's own")
    parser.add_argument("--batch", type=int, default=2)
    _report.add_flags(parser, RESULTS)
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these results files into --out and the docs")
    parser.add_argument("--code", help="which gradmap the results came from (a commit), recorded in the JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # worker: one family, records as JSON on stdout's last line
    parser.add_argument("--work", default=None, help="folder for the exported models (default: a temporary one)")
    args = parser.parse_args()
    if args.merge:
        for path in args.merge:
            data = _merge(_load(path)["rows"], args.out, _run_meta(), code=args.code)
        if not args.no_docs:
            _report.publish(PAGE, sections(data))
        return
    if args.tables_only:
        _report.publish(PAGE, sections(_report.read_results(args.out)))
        return
    all_families = families()
    if args.one:
        import tempfile

        work = Path(args.work or tempfile.mkdtemp(prefix="gradmap-matrix-"))
        records = run_family(args.one, all_families[args.one], args.size, args.batch, work)
        print("RECORDS " + json.dumps(records, default=float), flush=True)
        return
    chosen = args.families.split(",") if args.families else list(all_families)
    unknown = [f for f in chosen if f not in all_families]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(all_families)}")
    meta = _run_meta()
    for family in chosen:
        print(f"{family} ({all_families[family]})", flush=True)
        cmd = [sys.executable, __file__, "--one", family, "--batch", str(args.batch)]
        if args.size:
            cmd += ["--size", str(args.size)]
        if args.work:
            cmd += ["--work", args.work]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        records = None
        for line in proc.stdout:
            if line.startswith("RECORDS "):
                records = json.loads(line[len("RECORDS "):])
            else:
                print(line, end="", flush=True)
        proc.wait()
        if records is None:
            records = [{"family": family, "model": all_families[family], "target": target, "engine": engine,
                        "status": "fails", "reason": f"the worker process died (exit status {proc.returncode})"}
                       for target, engines in TARGETS.items() for engine in engines]
        data = _merge(records, args.out, meta, code=args.code)
        if not args.no_docs:
            _report.publish(PAGE, sections(data))


if __name__ == "__main__":
    main()
