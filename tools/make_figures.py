"""Regenerate the README's figures from the bundled demo model (torch-free).

    python tools/make_figures.py

docs/figures/demo_figure.png   the ResNet-50 recipe's four panels, written by `gradmap run`
docs/figures/demo_methods.png  one picture explained by every method the demo model supports
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradmap.demo import demo_assets  # noqa: E402
from gradmap.runtime.compare import explain_with_methods, render_comparison  # noqa: E402
from gradmap.runtime.methods import MethodSpec  # noqa: E402
from gradmap.runtime.model import SaliencyModel  # noqa: E402

PICTURES = ("star_0.png", "triangle_1.png")


def main() -> int:
    out = ROOT / "docs" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    assets = demo_assets()
    model_file = Path(str(assets.joinpath("shapes.onnx")))
    pictures = [Path(str(assets.joinpath("images", name))) for name in PICTURES]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "gradmap.cli", "run", str(model_file), str(pictures[0]), "--out", tmp,
                        "--format", "figure"], check=True)
        shutil.copy(next(Path(tmp).rglob("*.figure.png")), out / "demo_figure.png")
    model = SaliencyModel(model_file, provider="cpu")
    methods = [MethodSpec(name, samples=50, steps=32) for name in model.metadata.methods]
    rows = []
    for picture in pictures:
        shown, panels, caption = explain_with_methods(model, str(picture), methods)
        # the sample's file name starts with its true class: say it, the prediction may differ
        caption = f"{caption} (the picture shows a {picture.stem.rsplit('_', 1)[0]})"
        rows.append(render_comparison(shown, panels, caption=caption, panel_size=150))
    from PIL import Image

    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    top = 0
    for row in rows:
        sheet.paste(row, (0, top))
        top += row.height
    sheet.save(out / "demo_methods.png")
    print(f"wrote {out / 'demo_figure.png'} and {out / 'demo_methods.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
