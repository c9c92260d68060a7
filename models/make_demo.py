"""Build gradmap's offline demo: a synthetic shapes dataset with known object masks, a small CNN
trained on it, and the exported gradmap models (trained, and with its top layers re-initialized,
in a cascade).

Usage (from the repository root, CPU only, two threads; 7 min 49 s on a shared 2-core machine
(``/usr/bin/time``): 34 s rendering the data in two processes, 6 min 20 s training (14 epochs of
25 to 30 s), about 45 s exporting and checking the five models):

    python models/make_demo.py [--out models/demo] [--threads 2]

The committed models come from ``--threads 2``. The data do not depend on the thread count; the
trained weights do (torch's CPU kernels split their sums by thread: after 20 training steps, one
thread and two differ by up to 0.02 in a weight, while two runs on two threads agree bit for bit).
On one thread the same run took 15 min and reached test accuracy 0.9525, against 0.9470 on two.

Every image holds one object of one of five classes (circle, square, triangle, cross, star) at a
random position, scale and colour, upright give or take 20 degrees, on a cluttered background that
belongs to no class:
smooth colour-noise textures, irregular blobs, jagged polygons and strokes, a few of which cross
the object. Nothing but the object's outline tells the classes apart (colour and size are drawn
independently of the class), so a model has to find the object to classify it, and the object's
mask tells where it is. Each image is drawn from its own seed, ``(SEED, split, index)``, so the
data do not depend on split sizes or generation order.

Writes to ``--out``:
    shapes.onnx                 trained network, exported with its input gradient
    shapes_randomized_top.onnx  the same network with its classifier and last conv block
                                re-initialized (model-parameter randomization, Adebayo et al. 2018)
    cascade/shapes_randomized_blocks{2,3,4}.onnx
                                classifier and the last 2, 3, 4 (all) conv blocks re-initialized:
                                the cascade continued, for evaluate_demo.py (not package data)
    metrics.json                train/test/eval accuracy, dataset and training settings
    eval_set.npz                held-out evaluation set: images uint8 [N,64,64,3], masks bool
                                [N,64,64], labels int64 [N], class_names
    images/<class>_<i>.png, masks/<class>_<i>.png   sample test images and their masks
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

CLASS_NAMES = ("circle", "square", "triangle", "cross", "star")
IMAGE_SIZE = 64
SEED = 0
# Split ids for the per-image seeds (SEED, split, index).
SPLITS = {"train": 0, "test": 1, "eval": 2, "samples": 3, "validation": 4}
TRAIN_SIZE = 10000
TEST_SIZE = 2000
EVAL_SIZE = 200
SAMPLES_PER_CLASS = 2  # PNG samples per class: 5 x 2 = 10 images

# Object circumradius in pixels: the object covers roughly 3% to 18% of the image.
RADIUS_RANGE = (8.0, 15.0)
# Objects stand upright (square axis-aligned, triangle and star pointing up, cross as a plus)
# turned by up to this many degrees. Uniform rotations kept a small CNN at chance for thousands of
# steps: with random colours, shape under any rotation is more than a few minutes of CPU can learn.
ROTATION_JITTER = 20.0
UPRIGHT = {"circle": 0.0, "square": np.pi / 4, "triangle": -np.pi / 2, "cross": 0.0, "star": -np.pi / 2}
# Smallest colour distance (RGB in [0, 1]) between the object and the background under it: keeps
# every object visible without making it stand out by colour (blobs and strokes reach the same).
MIN_CONTRAST = 0.25
# Per-pixel noise std: grain of the background (drawn per image up to this value) and on the whole
# image. Stronger grain (0.08) drowned the objects' edges: a small CNN stayed at chance for 2,000
# steps even without distractors. Clutter comes from the distractors, not from pixel noise.
BACKGROUND_GRAIN = 0.03
PIXEL_NOISE = 0.01
# Largest training-noise std as a fraction of an image's value range. 0: off. Tried at 0.15
# (SmoothGrad's default): held-out accuracy fell from 0.941 to 0.884 and every pointing game with it
# (vanilla 0.765 -> 0.690, SmoothGrad 0.505 -> 0.570 only), so the demo trains without noise.
TRAIN_NOISE = 0.0

logger = logging.getLogger("make_demo")


# --------------------------------------------------------------------------------------------
# Rendering: anti-aliased coverage from signed distances, on pixel centres.
# --------------------------------------------------------------------------------------------

# float32 halves the rendering time; coverage needs nowhere near float64 precision.
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + np.float32(0.5)


def _window(x_min: float, y_min: float, x_max: float, y_max: float) -> tuple[slice, slice]:
    """Rows and columns of the pixels whose centres may lie within a box (clipped to the image).
    Shapes are rendered only there: the full-image grid made generation four times slower."""
    def span(low: float, high: float) -> slice:
        return slice(int(np.clip(np.floor(low - 1), 0, IMAGE_SIZE)), int(np.clip(np.ceil(high + 1), 0, IMAGE_SIZE)))

    return span(y_min, y_max), span(x_min, x_max)


def _segment_distance(xx: np.ndarray, yy: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Distance of pixel centres (xx, yy) to the segment (x0, y0)-(x1, y1)."""
    x0, y0, x1, y1 = (np.float32(v) for v in (x0, y0, x1, y1))
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = np.zeros_like(xx) if length2 == 0 else np.clip(((xx - x0) * dx + (yy - y0) * dy) / length2, 0.0, 1.0)
    return np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))


