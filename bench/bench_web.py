"""Time to first map of `gradmap web`'s page in headless Chromium, and the page's weight.

For the demo model and resnet18 (random weights, 224x224, exported here), each configuration is
loaded in a fresh page `--repeats` times with the test hook (?image=...): time to first map is
``performance.now()`` when the first map is drawn, counted from navigation (fetching the model,
creating the onnxruntime-web session, decoding, preprocessing, the model run and postprocessing).
Configurations: WebAssembly with 1 and 2 threads (cross-origin isolated), and WebGPU on SwiftShader
(Chromium's CPU Vulkan) for a portable export, reported as failed with its error if it does not run.

    python bench/bench_web.py            # writes bench/results/web.json and the section "web-speed" of docs/web.md
    python bench/bench_web.py --tables-only

Needs torch for the resnet18 export, Playwright, /usr/bin/chromium and tests/web's npm install.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import _report

ORT_DIST = _report.ROOT / "tests" / "web" / "node_modules" / "onnxruntime-web" / "dist"
RESULTS = _report.RESULTS / "web.json"
PAGE, SECTIONS = "web.md", ("web-speed",)
SWIFTSHADER = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-vulkan=swiftshader",
               "--use-webgpu-adapter=swiftshader", "--use-angle=swiftshader"]


def site_weight(root: Path, backend: str) -> dict:
    """Bytes the browser fetches: the model, the page and the onnxruntime-web files of the backend used
    (a portable site holds the files of both backends; a page fetches one set)."""
    from gradmap.web import ORT_FILES

    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    model = sizes.get("model.onnx", 0)
    runtime = sum(sizes.get(f"ort/{name}", 0) for name in ORT_FILES[backend])
    page = sum(v for k, v in sizes.items() if k in ("index.html", "app.js", "gradmap.js", "style.css", "model.json"))
    return {"model": model, "onnxruntime_web": runtime, "page": page}


def measure(browser, url: str, repeats: int) -> dict:
    times, errors, backend = [], [], None
    for _ in range(repeats):
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=600_000)
        result = json.loads(page.text_content("#result"))
        page.close()
        if "error" in result:
            errors.append(result["error"])
            break
        times.append(result["first_map_ms"])
        backend = (result["backend"], result["threads"], result["ms"])
    if errors:
        return {"error": errors[0][:300]}
    return {"first_map_ms": statistics.median(times), "runs": times, "backend": backend[0], "threads": backend[1],
            "map_ms_last": backend[2]}


def run(repeats: int) -> list[dict]:
    from playwright.sync_api import sync_playwright

    from gradmap.demo import demo_assets
    from gradmap.web import build_site, make_server

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = [("demo (64x64)", Path(str(demo_assets().joinpath("shapes.onnx"))), None,
                   Path(str(demo_assets().joinpath("images", "star_0.png"))))]
        from gradmap.export import export_torchvision
        from PIL import Image
        from skimage import data

        photo = tmp / "chelsea.png"
        Image.fromarray(data.chelsea()).save(photo)
        export_torchvision("resnet18", tmp / "resnet18.onnx", weights="none", verify=False)
        export_torchvision("resnet18", tmp / "resnet18_portable.onnx", weights="none", verify=False, target="portable")
        models.append(("resnet18 (224x224)", tmp / "resnet18.onnx", tmp / "resnet18_portable.onnx", photo))
        with sync_playwright() as playwright:
            plain = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
            gpu = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=SWIFTSHADER)
            for name, model, portable, picture in models:
                for kind, path in (("cpu", model), ("portable", portable)):
                    if path is None:
                        continue
                    root = tmp / f"site-{path.stem}"
                    build_site(path, root, ort_dist=ORT_DIST, examples=[picture])
                    server = make_server(root, 0)
                    threading.Thread(target=server.serve_forever, daemon=True).start()
                    base = f"http://127.0.0.1:{server.server_address[1]}/index.html?image=examples/{picture.name}"
                    configs = [("WebAssembly, 1 thread", plain, "&backend=wasm&threads=1"),
                               ("WebAssembly, 2 threads", plain, "&backend=wasm&threads=2")]
                    if kind == "portable":
                        configs = [("WebGPU (SwiftShader)", gpu, "&backend=webgpu")]
                    for label, browser, query in configs:
                        row = {"model": name, "export": kind, "config": label, **measure(browser, base + query, repeats),
                               "weight": site_weight(root, "webgpu" if kind == "portable" else "wasm")}
                        print(json.dumps(row))
                        rows.append(row)
                    server.shutdown()
                    server.server_close()
            plain.close()
            gpu.close()
    return rows


def render(results: dict) -> str:
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    meta = results["meta"]
    lines = [_report.machine_line(meta), "",
             f"`python bench/bench_web.py`: time to first map in headless Chromium on a shared machine, "
             f"median of {meta['repeats']} fresh page loads each: from navigation to the "
             "first map drawn (model download from 127.0.0.1, session creation, decoding, preprocessing, the "
             "vanilla gradient, postprocessing); the last column is the map alone on the last load. Page weight: what "
             "the browser downloads (model + onnxruntime-web's files + the page). Downloading the model and creating the "
             "session take most of the time to first map, so a second thread shortens the map but not always the "
             "first map on this busy machine; every load's time is in bench/results/web.json.", "",
             "| model | backend | time to first map | map alone | model | onnxruntime-web | page |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        w = row["weight"]
        if "error" in row:
            timing, alone = f"fails: {row['error'][:120]}", ""
        else:
            timing, alone = f"{row['first_map_ms'] / 1000:.2f} s", f"{row['map_ms_last']:.0f} ms"
        lines.append(f"| {row['model']}, {row['export']} export | {row['config']} | {timing} | {alone} | "
                     f"{mb(w['model'])} | {mb(w['onnxruntime_web'])} | {w['page'] / 1e3:.0f} kB |")
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"web-speed": render(data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    _report.add_flags(parser, RESULTS)
    args = _report.parse_args(parser)

    def measure():
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "playwright"), repeats=args.repeats,
                                 chromium="Debian chromium (headless)")
        return _report.write_results(args.out, meta, run(args.repeats))

    print(render(_report.render_or_measure(args, PAGE, sections, measure)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
