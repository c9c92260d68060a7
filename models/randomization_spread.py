"""How much the demo's randomization check depends on the random weights drawn: the vanilla
check repeated over re-initialization seeds, in torch autograd (an independent computation: for
make_demo's seed its rho equals what ``gradmap evaluate`` reports from the exported models).

Usage (from the repository root, in the full venv, with the trained weights that
``python models/make_demo.py --state STATE.pt`` saves):

    python models/randomization_spread.py --state STATE.pt [--seeds 10] [--blocks 1 2]

For each depth (classifier and the last ``blocks`` conv blocks re-initialized, as
``make_demo.randomize_top``) and each seed 1..N: the mean over the 200 eval images of Spearman's
rho between the trained model's vanilla map (max over channels of |d logit / d input|, the class
label's logit) and the re-initialized model's. Prints one line per depth; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))


def vanilla_maps(model, x, labels):
    x = x.clone().requires_grad_(True)
    model(x).gather(1, labels[:, None]).sum().backward()
    return x.grad.abs().amax(1).numpy().astype(np.float64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, required=True, help="make_demo.py --state's file")
    parser.add_argument("--demo", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from make_demo import _to_tensor, build_model, randomize_top

    from gradmap.runtime.metrics import rank_correlation

    if not args.state.is_file():
        parser.error(f"--state {args.state}: no such file (python models/make_demo.py --state {args.state} writes it)")
    metrics = json.loads((args.demo / "metrics.json").read_text())
    model = build_model(padding=metrics.get("padding", "zeros"), head=metrics.get("head", "max"))
    model.load_state_dict(torch.load(args.state, weights_only=True))
    model.eval()
    data = np.load(args.demo / "eval_set.npz")
    pre = metrics["preprocessing"]
    x = _to_tensor(data["images"], np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32))
    labels = torch.from_numpy(data["labels"])
    trained = vanilla_maps(model, x, labels)
    results = {}
    for blocks in args.blocks:
        rhos = []
        for seed in range(1, args.seeds + 1):
            other = vanilla_maps(randomize_top(model, seed=seed, blocks=blocks), x, labels)
            rhos.append(float(np.mean([rank_correlation(a, b) for a, b in zip(trained, other)])))
        results[str(blocks)] = {"seeds": list(range(1, args.seeds + 1)), "rho": rhos, "mean": float(np.mean(rhos)),
                                "std": float(np.std(rhos, ddof=1)) if len(rhos) > 1 else 0.0,
                                "above_0.3": int(sum(r > 0.3 for r in rhos))}
        r = results[str(blocks)]
        print(f"classifier + last {blocks} block(s): rho per seed {' '.join(f'{v:.3f}' for v in rhos)}; "
              f"mean {r['mean']:.3f}, sd {r['std']:.3f}, {r['above_0.3']} of {len(rhos)} above 0.3", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
