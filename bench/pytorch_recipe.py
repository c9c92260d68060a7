"""The PyTorch ResNet-50 histogram-equalization recipe as a script, the baseline that
bench/bench_memory.py runs against ``gradmap run``: same model (random weights), same picture,
same map written as a PNG.

    python bench/pytorch_recipe.py MODEL PICTURE OUT.png
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from scipy.ndimage import zoom
from skimage import exposure
from torchvision import transforms


def main(model_name: str, picture: str, out: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    preprocess = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    img = Image.open(picture).convert("RGB")
    img_tensor = preprocess(img).unsqueeze(0).requires_grad_(True)
    outputs = model(img_tensor)
    score, _ = torch.max(outputs, 1)
    score.backward()
    gradients = np.max(img_tensor.grad.abs().squeeze().numpy(), axis=0)
    equalized = exposure.equalize_hist(gradients)
    factors = [img.size[1] / gradients.shape[0], img.size[0] / gradients.shape[1]]
    resized = zoom(equalized, factors, order=1)
    Image.fromarray((np.clip(resized, 0, 1) * 255).astype(np.uint8)).save(out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