def _polygon_signed_distance(xx: np.ndarray, yy: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Signed distance of pixel centres to a closed polygon (negative inside, even-odd rule)."""
    distance = np.full(xx.shape, np.inf, dtype=np.float32)
    inside = np.zeros(xx.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0)):
        distance = np.minimum(distance, _segment_distance(xx, yy, x0, y0, x1, y1))
        crosses = (y0 > yy) != (y1 > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xx < x_cross)
    return np.where(inside, -distance, distance)


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Pixel coverage in [0, 1] from a signed distance: a one-pixel linear ramp across the edge."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _polygon_alpha(points: np.ndarray) -> np.ndarray:
    """Full-image coverage of a polygon, rendered in its bounding box."""
    alpha = np.zeros(_XX.shape, dtype=np.float32)
    window = _window(*points.min(axis=0), *points.max(axis=0))
    alpha[window] = _coverage(_polygon_signed_distance(_XX[window], _YY[window], points))
    return alpha


def _regular_points(n: int, radii: np.ndarray | float, cx: float, cy: float, angle: float) -> np.ndarray:
    theta = angle + 2 * np.pi * np.arange(n) / n
    radii = np.broadcast_to(radii, theta.shape)
    return np.stack([cx + radii * np.cos(theta), cy + radii * np.sin(theta)], axis=1)


def _shape_alpha(name: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Coverage of a class shape of circumradius ``radius`` centred at (cx, cy)."""
    if name == "circle":
        return _coverage(np.hypot(_XX - cx, _YY - cy) - radius)
    if name == "square":
        return _polygon_alpha(_regular_points(4, radius, cx, cy, angle))
    if name == "triangle":
        return _polygon_alpha(_regular_points(3, radius, cx, cy, angle))
    if name == "star":
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.42 * radius)
        return _polygon_alpha(_regular_points(10, radii, cx, cy, angle))
    if name == "cross":
        # A plus sign: arms of half-width w reaching the circumradius.
        w = 0.3 * radius
        half = math.sqrt(radius * radius - w * w)
        corners = np.array([(w, half), (w, w), (half, w), (half, -w), (w, -w), (w, -half),
                            (-w, -half), (-w, -w), (-half, -w), (-half, w), (-w, w), (-w, half)])
        c, s = math.cos(angle), math.sin(angle)
        return _polygon_alpha(corners @ np.array([[c, s], [-s, c]]) + (cx, cy))
    raise ValueError(f"unknown shape {name!r}")


def _smooth_noise(rng: np.random.Generator, sigma: float, channels: int = 1) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to [0, 1] per channel, shape [H, W, channels]."""
    noise = ndimage.gaussian_filter(rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, channels)),
                                    sigma=(sigma, sigma, 0), mode="wrap")
    low = noise.min(axis=(0, 1), keepdims=True)
    high = noise.max(axis=(0, 1), keepdims=True)
    return (noise - low) / np.maximum(high - low, 1e-12)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour`` (a [3] vector or an [H, W, 3] texture) into ``canvas`` in place."""
    canvas *= 1.0 - alpha[..., None]
    canvas += alpha[..., None] * colour


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, 3)


