"""Train and export gradmap's demo vision transformer: a small ViT on the demo's shapes among
clutter (``make_demo.py``'s data, same classes, same held-out evaluation set), so that the methods
that read a transformer's attention or its token map (attention rollout, attention relevance, the
CAM family on the token grid) get map-quality rows on the same pictures as the demo CNN.

Usage (from the repository root, CPU only, one torch thread; the committed model trained for
about 40 min on a 2-core machine shared with other work, load average 9 to 12):

    python models/make_demo_vit.py [--out models/demo_vit] [--checkpoints DIR]

The network is timm's ``VisionTransformer``: one token per 8 x 8 patch of the 64 x 64 picture (an
8 x 8 grid) from a convolutional stem, and a class token, pre-norm blocks, the class token's output
through a LayerNorm and a linear layer (``build_model``). The data come from ``make_demo.make_split`` (each image from its own seed, ``(SEED, split,
index)``), with more training pictures than the CNN's (a ViT has no convolution's prior that a
shape is a shape wherever it is, and learns it from more examples), the same test split and the
same 200 evaluation pictures (``models/demo/eval_set.npz``, not copied here). Training is
``make_demo.train`` (AdamW, one-cycle learning rate, random horizontal flips) on a seeded generator
and a fixed number of torch threads (the weights depend on it; the data do not), in ``--cycles``
one-cycle schedules back to back; ``--checkpoints DIR`` keeps each cycle's weights, and a run
stopped between cycles goes on from the last one with the same result.

Writes to ``--out``:
    shapes_vit.onnx                 trained network, exported with its input gradient, the token
                                    map of the last block's first LayerNorm (``--cam-layer auto``)
                                    and every block's attention probabilities and their gradients
                                    (``--attention``); gradient checked against torch autograd
    shapes_vit_randomized_top.onnx  the same network with its classifier, its final LayerNorm and
                                    its last block re-initialized (model-parameter randomization,
                                    Adebayo et al. 2018), exported the same way
    metrics.json                    train / test / eval accuracy, model and training settings
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo  # noqa: E402  (the demo's data, tensors, training loop and accuracy: shared, not copied)

DEMO = Path(__file__).resolve().parent / "demo"
TRAIN_SIZE = 30000
PATCH = 8
EMBED_DIM = 96
DEPTH = 4
HEADS = 4
MLP_RATIO = 2.0

logger = logging.getLogger("make_demo_vit")


def build_model(dim: int = EMBED_DIM, depth: int = DEPTH, heads: int = HEADS, mlp_ratio: float = MLP_RATIO,
                stem: str = "conv"):
    """timm's VisionTransformer for 64 x 64 pictures: 8 x 8 patches (an 8 x 8 grid of 64 patch tokens
    and a class token), ``depth`` pre-norm blocks of ``heads`` heads, the class token's output read
    by a linear classifier after the final LayerNorm.

    ``stem="conv"`` (the demo's): the patch embedding is a convolutional stem instead of one linear
    map of each 8 x 8 patch (Xiao et al. 2021, "Early convolutions help transformers see better"):
    three 3 x 3 convolutions of stride 2 (BatchNorm, ReLU; circular padding as the demo CNN's) and a
    1 x 1 projection to the token width, still one token per 8 x 8 patch (each sees 15 x 15 px).
    With the linear patch embedding (``stem="linear"``) this ViT was still at chance after a
    30,000-picture epoch (loss 1.614, test accuracy 0.211), a quarter of the training budget."""
    import torch.nn as nn
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=make_demo.IMAGE_SIZE, patch_size=PATCH, num_classes=len(make_demo.CLASS_NAMES),
                              embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, global_pool="token")
    if stem == "conv":
        def conv(cin: int, cout: int) -> list:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, padding_mode="circular", bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU()]

        model.patch_embed.proj = nn.Sequential(*conv(3, dim // 4), *conv(dim // 4, dim // 2), *conv(dim // 2, dim),
                                               nn.Conv2d(dim, dim, 1))
    return model


def randomize_top(model, seed: int, blocks: int = 1):
    """A copy of ``model`` whose classifier, final LayerNorm and last ``blocks`` transformer blocks
    are re-initialized (PyTorch defaults), top down, as ``make_demo.randomize_top`` does for the CNN."""
    import torch

    randomized = copy.deepcopy(model)
    torch.manual_seed(seed)
    for part in [randomized.head, randomized.norm, *reversed(list(randomized.blocks)[-blocks:])]:
        for module in part.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return randomized.eval()


def load_data(train_size: int, jobs: int, cache: Path | None):
    """Training and test pictures and labels from make_demo's generator (cached in ``cache``)."""
    if cache is not None and cache.exists():
        data = np.load(cache)
        if len(data["train_images"]) >= train_size:
            return (data["train_images"][:train_size], data["train_labels"][:train_size],
                    data["test_images"], data["test_labels"])
    train_images, _, train_labels = make_demo.make_split("train", train_size, jobs)
    test_images, _, test_labels = make_demo.make_split("test", make_demo.TEST_SIZE, jobs)
    if cache is not None:
        np.savez(cache, train_images=train_images, train_labels=train_labels, test_images=test_images,
                 test_labels=test_labels)
    return train_images, train_labels, test_images, test_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo_vit")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per learning-rate cycle")
    parser.add_argument("--cycles", type=int, default=2, help="one-cycle schedules, back to back (default 2)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="save the weights after each cycle here, and go on from the last one saved")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dim", type=int, default=EMBED_DIM)
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--mlp-ratio", type=float, default=MLP_RATIO)
    parser.add_argument("--stem", choices=("conv", "linear"), default="conv", help="the patch embedding (see build_model)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training (default 1: the trained weights depend on it; on a loaded "
                             "2-core machine one thread trained three times faster than two)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="processes rendering the data (default 2; the data do not depend on it)")
    parser.add_argument("--state", type=Path, default=None,
                        help="load the trained weights from this state-dict file if it exists, else save them there")
    parser.add_argument("--cache", type=Path, default=None, help="reuse generated images from this .npz (written if missing)")
    parser.add_argument("--no-export", action="store_true", help="train and report the accuracy only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from gradmap.contract import Preprocessing
    from gradmap.export import export_module

    torch.set_num_threads(args.threads)
    torch.manual_seed(make_demo.SEED)
    started = time.perf_counter()
    train_images, train_labels, test_images, test_labels = load_data(args.train_size, args.jobs, args.cache)
    evaluation = np.load(DEMO / "eval_set.npz")
    logger.info("%d train, %d test pictures (%.0f s)", len(train_images), len(test_images), time.perf_counter() - started)

    # the CNN's normalization (make_demo.py, from its training pictures): one preprocessing for both demo models
    cnn = json.loads((DEMO / "metrics.json").read_text())["preprocessing"]
    mean, std = np.array(cnn["mean"], dtype=np.float32), np.array(cnn["std"], dtype=np.float32)
    x_train = make_demo._to_tensor(train_images, mean, std)
    x_test = make_demo._to_tensor(test_images, mean, std)
    x_eval = make_demo._to_tensor(evaluation["images"], mean, std)

    model = build_model(args.dim, args.depth, args.heads, args.mlp_ratio, args.stem)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("ViT: %d parameters", parameters)
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=make_demo.SEED)
    if args.state is not None and args.state.exists():
        model.load_state_dict(torch.load(args.state))
    else:
        # ``cycles`` one-cycle schedules back to back (warm restarts), cycle k on generator seed SEED + k,
        # each saved to --checkpoints when given, so that a stopped run goes on from its last cycle and
        # ends with the same weights as an uninterrupted one
        cycle_seconds = []
        for cycle in range(args.cycles):
            checkpoint = None if args.checkpoints is None else args.checkpoints / f"cycle{cycle + 1}.pt"
            if checkpoint is not None and checkpoint.exists():
                model.load_state_dict(torch.load(checkpoint))
                logger.info("cycle %d/%d: weights from %s", cycle + 1, args.cycles, checkpoint)
                continue
            train_started = time.perf_counter()
            make_demo.train(model, x_train, train_labels, **{**settings, "seed": make_demo.SEED + cycle},
                            x_test=x_test, y_test=test_labels)
            cycle_seconds.append(round(time.perf_counter() - train_started, 1))
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), checkpoint)
        settings.update(cycles=args.cycles, seeds=[make_demo.SEED + k for k in range(args.cycles)],
                        seconds_per_cycle_run_here=cycle_seconds)
        if args.state is not None:
            torch.save(model.state_dict(), args.state)
    model.eval()
    randomized = randomize_top(model, seed=make_demo.SEED + 1)
    metrics = {
        "train_accuracy": make_demo.accuracy(model, x_train, train_labels),
        "test_accuracy": make_demo.accuracy(model, x_test, test_labels),
        "eval_accuracy": make_demo.accuracy(model, x_eval, evaluation["labels"]),
        "randomized_test_accuracy": make_demo.accuracy(randomized, x_test, test_labels),
    }
    logger.info("held-out test accuracy %.4f (%d pictures), eval set %.4f, train %.4f, randomized top %.4f",
                metrics["test_accuracy"], len(test_images), metrics["eval_accuracy"], metrics["train_accuracy"],
                metrics["randomized_test_accuracy"])
    if args.no_export:
        return

    preprocessing = Preprocessing(crop=(make_demo.IMAGE_SIZE, make_demo.IMAGE_SIZE), resize=None,
                                  interpolation="bilinear", mean=tuple(float(m) for m in mean),
                                  std=tuple(float(s) for s in std))
    args.out.mkdir(parents=True, exist_ok=True)
    weights = f"models/make_demo_vit.py seed {make_demo.SEED}"
    for module, name, description in [
            (model, "shapes_vit.onnx", weights),
            (randomized, "shapes_vit_randomized_top.onnx",
             f"{weights}, classifier, final LayerNorm and last block re-initialized (seed {make_demo.SEED + 1})")]:
        report = export_module(module, args.out / name, preprocessing=preprocessing,
                               labels=list(make_demo.CLASS_NAMES), source_model="gradmap demo shapes ViT",
                               weights=description, cam_layer="auto", attention=True)
        logger.info("%s", report.summary())

    metrics.update(
        classes=list(make_demo.CLASS_NAMES), image_size=make_demo.IMAGE_SIZE, seed=make_demo.SEED,
        split_sizes={"train": len(train_images), "test": len(test_images), "eval": len(evaluation["labels"])},
        model={"architecture": "timm VisionTransformer", "patch_size": PATCH, "embed_dim": args.dim,
               "depth": args.depth, "heads": args.heads, "mlp_ratio": args.mlp_ratio, "stem": args.stem,
               "parameters": parameters},
        preprocessing=preprocessing.to_dict(), training=settings, threads=args.threads,
        torch_version=torch.__version__, seconds=round(time.perf_counter() - started, 1),
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote %s in %.0f s", args.out, time.perf_counter() - started)


if __name__ == "__main__":
    main()
