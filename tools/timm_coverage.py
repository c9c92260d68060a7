"""Coverage as data: export one small model of every timm family (timm's model modules) and every
Transformers image-classification architecture with random weights, check parity with float64 torch
autograd, and write bench/results/coverage.json and the coverage table of docs/coverage.md.

    python tools/timm_coverage.py                  # everything, resuming rows already in bench/results/coverage.json
    python tools/timm_coverage.py --fresh          # start over
    python tools/timm_coverage.py --only timm:resnet18 --only hf:vit
    python tools/timm_coverage.py --tables-only    # the docs table again from bench/results/coverage.json

Each family's model is the one with the fewest parameters among its smallest-sounding names (counted
on the meta device), exported at 64x64 where the model allows it (timm's img_size for models with
position embeddings), else at its configured size. Where even that model has over 150 M parameters
(DeepSeek's and Gemma 4's ViTs), it is built with two of its blocks (timm's ``depth``). Transformers models are built from their default
config shrunk to a few layers of small width. Every export runs gradmap's own parity check (the same
as ``gradmap export``): logits and gradient against float64 torch autograd, 1e-4 of max|torch|. A row
that fails says why (the exception's first line). Exports run on one thread; export times are CPU
seconds, and ``--per-model`` limits them. ``--budget`` wall-clock minutes stop the run; rows not
reached are written as not run, and a later run resumes with them.
"""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _report  # noqa: E402

RESULTS = _report.RESULTS / "coverage.json"
PAGE, SECTIONS = "coverage.md", ("coverage",)
SMALL_SIZE = (64, 64)
# names that usually mark the smallest variants of a family, most promising first
_SMALL_WORDS = ("test_", "atto", "femto", "pico", "nano", "xxs", "tiny", "xs", "mini", "small", "lite0", "b0",
                "s0", "t0", "_s", "18", "26", "050", "035", "075", "100")
# Transformers architectures that are not pixel classifiers of their own
_HF_SKIP = {
    "timm_wrapper": "wraps a timm model: covered by the timm rows and gradmap export timm:NAME",
    "imagegpt": "classifies color-cluster token ids, not pixels: there is no input gradient",
    "perceiver": "the image classifier variants take preprocessed pixel sequences with Fourier features or "
                 "learned positions; not exported by AutoModelForImageClassification's pixel interface here",
    "shieldgemma2": "a vision-language safety model (Gemma 3), not a pixel classifier",
    "siglip2": "NaFlex: the classifier takes variable-resolution patch sequences with an attention mask and "
               "per-image patch grids, which its processor sizes per image (aspect ratio kept, a patch budget); "
               "gradmap's preprocessing is one fixed crop",
    "dinat": "needs the natten package's custom neighborhood-attention kernels, which torch.onnx cannot trace",
}


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("CPU time limit for one model reached")


def smallest_timm_models() -> dict[str, str]:
    """{family (timm module): model name with the fewest parameters among its small-sounding names}."""
    import timm
    import torch

    chosen = {}
    for module in sorted(timm.list_modules()):
        names = timm.list_models(module=module)
        if not names:
            continue

        def rank(name):
            for i, word in enumerate(_SMALL_WORDS):
                if word in name:
                    return i, len(name)
            return len(_SMALL_WORDS), len(name)

        candidates = sorted(names, key=rank)[:6]
        counts = {}
        for name in candidates:
            try:
                with torch.device("meta"):
                    model = timm.create_model(name)
                counts[name] = sum(p.numel() for p in model.parameters())
            except Exception:  # noqa: BLE001 - a model that can't be built on meta: rank it last
                counts[name] = float("inf")
        chosen[module] = min(candidates, key=lambda n: (counts[n], rank(n)))
    return chosen