def _stroke_alpha(rng: np.random.Generator) -> np.ndarray:
    """A random polyline of 2-4 segments, 1-3 px wide."""
    width = rng.uniform(1.0, 3.0)
    points = [rng.uniform(-8, IMAGE_SIZE + 8, 2)]
    for _ in range(rng.integers(2, 5)):
        points.append(points[-1] + rng.normal(0, 18, 2))
    alpha = np.zeros(_XX.shape, dtype=np.float32)
    for a, b in zip(points[:-1], points[1:]):
        window = _window(*(np.minimum(a, b) - width), *(np.maximum(a, b) + width))
        distance = _segment_distance(_XX[window], _YY[window], *a, *b)
        alpha[window] = np.maximum(alpha[window], _coverage(distance - width / 2))
    return alpha


def _blob_alpha(rng: np.random.Generator) -> np.ndarray:
    """An irregular smooth blob: thresholded smooth noise under a soft radial window."""
    cx, cy = rng.uniform(0, IMAGE_SIZE, 2)
    size = rng.uniform(6, 16)
    field = _smooth_noise(rng, sigma=rng.uniform(2.5, 4.0))[..., 0]
    envelope = np.exp(-((_XX - cx) ** 2 + (_YY - cy) ** 2) / (2 * size * size))
    return _coverage((0.45 - field * envelope) * 20.0)


def _jagged_polygon_alpha(rng: np.random.Generator) -> np.ndarray:
    """A polygon with 5-9 vertices at random angles and radii: straight edges, yet no class shape."""
    n = int(rng.integers(5, 10))
    cx, cy = rng.uniform(0, IMAGE_SIZE, 2)
    radius = rng.uniform(*RADIUS_RANGE)
    theta = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.3, 1.0, n)
    return _polygon_alpha(np.stack([cx + radii * np.cos(theta), cy + radii * np.sin(theta)], axis=1))


def _background(rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise between two random colours, with fine grain on top."""
    low, high = _random_colour(rng), _random_colour(rng)
    texture = _smooth_noise(rng, sigma=rng.uniform(2.0, 8.0), channels=3)
    canvas = low + (high - low) * texture
    canvas += rng.normal(0.0, rng.uniform(0.0, BACKGROUND_GRAIN), canvas.shape)
    return canvas


def render_example(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """One cluttered image with one object.

    Returns:
        image uint8 [H, W, 3], mask bool [H, W] (pixels at least half covered by the object,
        including any part hidden under a stroke drawn over it), label int.
    """
    label = int(rng.integers(len(CLASS_NAMES)))
    canvas = _background(rng)
    distractors = [_blob_alpha] * int(rng.integers(1, 4)) + [_jagged_polygon_alpha] * int(rng.integers(1, 3)) \
        + [_stroke_alpha] * int(rng.integers(2, 6))
    for index in rng.permutation(len(distractors)):
        colour = _random_colour(rng)
        if rng.random() < 0.3:  # a textured distractor, like textured objects below
            colour = colour + rng.normal(0, 0.12, (IMAGE_SIZE, IMAGE_SIZE, 1)) * _random_colour(rng)
        _paint(canvas, distractors[index](rng), colour)

    radius = rng.uniform(*RADIUS_RANGE)
    margin = radius + 1.0
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, 2)
    angle = UPRIGHT[CLASS_NAMES[label]] + np.deg2rad(rng.uniform(-ROTATION_JITTER, ROTATION_JITTER))
    alpha = _shape_alpha(CLASS_NAMES[label], cx, cy, radius, angle)
    mask = alpha >= 0.5
    under = canvas[mask].mean(axis=0)
    for _ in range(100):
        colour = _random_colour(rng)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
    if rng.random() < 0.3:
        colour = colour + rng.normal(0, 0.12, (IMAGE_SIZE, IMAGE_SIZE, 1)) * _random_colour(rng)
    _paint(canvas, alpha, colour)

    for _ in range(int(rng.integers(0, 3))):  # occluding strokes, drawn over the object
        _paint(canvas, _stroke_alpha(rng), _random_colour(rng))
    canvas += rng.normal(0.0, PIXEL_NOISE, canvas.shape)
    image = np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)
    return image, mask, label


def _render_range(split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.empty((stop - start, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    masks = np.empty((stop - start, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    labels = np.empty(stop - start, dtype=np.int64)
    for i in range(start, stop):
        images[i - start], masks[i - start], labels[i - start] = render_example(
            np.random.default_rng([SEED, SPLITS[split], i]))
    return images, masks, labels


def make_split(split: str, size: int, jobs: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images uint8 [N, H, W, 3], masks bool [N, H, W], labels int64 [N] of one split, rendered in
    ``jobs`` processes. Every image comes from its own seed, so the result does not depend on ``jobs``."""
    if jobs <= 1 or size < 2 * jobs:
        return _render_range(split, 0, size)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, size, 4 * jobs + 1).astype(int)  # a few chunks per process evens out the load
    # Fresh interpreters, not forks: a fork of a process whose torch (OpenMP) threads have run can
    # hang in the child, as it did in a pytest worker that had exported models before.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_render_range, [split] * (len(bounds) - 1), bounds[:-1], bounds[1:]))
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(3))


