"""The PyTorch ResNet-50 histogram-equalization recipe as a script, the baseline that
bench/bench_memory.py runs against ``gradmap run``: same model (random weights), same pictures,
same maps written as PNGs.

    python bench/pytorch_recipe.py MODEL PICTURE OUT.png
    python bench/pytorch_recipe.py MODEL FOLDER OUTDIR [BATCH]    # every picture of FOLDER, BATCH at a time (8)

A batch differentiates the sum of each picture's top score, which gives every picture the gradient
of its own score (the pictures do not interact in an eval-mode classifier).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from scipy.ndimage import zoom
from skimage import exposure
from torchvision import transforms


def main(model_name: str, picture: str, out: str, batch_size: str = "8") -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    preprocess = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    if Path(picture).is_dir():
        pictures = sorted(p for p in Path(picture).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        outs = [Path(out) / f"{p.stem}.png" for p in pictures]
        Path(out).mkdir(parents=True, exist_ok=True)
    else:
        pictures, outs = [Path(picture)], [Path(out)]
    step = int(batch_size)
    for start in range(0, len(pictures), step):
        imgs = [Image.open(p).convert("RGB") for p in pictures[start:start + step]]
        img_tensor = torch.stack([preprocess(img) for img in imgs]).requires_grad_(True)
        outputs = model(img_tensor)
        score, _ = torch.max(outputs, 1)
        score.sum().backward()
        for img, grad, path in zip(imgs, img_tensor.grad, outs[start:start + step]):
            gradients = np.max(grad.abs().numpy(), axis=0)
            equalized = exposure.equalize_hist(gradients)
            factors = [img.size[1] / gradients.shape[0], img.size[0] / gradients.shape[1]]
            resized = zoom(equalized, factors, order=1)
            Image.fromarray((np.clip(resized, 0, 1) * 255).astype(np.uint8)).save(path)


if __name__ == "__main__":
    main(*sys.argv[1:5])
