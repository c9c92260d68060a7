"""Train and export gradmap's demo vision transformer: a small ViT on the demo's shapes among
clutter (``make_demo.py``'s data, same classes, same held-out evaluation set), so that the methods
that read a transformer's attention or its token map (attention rollout, attention relevance, the
CAM family on the token grid) get map-quality rows on the same pictures as the demo CNN.

Usage (from the repository root, after ``make_demo.py``, whose CNN file gives the stem; CPU only,
two torch threads; the committed model trained for 16 min on a 2-core machine shared with other
work, load average 3 to 4):

    python models/make_demo_vit.py [--out models/demo_vit] [--checkpoints DIR] [--cache FILE]

The network is timm's ``VisionTransformer``, a hybrid: its 64 patch tokens (an 8 x 8 grid) are
read from the demo CNN's trained convolutional features (frozen), then a class token, pre-norm
blocks, the class token's output through a LayerNorm and a linear layer (``build_model``; its
docstring records the stems trained from scratch that did not learn in the time). The data come
from ``make_demo.make_split`` (each image from its own seed, ``(SEED, split, index)``; 15,000
training pictures, the first 10,000 of them the CNN's), the same test split and the same 200
evaluation pictures (``models/demo/eval_set.npz``, not copied here). Training is
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
TRAIN_SIZE = 15000
PATCH = 8
EMBED_DIM = 96
DEPTH = 4
HEADS = 4
MLP_RATIO = 2.0

logger = logging.getLogger("make_demo_vit")


def build_model(dim: int = EMBED_DIM, depth: int = DEPTH, heads: int = HEADS, mlp_ratio: float = MLP_RATIO,
                stem: str = "cnn"):
    """timm's VisionTransformer for 64 x 64 pictures: an 8 x 8 grid of 64 patch tokens and a class
    token, ``depth`` pre-norm blocks of ``heads`` heads, the class token's output read by a linear
    classifier after the final LayerNorm. The stems (the patch embedding) tried:

    - ``"cnn"`` (the demo's): a hybrid ViT (Dosovitskiy et al. 2021, section 3.1: the patch tokens
      are read from a CNN's feature map). The stem is the demo CNN's trained convolutional features
      (``cnn_stem``: models/demo/shapes.onnx's four convolutions, BatchNorm folded, with its two max
      poolings), a 2 x 2 max pooling of their 128 x 16 x 16 map to the 8 x 8 grid and a trained 1 x 1
      projection to the token width. The CNN's weights stay frozen; the projection, the transformer
      and its classifier are trained. Held-out accuracy 0.919 after one epoch of 10,000 pictures.
    - ``"conv"``: three 3 x 3 convolutions of stride 2 (BatchNorm, ReLU) and a 1 x 1 projection,
      trained from scratch (Xiao et al. 2021, "Early convolutions help transformers see better").
      Six epochs of 30,000 pictures (32 min on the loaded machine) reached only 0.403: the shapes
      among clutter take the demo CNN 14 epochs, and a ViT learns slower still. A CNN-like stem
      trained from scratch (two, then three max poolings) was still at chance after a 10,000-picture
      epoch, as was this one with learning rate 3e-4 or average pooling of the tokens.
    - ``"linear"``: one linear map of each 8 x 8 patch (plain ViT): at chance after a 30,000-picture
      epoch (loss 1.614, test accuracy 0.211)."""
    import torch.nn as nn
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=make_demo.IMAGE_SIZE, patch_size=PATCH, num_classes=len(make_demo.CLASS_NAMES),
                              embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, global_pool="token")
    if stem == "cnn":
        model.patch_embed.proj = nn.Sequential(cnn_stem(), nn.Conv2d(128, dim, 1))
    elif stem == "conv":
        def conv(cin: int, cout: int) -> list:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, padding_mode="circular", bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU()]

        model.patch_embed.proj = nn.Sequential(*conv(3, dim // 4), *conv(dim // 4, dim // 2), *conv(dim // 2, dim),
                                               nn.Conv2d(dim, dim, 1))
    return model


def cnn_stem(path: Path = DEMO / "shapes.onnx"):
    """The demo CNN's trained features as a frozen torch module (no parameter requires a gradient):
    its four 3 x 3 convolutions with their BatchNorm folded in (the exported file's Conv weights and
    biases), ReLUs and max poolings (make_demo.build_model), then a 2 x 2 max pooling of the
    128 x 16 x 16 map to the ViT's 8 x 8 grid. Checked against the CNN's file: this stem, the CNN's
    global max pooling and its classifier give the file's logits (``check_cnn_stem``)."""
    import torch.nn as nn

    weights = _cnn_weights(path)

    def conv(index: int, cin: int, cout: int) -> nn.Conv2d:
        layer = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="circular")
        name = f"features.{index}.0.weight"
        if name not in weights or f"{name}_bias" not in weights:
            raise ValueError(f"{path}: no folded convolution {name} (and {name}_bias): not make_demo.py's CNN")
        layer.weight.data.copy_(weights[name])
        layer.bias.data.copy_(weights[f"{name}_bias"])
        return layer

    stem = nn.Sequential(conv(0, 3, 16), nn.ReLU(), nn.MaxPool2d(2), conv(2, 16, 32), nn.ReLU(), nn.MaxPool2d(2),
                         conv(4, 32, 64), nn.ReLU(), conv(5, 64, 128), nn.ReLU(), nn.MaxPool2d(2))
    for parameter in stem.parameters():
        parameter.requires_grad_(False)
    return stem.eval()