def hf_architectures() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def _shrink(config, image_size: int = SMALL_SIZE[0]):
    """A few layers of small width; only attributes the config has are set."""
    aliases = getattr(type(config), "attribute_map", {})

    def setattr_if(name, value):
        if hasattr(config, name) and name not in aliases:  # num_hidden_layers is num_stages in some
            current = getattr(config, name)
            if isinstance(current, (list, tuple)) and not isinstance(value, (list, tuple)):
                value = [value(i) if callable(value) else value for i in range(len(current))]
            setattr(config, name, value)

    setattr_if("hidden_size", 32)
    setattr_if("num_hidden_layers", 2)
    setattr_if("intermediate_size", 64)
    setattr_if("image_size", image_size)
    setattr_if("depths", 1)
    # CvT's stage i reads the drop-path rate of its layer i (transformers indexes the stage's
    # per-layer rates by the stage number), so stage i needs at least i + 1 layers
    setattr_if("depth", (lambda i: i + 1) if getattr(config, "model_type", "") == "cvt" else 1)
    setattr_if("hidden_sizes", lambda i: 16 * 2 ** min(i, 2))
    setattr_if("embed_dim", 16 if not isinstance(getattr(config, "embed_dim", 0), (list, tuple)) else
               (lambda i: 16 * (i + 1)))
    setattr_if("embedding_size", 16)
    setattr_if("num_attention_heads", 2 if not isinstance(getattr(config, "num_attention_heads", 0), (list, tuple))
               else 1)
    setattr_if("num_heads", 2 if not isinstance(getattr(config, "num_heads", 0), (list, tuple)) else 1)
    setattr_if("window_size", 4)
    setattr_if("num_groups", 8)  # GroupNorm groups (BiT): must divide the smaller widths
    setattr_if("patch_size", 8 if getattr(config, "model_type", "") in ("vit", "deit", "beit", "dinov2",
                                                                        "dinov2_with_registers", "vit_msn",
                                                                        "data2vec-vision", "ijepa", "clip",
                                                                        "siglip", "siglip2", "metaclip_2") else
               getattr(config, "patch_size", None))
    if isinstance(getattr(config, "stage_out_channels", None), (list, tuple)) and hasattr(config, "hidden_sizes"):
        config.hidden_sizes = list(config.stage_out_channels)  # HGNetV2's head reads the stages' widths from both
    if isinstance(getattr(config, "stem_out_channels", None), int) and isinstance(getattr(config, "hidden_sizes", None), list):
        config.stem_out_channels = config.hidden_sizes[0]  # TextNet's first stage takes the stem's width from both
    # EfficientNet's default config is B7's (depth x3.1, width x2): float32 rounding alone then moves its
    # He-initialized logits by 1e-4 to 3e-4 of their largest, in torch too; B0's scale is 1, 1
    if getattr(config, "model_type", "") == "efficientnet":
        config.depth_coefficient, config.width_coefficient, config.hidden_dim = 1.0, 1.0, 1280
    setattr_if("num_labels", 10)
    config.num_labels = 10
    for sub in ("vision_config",):
        if hasattr(config, sub) and getattr(config, sub) is not None:
            _shrink(getattr(config, sub), image_size)
    return config


MAX_PARAMETERS = 150_000_000  # the float64 reference and the export's copies of a 412 M model took 8.7 GB


def run_timm(name: str) -> dict:
    import timm.models
    import torch

    from gradmap.export._timm import export_timm

    with torch.device("meta"):
        parameters = sum(p.numel() for p in timm.create_model(name).parameters())
    cfg = timm.models.get_pretrained_cfg(name)
    sizes = [SMALL_SIZE]
    if cfg is not None and tuple(cfg.input_size[1:]) != SMALL_SIZE:
        sizes.append(tuple(cfg.input_size[1:]))
    if parameters <= MAX_PARAMETERS:
        return _export_trying_sizes(lambda size: export_timm(name, None, weights="none", input_size=size), sizes)
    # the family's smallest model is too large for this run (a 412 M ViT): the same blocks, two of them
    try:
        with torch.device("meta"):
            shallow = sum(p.numel() for p in timm.create_model(name, depth=SHALLOW_DEPTH).parameters())
    except TypeError:
        shallow = None
    if shallow is None or shallow > MAX_PARAMETERS:
        return {"status": "not run", "reason": f"the family's smallest model has {parameters / 1e6:.0f} M parameters, "
                                               f"over this run's {MAX_PARAMETERS / 1e6:.0f} M (memory)"}
    row = _export_trying_sizes(lambda size: _export_timm_shallow(name, size), sizes)
    row["depth"] = SHALLOW_DEPTH  # the table names the model "NAME (depth 2)"
    return row


