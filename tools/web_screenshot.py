"""The screenshot of `gradmap web` in docs/web.md: the demo site in headless Chromium, one example explained.

    python tools/web_screenshot.py     # writes docs/figures/web_page.png

Needs Playwright for Python, /usr/bin/chromium and onnxruntime-web in tests/web (npm install there).
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradmap.demo import demo_assets  # noqa: E402
from gradmap.web import build_site, make_server  # noqa: E402

ORT_DIST = ROOT / "tests" / "web" / "node_modules" / "onnxruntime-web" / "dist"
EXAMPLE = "star_0.png"
METHOD = "grad-cam"


def main() -> int:
    from playwright.sync_api import sync_playwright

    assets = demo_assets()
    pictures = sorted(str(p) for p in Path(str(assets.joinpath("images"))).glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        build_site(Path(str(assets.joinpath("shapes.onnx"))), tmp, ort_dist=ORT_DIST, examples=pictures)
        server = make_server(tmp, 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 660})
                page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
                page.wait_for_function("document.body.dataset.state === 'ready'", timeout=120_000)
                page.select_option("#method", METHOD)
                page.click(f"#examples button[title='{EXAMPLE}']")
                page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
                out = ROOT / "docs" / "figures" / "web_page.png"
                page.screenshot(path=str(out))
                browser.close()
        finally:
            server.shutdown()
            server.server_close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