def _cnn_weights(path: Path) -> dict:
    """The CNN file's initializers as torch tensors, by name."""
    import onnx
    import torch
    from onnx import numpy_helper

    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(str(path)).graph.initializer}


def check_cnn_stem(stem, path: Path = DEMO / "shapes.onnx", images=None) -> float:
    """Largest |difference| between the CNN file's logits (onnxruntime) and the stem's map through
    the CNN's global max pooling and classifier (torch) on ``images`` (normalized, [N, 3, 64, 64])."""
    import torch

    from gradmap.runtime import SaliencyModel

    expected = SaliencyModel(path, provider="cpu", threads=1).logits(images.numpy())
    weights = _cnn_weights(path)
    weight, bias = weights["classifier.weight"], weights["classifier.bias"]
    with torch.no_grad():
        logits = stem(images).amax((2, 3)) @ weight.T + bias
    return float(np.abs(logits.numpy() - expected).max())


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
    parser.add_argument("--epochs", type=int, default=2, help="epochs per learning-rate cycle")
    parser.add_argument("--cycles", type=int, default=1, help="one-cycle schedules, back to back (default 1)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="save the weights after each cycle here, and go on from the last one saved")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dim", type=int, default=EMBED_DIM)
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--mlp-ratio", type=float, default=MLP_RATIO)
    parser.add_argument("--stem", choices=("cnn", "conv", "linear"), default="cnn", help="the patch embedding (see build_model)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads for training (default 2; the trained weights depend on it)")
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
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("ViT: %d parameters, %d trained", parameters, trained)
    stem_check = None
    if args.stem == "cnn":
        stem_check = check_cnn_stem(model.patch_embed.proj[0], images=x_eval)
        logger.info("stem: the demo CNN's logits from it within %.1e of its file's", stem_check)
        if stem_check > 1e-4:
            raise SystemExit(f"the stem read from {DEMO / 'shapes.onnx'} does not reproduce that model "
                             f"(logits differ by {stem_check:.3g})")
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
               "parameters": parameters, "trained_parameters": trained,
               **({"stem_from": "models/demo/shapes.onnx (frozen)", "stem_check_max_logit_difference": stem_check}
                  if stem_check is not None else {})},
        preprocessing=preprocessing.to_dict(), training=settings, threads=args.threads,
        torch_version=torch.__version__, seconds=round(time.perf_counter() - started, 1),
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote %s in %.0f s", args.out, time.perf_counter() - started)


if __name__ == "__main__":
    main()