SHALLOW_DEPTH = 2


def timm_shallow(name: str, size: tuple[int, int]):
    """The family's model built with :data:`SHALLOW_DEPTH` of its blocks (random weights, seed 0)."""
    import timm
    import torch

    from gradmap.export._timm import _explicit_attention

    torch.manual_seed(0)
    try:
        module = timm.create_model(name, depth=SHALLOW_DEPTH, img_size=size)
    except TypeError:
        module = timm.create_model(name, depth=SHALLOW_DEPTH)
    return _explicit_attention(module).eval()


def _export_timm_shallow(name: str, size: tuple[int, int]):
    from gradmap.export import export_module
    from gradmap.export._timm import timm_preprocessing

    module = timm_shallow(name, size)
    return export_module(module, None, preprocessing=timm_preprocessing(module, size), source_model=f"timm:{name}",
                         weights=f"none (random, seed 0, depth {SHALLOW_DEPTH})")


def hf_classifier(model_type: str, size: tuple[int, int]):
    """The table's Transformers model for ``model_type``: its default config shrunk (:func:`_shrink`),
    random weights (seed 0), as gradmap's image-to-logits module; returns (module, weights)."""
    import torch
    import transformers

    from gradmap.export._hf import _Classifier
    from gradmap.export._torchvision import _he_init

    config = _shrink(transformers.AutoConfig.for_model(model_type), size[0])
    torch.manual_seed(0)
    # the class itself: the Auto class's from_config trips over configs built by for_model (LeViT's)
    model_class = transformers.AutoModelForImageClassification._model_mapping[type(config)]
    if isinstance(model_class, tuple):  # (classifier, classifier with distillation head): LeViT
        model_class = model_class[0]
    model = model_class._from_config(config, attn_implementation="eager")
    classifier = _Classifier(model.eval(), False).eval()
    weights = "none"
    with torch.no_grad():
        logits = classifier(torch.randn(2, 3, *size))
    if float(logits.abs().max()) < 1e-3:  # the config's init lets activations vanish (MobileViT's at this
        _he_init(classifier)              # size): like torchvision's GoogLeNet, He init keeps them sane
        weights = "none, He init"
    return classifier, weights


def run_hf(model_type: str) -> dict:
    from gradmap.contract import Preprocessing
    from gradmap.export import export_module

    def build(size):
        classifier, weights = hf_classifier(model_type, size)
        return export_module(classifier, None, preprocessing=Preprocessing(crop=size),
                             source_model=f"hf:{model_type}", weights=weights)

    return _export_trying_sizes(build, [SMALL_SIZE, (224, 224)])


def _export_trying_sizes(export, sizes) -> dict:
    from gradmap.export import ParityError, UnsupportedOpsError

    errors = []
    for size in sizes:
        start = time.process_time()
        try:
            report = export(size)
        except (UnsupportedOpsError, ParityError) as e:  # the model ran: another size won't change these
            reason = (f"no gradient rule for {', '.join(sorted(e.missing))}" if isinstance(e, UnsupportedOpsError)
                      else _first_line(e))
            return {"status": "unsupported ops" if isinstance(e, UnsupportedOpsError) else "parity failed",
                    "input": list(size), "reason": reason, "seconds": round(time.process_time() - start, 1)}
        except Timeout:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is a row of the table
            errors.append((size, e, time.process_time() - start))
            continue
        return {"status": "ok", "input": list(size), "weights": report.weights, "logits_error": report.logits_error,
                "gradient_error": report.gradient_error, "seconds": round(time.process_time() - start, 1),
                "backward_nodes": report.backward_nodes}
    size, e, seconds = errors[0]  # the smallest size's failure, and the others' where they differ
    reason = "; ".join(dict.fromkeys(f"at {'x'.join(map(str, s))}: {_first_line(err)}" for s, err, _ in errors))
    return {"status": "failed", "input": list(size), "reason": reason, "seconds": round(seconds, 1)}


