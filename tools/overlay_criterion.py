"""Which overlay lets a person see what the map found? Measured on the demo's 200 evaluation images.

For every image (vanilla gradient of its labelled class, the demo model) and every overlay recipe:

    on object   share of the colour the overlay adds, sum |overlay - picture| over pixels and channels,
                that falls on the object mask (higher: the colour marks the object, not the clutter);
                the deciding figure
    per pixel   mean added colour per object pixel (how visible the mark is)
    off object  mean added colour per off-object pixel, in 0..255 units (lower: the rest of the
                picture stays visible)

Recipes: "flat equalized" is what gradmap run drew until now (the histogram-equalized map, hot
colormap, opacity 0.5 everywhere); "peaks" blends the map divided by its Nth percentile (clipped at 1,
as PAIR saliency's VisualizeImageGrayscale) with opacity alpha * value. Object area share is the
reference: colour spread evenly would put that share on the object.

    python tools/overlay_criterion.py                 # writes bench/results/overlay_criterion.json and the
                                                      # section "overlay" of docs/attribution.md
    python tools/overlay_criterion.py --tables-only   # the docs table again from the results file
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _report  # noqa: E402

from gradmap.runtime import SaliencyModel, iter_saliency, render_overlay  # noqa: E402
from gradmap.runtime.postprocess import scale_to_percentile  # noqa: E402
from gradmap.runtime.render import OVERLAY_ALPHA, OVERLAY_PERCENTILE  # noqa: E402

ROOT = _report.ROOT
RESULTS = _report.RESULTS / "overlay_criterion.json"
PAGE, SECTIONS = "attribution.md", ("overlay",)

RECIPES = [("flat equalized, alpha 0.5 (before)", "equalized", None, 0.5, False),
           ("flat min-max, alpha 0.5", "normalized", None, 0.5, False)]
RECIPES += [(f"peaks p{p:g}, alpha {a:g}", "normalized", p, a, True)
            for p in (95.0, 99.0, 99.9) for a in (0.6, 0.8, 1.0)]


def measure(out: Path) -> dict:
    meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime",), method="vanilla")
    data = np.load(ROOT / "models" / "demo" / "eval_set.npz")
    model = SaliencyModel(ROOT / "models" / "demo" / "shapes.onnx", provider="cpu", threads=2)
    images, masks, labels = data["images"], data["masks"].astype(bool), data["labels"]
    shares = {name: [] for name, *_ in RECIPES}
    off = {name: [] for name, *_ in RECIPES}
    on = {name: [] for name, *_ in RECIPES}
    pictures = [Image.fromarray(i) for i in images]
    for i in range(len(pictures)):
        # the labelled class, as gradmap evaluate explains it
        (result,) = iter_saliency(model, [pictures[i]], target=int(labels[i]), batch_size=1)
        saliency = result.maps[0]
        base = np.asarray(pictures[i], dtype=np.float64)
        for name, kind, percentile, alpha, weighted in RECIPES:
            values = saliency.equalized_map if kind == "equalized" else saliency.saliency_map
            if percentile is not None:
                values = scale_to_percentile(values, percentile)
            overlay = np.asarray(render_overlay(pictures[i], values, None, "hot", alpha, weighted=weighted), np.float64)
            added = np.abs(overlay - base).sum(axis=2)
            total = added.sum()
            shares[name].append(float(added[masks[i]].sum() / total) if total > 0 else 0.0)
            off[name].append(float(added[~masks[i]].mean() / 3))
            on[name].append(float(added[masks[i]].mean() / 3))
    area = float(masks.mean())
    rows = [{"recipe": name, "on_object": float(np.mean(shares[name])), "per_object_pixel": float(np.mean(on[name])),
             "off_object": float(np.mean(off[name]))}
            for name, *_ in RECIPES]
    meta.update(images=int(len(images)), object_area_share=area,
                chosen=f"peaks p{OVERLAY_PERCENTILE:g}, alpha {OVERLAY_ALPHA:g}")
    return _report.write_results(out, meta, rows)


def render(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    area = meta["object_area_share"]
    lines = [_report.machine_line(meta), "",
             f"Overlay recipes on the demo's {meta['images']} evaluation images (vanilla gradient of the labelled class; "
             f"`python tools/overlay_criterion.py`): share of the colour an overlay adds that falls on the object "
             f"(the object covers {area:.1%} of the pixels on average) and mean colour added per off-object pixel "
             "(0-255), and per object pixel. The share decides; the opacity scales all added colour alike and leaves "
             "the share as it is, so it was chosen for a visible mark on the object with the rest left readable. "
             "The default is in bold.", "",
             "| overlay | share of added colour on the object ↑ | per object pixel | per off-object pixel ↓ |",
             "|---|---|---|---|"]
    for row in rows:
        name = f"**{row['recipe']}**" if row["recipe"] == meta["chosen"] else row["recipe"]
        lines.append(f"| {name} | {row['on_object']:.3f} | {row['per_object_pixel']:.1f} | {row['off_object']:.1f} |")
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"overlay": render(data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    data = _report.read_results(args.out) if args.tables_only else measure(args.out)
    print(render(data))
    if not args.no_docs:
        _report.publish(PAGE, sections(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