def make_samples(per_class: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``per_class`` held-out examples of every class, named ``<class>_<i>``."""
    found: dict[int, list] = {k: [] for k in range(len(CLASS_NAMES))}
    index = 0
    while min(len(v) for v in found.values()) < per_class:
        image, mask, label = render_example(np.random.default_rng([SEED, SPLITS["samples"], index]))
        if len(found[label]) < per_class:
            found[label].append((image, mask))
        index += 1
    return [(f"{CLASS_NAMES[k]}_{i}", image, mask) for k, items in found.items() for i, (image, mask) in enumerate(items)]


# --------------------------------------------------------------------------------------------
# Model and training (torch imported here only: the dataset functions above stay torch-free).
# --------------------------------------------------------------------------------------------

def build_model(num_classes: int = len(CLASS_NAMES), head: str = "max", padding: str = "circular"):
    """Conv-BN-ReLU blocks with max pooling, global max pooling (``head="max"``, the demo's) or
    global average pooling, and a linear classifier.

    ``features`` ends with the last conv block; its output (128 x 16 x 16) is the demo's CAM layer.
    With average pooling every position of the map adds to the class score, clutter included; the
    first demo model had it, and its vanilla maps hit the object in 38 % of the images against 76 %
    with max pooling (same data and training). Ending at 16 x 16 instead of 8 x 8 (one max pooling
    fewer) made each position of the last map see a smaller part of the picture (receptive field
    26 px instead of 38): vanilla pointing game 0.765 -> 0.885, Grad-CAM 0.890 -> 0.915, held-out
    accuracy 0.941 -> 0.950, training time about the same.

    The convolutions pad circularly (``padding="circular"``, exported as ONNX Pad mode "wrap"). With
    zero padding on 64-px pictures and a 26-px receptive field, every input gradient fades toward
    the border whatever the weights are, because the zeros carry no gradient; the maps of any two
    pictures then share that layout, and it was most of the randomization check's rank
    correlation: vanilla maps of two *different* pictures correlated at rho 0.39. Circular padding
    gives every pixel the same number of paths to the class score: that correlation fell to
    0.082, held-out accuracy 0.950 -> 0.953 (same data and training; reflect padding: 0.26).
    """
    import torch.nn as nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, padding_mode=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class ShapesCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                block(3, 16), nn.MaxPool2d(2),    # 32 x 32
                block(16, 32), nn.MaxPool2d(2),   # 16 x 16
                block(32, 64),
                block(64, 128),
            )
            # Global max pooling (Oquab et al. 2015) over the 16 x 16 map: the class evidence comes from
            # where the shape detectors peak. A MaxPool2d with the map's size exports as ONNX MaxPool,
            # whose argmax gradmap's gradient and parity check follow as torch does.
            self.pool = nn.MaxPool2d(IMAGE_SIZE // 4) if head == "max" else nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(128, num_classes)

        def forward(self, x):
            return self.classifier(self.pool(self.features(x)).flatten(1))

    return ShapesCNN()


def _to_tensor(images: np.ndarray, mean: np.ndarray, std: np.ndarray):
    import torch

    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return torch.from_numpy((x - mean[None, :, None, None]) / std[None, :, None, None])


def _augment(x, generator, noise: float = TRAIN_NOISE):
    """Random horizontal flips (every upright class is mirror-symmetric) and, when ``noise`` > 0,
    per-image Gaussian pixel noise with a standard deviation drawn uniformly from [0, noise x the
    image's value range] (Smilkov et al. 2017, section 4.3, pair training noise with SmoothGrad;
    off for the demo, see TRAIN_NOISE)."""
    import torch

    if float(x.new_empty(()).bernoulli_(0.5, generator=generator)):
        x = x.flip(3)
    if noise > 0:
        flat = x.flatten(1)
        scale = noise * (flat.max(1).values - flat.min(1).values)
        sigma = torch.rand(len(x), generator=generator) * scale
        x = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=generator)
    return x


def accuracy(model, x, labels: np.ndarray, batch: int = 500) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((predicted.numpy() == labels).mean())


def train(model, x, y, *, epochs: int, batch_size: int, lr: float, seed: int, x_test=None, y_test=None):
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    labels = torch.from_numpy(y)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total, start = 0.0, time.perf_counter()
        for i in range(0, len(x), batch_size):
            index = order[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(_augment(x[index], generator)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        message = f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.3f}"
        if x_test is not None:
            message += f", test accuracy {accuracy(model, x_test, y_test):.3f}"
        logger.info("%s (%.0f s)", message, time.perf_counter() - start)


def conv_blocks(model) -> list:
    """The Conv-BN-ReLU blocks of ``model.features``, input side first."""
    import torch.nn as nn

    return [m for m in model.features if isinstance(m, nn.Sequential)]


def randomize_top(model, seed: int, blocks: int = 1):
    """A copy of ``model`` whose classifier and last ``blocks`` conv blocks are re-initialized
    (PyTorch defaults), top down: the cascading randomization of Adebayo et al. (2018), in which a
    deeper cascade keeps the random weights of the shallower one (same seed, same order)."""
    import copy

    import torch

    randomized = copy.deepcopy(model)
    torch.manual_seed(seed)
    for part in [randomized.classifier, *reversed(conv_blocks(randomized)[-blocks:])]:
        for module in part.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
    return randomized.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--head", choices=("max", "avg"), default="max")
    parser.add_argument("--padding", choices=("zeros", "circular", "reflect"), default="circular",
                        help="the convolutions' padding (see build_model)")
    parser.add_argument("--state", type=Path, default=None,
                        help="load the trained weights from this state-dict file if it exists, else save them there")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads for training and processes for rendering the data (default 2). The "
                             "rendered data do not depend on it; the trained weights do)")
    parser.add_argument("--cache", type=Path, default=None, help="reuse generated images from this .npz (written if missing)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from gradmap.contract import Preprocessing
    from gradmap.export import export_module

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    out: Path = args.out
    started = time.perf_counter()

    if args.cache is not None and args.cache.exists():
        cached = np.load(args.cache)
        train_images, train_labels, test_images, test_labels, eval_images, eval_masks, eval_labels = (
            cached[k] for k in ("train_images", "train_labels", "test_images", "test_labels", "eval_images",
                                "eval_masks", "eval_labels"))
    else:
        train_images, _, train_labels = make_split("train", args.train_size, args.threads)
        test_images, _, test_labels = make_split("test", TEST_SIZE, args.threads)
        eval_images, eval_masks, eval_labels = make_split("eval", EVAL_SIZE, args.threads)
        if args.cache is not None:
            np.savez(args.cache, train_images=train_images, train_labels=train_labels, test_images=test_images,
                     test_labels=test_labels, eval_images=eval_images, eval_masks=eval_masks, eval_labels=eval_labels)
    logger.info("generated %d train, %d test, %d eval images (%.0f s)", len(train_images), len(test_images),
                len(eval_images), time.perf_counter() - started)

    pixels = train_images.reshape(-1, 3).astype(np.float64) / 255.0
    mean = np.round(pixels.mean(axis=0), 3).astype(np.float32)
    std = np.round(pixels.std(axis=0), 3).astype(np.float32)
    x_train = _to_tensor(train_images, mean, std)
    x_test = _to_tensor(test_images, mean, std)
    x_eval = _to_tensor(eval_images, mean, std)

    model = build_model(head=args.head, padding=args.padding)
    settings = dict(epochs=args.epochs, batch_size=64, lr=3e-3, seed=SEED)
    if args.state is not None and args.state.exists():
        model.load_state_dict(torch.load(args.state))
    else:
        train(model, x_train, train_labels, **settings, x_test=x_test, y_test=test_labels)
        if args.state is not None:
            torch.save(model.state_dict(), args.state)
    model.eval()
    metrics = {
        "train_accuracy": accuracy(model, x_train, train_labels),
        "test_accuracy": accuracy(model, x_test, test_labels),
        "eval_accuracy": accuracy(model, x_eval, eval_labels),
    }
    # Cascading randomization: classifier and the last 1, 2, ... conv blocks re-initialized. The
    # first is the demo's sanity check (shapes_randomized_top.onnx, shipped); the deeper ones go to
    # cascade/ (not package data) for evaluate_demo.py's cascade table.
    depths = range(1, len(conv_blocks(model)) + 1)
    randomized = {k: randomize_top(model, seed=SEED + 1, blocks=k) for k in depths}
    metrics["randomized_test_accuracy"] = {str(k): accuracy(randomized[k], x_test, test_labels) for k in depths}
    logger.info("held-out test accuracy %.4f (%d images), eval set %.4f, randomized models (blocks: accuracy) %s",
                metrics["test_accuracy"], TEST_SIZE, metrics["eval_accuracy"], metrics["randomized_test_accuracy"])

    preprocessing = Preprocessing(crop=(IMAGE_SIZE, IMAGE_SIZE), resize=None, interpolation="bilinear",
                                  mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    exports = [(model, "shapes.onnx", f"models/make_demo.py seed {SEED}")]
    for k in depths:
        name = "shapes_randomized_top.onnx" if k == 1 else f"cascade/shapes_randomized_blocks{k}.onnx"
        exports.append((randomized[k], name, f"models/make_demo.py seed {SEED}, classifier and last {k} conv "
                                             f"block{'s' if k > 1 else ''} re-initialized (seed {SEED + 1})"))
    (out / "cascade").mkdir(parents=True, exist_ok=True)
    for module, name, weights in exports:
        # every method gradmap has: guided and deconvnet gradients and the last feature map for Grad-CAM
        report = export_module(module, out / name, preprocessing=preprocessing, labels=list(CLASS_NAMES),
                               source_model="gradmap demo shapes CNN", weights=weights,
                               backprops=("vanilla", "guided", "deconvnet"), cam_layer="features")
        logger.info("%s", report.summary())

    np.savez_compressed(out / "eval_set.npz", images=eval_images, masks=eval_masks, labels=eval_labels,
                        class_names=np.array(CLASS_NAMES))
    for directory in ("images", "masks"):
        (out / directory).mkdir(parents=True, exist_ok=True)
    for name, image, mask in make_samples(SAMPLES_PER_CLASS):
        Image.fromarray(image).save(out / "images" / f"{name}.png", optimize=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{name}.png", optimize=True)

    metrics.update(
        classes=list(CLASS_NAMES), image_size=IMAGE_SIZE, seed=SEED,
        split_sizes={"train": len(train_images), "test": TEST_SIZE, "eval": EVAL_SIZE},
        mean_object_area=float(eval_masks.mean()),
        preprocessing=preprocessing.to_dict(), training=settings, padding=args.padding, head=args.head,
        threads=args.threads, torch_version=torch.__version__, seconds=round(time.perf_counter() - started, 1),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote %s in %.0f s", out, time.perf_counter() - started)


if __name__ == "__main__":
    main()