def _first_line(e: BaseException) -> str:
    """The first line of the innermost cause (torch.onnx wraps the real error in paragraphs of advice)."""
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = [line for line in str(root).strip().splitlines() if line.strip()]
    line = text[0] if text else ""
    prefix = "" if root is e else f"{type(root).__name__}: "
    return (prefix + line)[:300]


def load_coverage(path: Path = RESULTS) -> dict:
    """The results file as this script works on it: rows by source ("timm", "hf") and family, the
    timm family selection and the file's metadata."""
    if not path.exists():
        return {"timm": {}, "hf": {}, "meta": {}}
    return load_results_from(_report.read_results(path))


def save_results(results: dict, path: Path = RESULTS, final: bool = False) -> dict:
    rows = [{"source": source, "family": family, **row}
            for source in ("timm", "hf") for family, row in sorted(results[source].items())]
    return _report.write_results(path, results["meta"], rows, final=final, selection=results.get("selection", {}))


def table(results: dict) -> str:
    def parity(row):
        if row.get("status") == "ok":
            he_init = "He init" in row.get("weights", "")
            init = " (He init: the config's own init gives vanishing logits)" if he_init else ""
            return f"ok: logits {row['logits_error']:.1e}, gradient {row['gradient_error']:.1e}{init}"
        if row.get("status") == "not run":
            return f"not run: {row['reason']}" if row.get("reason") else "not run"
        return f"**{row['status']}**: {row.get('reason', '')}".replace("|", "\\|")

    lines = []
    for source, title, plural in (("timm", "timm family (module)", "timm families"),
                                  ("hf", "Transformers architecture", "Transformers architectures")):
        rows = dict(results.get(source, {}))
        if source == "timm":  # every family of the selection, reached or not
            for family, name in results.get("selection", {}).items():
                rows.setdefault(family, {"model": name, "status": "not run"})
        else:
            for model_type in hf_architectures():
                rows.setdefault(model_type, {"model": model_type, "status": "not supported",
                                             "reason": _HF_SKIP[model_type]} if model_type in _HF_SKIP
                                else {"model": model_type, "status": "not run"})
        ok = sum(1 for r in rows.values() if r.get("status") == "ok")
        tried = sum(1 for r in rows.values() if r.get("status") not in ("not run", "not supported"))
        unsupported = sum(1 for r in rows.values() if r.get("status") == "not supported")
        not_run = len(rows) - tried - unsupported
        lines += ["", f"{plural}: {len(rows)}; {tried} tried, {ok} of them match torch"
                      + (f"; {unsupported} not supported (why below)" if unsupported else "")
                      + (f"; {not_run} not run yet (the run's time budget; `--retry` resumes)" if not_run else "")
                      + ".", "",
                  f"| {title} | model | input | parity (max\\|Δ\\| / max\\|torch\\|) | export CPU s |",
                  "|---|---|---|---|---|"]
        for family, row in sorted(rows.items()):
            size = "x".join(str(s) for s in row.get("input", [])) or "-"
            seconds = f"{row['seconds']:.0f}" if "seconds" in row else "-"
            model = row.get("model", family) + (f" (depth {row['depth']})" if "depth" in row else "")
            lines.append(f"| {family} | {model} | {size} | {parity(row)} | {seconds} |")
    meta = results.get("meta", {})
    versions = meta.get("versions", {})
    head = (f"Generated by `python tools/timm_coverage.py` (timm {versions.get('timm', '?')}, transformers "
            f"{versions.get('transformers', '?')}, torch {versions.get('torch', '?')}; random weights, gradmap's parity "
            "check at 1e-4).")
    return _report.machine_line(meta) + "\n\n" + head + "\n" + "\n".join(lines) + "\n"


def sections(data: dict) -> dict[str, str]:
    return {"coverage": table(load_results_from(data))}


def load_results_from(data: dict) -> dict:
    results = {"timm": {}, "hf": {}, "meta": data["meta"], "selection": data.get("selection", {})}
    for row in data["rows"]:
        row = dict(row)
        results[row.pop("source")][row.pop("family")] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results")
    parser.add_argument("--only", action="append", default=[], help="timm:MODULE_OR_MODEL or hf:MODEL_TYPE")
    parser.add_argument("--budget", type=float, default=60.0, help="minutes for the whole run")
    parser.add_argument("--per-model", type=int, default=240, help="CPU seconds for one model")
    parser.add_argument("--memory-gb", type=int, default=14, help="data memory limit of the run (vgg11 needs more than 6)")
    _report.add_flags(parser, RESULTS)
    parser.add_argument("--retry", action="store_true", help="also re-run rows that did not pass (after the new ones)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {"timm": {}, "hf": {}, "meta": {}} if args.fresh else load_coverage(args.out)
    if args.tables_only:
        if not args.no_docs:
            _report.publish(PAGE, {"coverage": table(results)})
        return
    import timm
    import torch

    saved_meta = results["meta"]
    meta = _report.start_run(PAGE, SECTIONS, versions=("timm", "transformers", "torch", "onnxruntime"))
    if not results.get("selection") or saved_meta.get("selection_timm") != timm.__version__:
        results["selection"] = smallest_timm_models()
        meta["selection_timm"] = timm.__version__
    else:
        meta["selection_timm"] = saved_meta["selection_timm"]
    timm_jobs = [("timm", family, name) for family, name in results["selection"].items()]
    hf_jobs = [("hf", model_type, model_type) for model_type in hf_architectures()]
    # alternating, so that a run cut short by --budget still covers both sources
    every = max(1, round(len(timm_jobs) / max(1, len(hf_jobs))))
    jobs = []
    for i, job in enumerate(timm_jobs):
        jobs.append(job)
        if i % every == every - 1 and hf_jobs:
            jobs.append(hf_jobs.pop(0))
    jobs += hf_jobs
    if args.only:
        wanted = set(args.only)
        jobs = [j for j in jobs if f"{j[0]}:{j[1]}" in wanted or f"{j[0]}:{j[2]}" in wanted]
    if args.retry:  # rows never tried first, then the ones that did not pass, with the current code
        def tried(job):
            row = results[job[0]].get(job[1])
            return bool(row) and row.get("status") != "not run" and row.get("model") == job[2]

        failed = [j for j in jobs if tried(j) and results[j[0]][j[1]].get("status") != "ok"]
        jobs = [j for j in jobs if not tried(j)] + failed
    deadline = time.monotonic() + args.budget * 60
    signal.signal(signal.SIGPROF, _alarm)
    # a model that needs more memory fails with MemoryError instead of waking the OOM killer
    resource.setrlimit(resource.RLIMIT_DATA, (args.memory_gb << 30, resource.RLIM_INFINITY))
    torch.set_num_threads(1)  # one core: CPU seconds below are single-thread export times
    done_now: list[str] = []
    for source, family, name in jobs:
        done = results[source].get(family)
        if done and done.get("status") not in ("not run", *(("failed", "unsupported ops", "parity failed")
                                                           if args.retry else ())) \
                and done.get("model") == name and not args.only:
            continue
        if time.monotonic() > deadline:
            results[source][family] = {"model": name, "status": "not run"}
            continue
        if source == "hf" and family in _HF_SKIP:
            row = {"status": "not supported", "reason": _HF_SKIP[family]}
        else:
            signal.setitimer(signal.ITIMER_PROF, args.per_model)  # CPU seconds: the machine may be shared
            try:
                row = run_timm(name) if source == "timm" else run_hf(name)
            except Timeout:
                row = {"status": "failed", "reason": f"no result within {args.per_model} CPU seconds"}
            except Exception as e:  # noqa: BLE001
                row = {"status": "failed", "reason": _first_line(e)}
                traceback.print_exc()
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
        row["model"] = name
        results[source][family] = row
        done_now.append(f"{source}:{family}")
        results["meta"] = _report.merge_update(meta, saved_meta, done_now) if saved_meta else meta
        print(f"{source}:{family} {name}: {row['status']} {row.get('reason', '')}", flush=True)
        save_results(results, args.out)
    results["meta"] = _report.merge_update(meta, saved_meta, done_now) if saved_meta and done_now else meta
    data = save_results(results, args.out, final=True)
    if not args.no_docs:
        _report.publish(PAGE, sections(data))


if __name__ == "__main__":
    main()
