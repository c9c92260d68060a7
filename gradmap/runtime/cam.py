"""Class activation maps from a feature map A [N, C, h, w] and its gradient dS/dA (numpy only).

    Grad-CAM    (Selvaraju et al. 2017):   alpha_c = mean_hw dS/dA_c;  cam = ReLU(sum_c alpha_c A_c)
    Grad-CAM++  (Chattopadhay et al. 2018, as pytorch-grad-cam computes it):
                a = g^2 / (2 g^2 + sum_hw(A) g^3)  (0 where g = 0);  w_c = sum_hw a ReLU(g);
                cam = ReLU(sum_c w_c A_c)
    Guided Grad-CAM: guided backpropagation x the Grad-CAM map upsampled to the input size
    HiResCAM    (Draelos & Carin 2020):    cam = ReLU(sum_c dS/dA_c * A_c)   (no spatial averaging)
    XGradCAM    (Fu et al. 2020):          w_c = sum_hw(dS/dA_c A_c) / (sum_hw A_c + 1e-7);
                                           cam = ReLU(sum_c w_c A_c)
    LayerCAM    (Jiang et al. 2021):       cam = ReLU(sum_c ReLU(dS/dA_c) * A_c)
    EigenCAM    (Muhammad & Yeasin 2020):  the activations [hw, C], centred per channel, projected on
                                           their first right singular vector; no gradient, no class
    Score-CAM   (Wang et al. 2020):        see :mod:`gradmap.runtime.perturbation` (forward passes)

The feature map and its gradient come from models exported with ``--cam-layer``. The ``*_method``
functions are the method table's implementations (see :mod:`gradmap.runtime.methods`).
"""

from __future__ import annotations

import numpy as np

from gradmap import contract
from gradmap.runtime.methods import Attribution, MethodSpec

__all__ = ["grad_cam", "grad_cam_plus_plus", "guided_grad_cam", "hires_cam", "xgrad_cam", "layer_cam", "eigen_cam",
           "upsample", "grad_cam_method", "grad_cam_plus_plus_method", "guided_grad_cam_method", "hires_cam_method",
           "xgrad_cam_method", "layer_cam_method", "eigen_cam_method"]

_EPS = 1e-6  # pytorch-grad-cam 1.5's guard in the Grad-CAM++ denominator (it dominates when |g| < 1e-3)
_XGRAD_EPS = 1e-7  # pytorch-grad-cam's guard in XGradCAM's sum of activations


def _check(activation: np.ndarray, gradient: np.ndarray | None = None) -> None:
    if activation.ndim != 4:
        raise ValueError(f"the CAM layer's activation must be a feature map [N, C, h, w], got shape "
                         f"{list(activation.shape)}: export the model with a --cam-layer that is a convolutional "
                         "feature map")
    if gradient is not None and activation.shape != gradient.shape:
        raise ValueError(f"activation {activation.shape} and gradient {gradient.shape} must both be [N, C, h, w]")


def grad_cam(activation: np.ndarray, gradient: np.ndarray, *, relu: bool = True) -> np.ndarray:
    """Grad-CAM maps [N, h, w]. ``relu=False`` keeps negative evidence (Captum's default)."""
    _check(activation, gradient)
    weights = gradient.astype(np.float64).mean(axis=(2, 3), keepdims=True)
    cam = (weights * activation).sum(axis=1)
    return (np.maximum(cam, 0) if relu else cam).astype(np.float32)


def grad_cam_plus_plus(activation: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Grad-CAM++ maps [N, h, w], with pytorch-grad-cam's closed form for the pixel weights."""
    _check(activation, gradient)
    g = gradient.astype(np.float64)
    a = activation.astype(np.float64)
    g2, g3 = g ** 2, g ** 3
    sum_a = a.sum(axis=(2, 3), keepdims=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + _EPS)
    alpha = np.where(g != 0, alpha, 0.0)
    weights = (np.maximum(g, 0) * alpha).sum(axis=(2, 3), keepdims=True)
    return np.maximum((weights * a).sum(axis=1), 0).astype(np.float32)


def hires_cam(activation: np.ndarray, gradient: np.ndarray, *, relu: bool = True) -> np.ndarray:
    """HiResCAM maps [N, h, w]: the element-wise product of gradient and activation summed over
    channels (Grad-CAM without averaging the gradient over the map, Draelos & Carin 2020)."""
    _check(activation, gradient)
    cam = (gradient.astype(np.float64) * activation).sum(axis=1)
    return (np.maximum(cam, 0) if relu else cam).astype(np.float32)


def xgrad_cam(activation: np.ndarray, gradient: np.ndarray, *, relu: bool = True) -> np.ndarray:
    """XGradCAM maps [N, h, w]: channel weights sum(g A) / sum(A) (Fu et al. 2020), as pytorch-grad-cam
    computes them (1e-7 added to the sum of activations)."""
    _check(activation, gradient)
    a = activation.astype(np.float64)
    weights = (gradient * a).sum(axis=(2, 3), keepdims=True) / (a.sum(axis=(2, 3), keepdims=True) + _XGRAD_EPS)
    cam = (weights * a).sum(axis=1)
    return (np.maximum(cam, 0) if relu else cam).astype(np.float32)


def layer_cam(activation: np.ndarray, gradient: np.ndarray, *, relu: bool = True) -> np.ndarray:
    """LayerCAM maps [N, h, w]: activations weighted per position by their positive gradient, summed
    over channels (Jiang et al. 2021)."""
    _check(activation, gradient)
    cam = (np.maximum(gradient.astype(np.float64), 0) * activation).sum(axis=1)
    return (np.maximum(cam, 0) if relu else cam).astype(np.float32)


def eigen_cam(activation: np.ndarray, gradient: np.ndarray | None = None, *, relu: bool = True,
              orientation: str = "activation") -> np.ndarray:
    """EigenCAM maps [N, h, w] (Muhammad & Yeasin 2020): each position's activation vector, centred
    per channel over the map, projected on the first principal direction (the first right singular
    vector). The gradient is not used: the map is the same for every class.

    A singular vector's sign is arbitrary, and after the ReLU a flipped sign shows the complement of
    the map. ``orientation="activation"`` (gradmap's default, and the web page's) points the direction
    where the activations grow: its loadings sum to >= 0, so positions with more activation along it
    score higher. ``"svd"`` keeps the sign LAPACK's SVD returns, as pytorch-grad-cam does
    (``get_2d_projection``), so that the maps agree with it. ``relu`` keeps the positive part, as
    pytorch-grad-cam's ``BaseCAM`` does for every method.
    """
    if orientation not in ("activation", "svd"):
        raise ValueError(f"eigen_cam orientation {orientation!r} is not 'activation' or 'svd'")
    _check(activation)
    from threadpoolctl import threadpool_limits  # imported here: only EigenCAM calls LAPACK

    maps = []
    # one small SVD per picture ([h*w, C]) on one BLAS thread: threads gain nothing at this size, and
    # OpenBLAS's threads wait busily for each other, so beside onnxruntime's spinning threads or any
    # other busy process they make each SVD tens to hundreds of times slower
    with threadpool_limits(limits=1, user_api="blas"):
        for a in activation.astype(np.float64):
            x = np.nan_to_num(a).reshape(a.shape[0], -1).T  # [hw, C]
            x = x - x.mean(axis=0)
            _, _, vt = np.linalg.svd(x, full_matrices=False)
            direction = -vt[0] if orientation == "activation" and vt[0].sum() < 0 else vt[0]
            maps.append((x @ direction).reshape(a.shape[1:]))
    cam = np.stack(maps) if maps else np.zeros((0, *activation.shape[2:]))
    return (np.maximum(cam, 0) if relu else cam).astype(np.float32)


def upsample(maps: np.ndarray, size: tuple[int, int], *, order: int = 0) -> np.ndarray:
    """[N, h, w] -> [N, H, W]; order 0 repeats cells as Captum's nearest interpolation does when
    H, W are multiples of h, w; order 1 is bilinear."""
    n, h, w = maps.shape
    if (h, w) == tuple(size):
        return maps.astype(np.float32)
    if order == 0:
        rows = np.floor(np.arange(size[0]) * h / size[0]).astype(int)
        cols = np.floor(np.arange(size[1]) * w / size[1]).astype(int)
        return maps[:, rows][:, :, cols].astype(np.float32)
    zoom = (1, size[0] / h, size[1] / w)
    from scipy import ndimage  # imported here: gradmap run's default method needs no scipy

    return ndimage.zoom(maps.astype(np.float32), zoom, order=order, grid_mode=True, mode="nearest")


def guided_grad_cam(guided_gradient: np.ndarray, activation: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Guided Grad-CAM [N, 3, H, W]: the guided-backprop gradient times the (ReLU'd) Grad-CAM map
    upsampled by nearest neighbour to the input size, as Captum's GuidedGradCam does."""
    cam = upsample(grad_cam(activation, gradient, relu=True), guided_gradient.shape[2:], order=0)
    return (guided_gradient * cam[:, None]).astype(np.float32)


def _cam_outputs(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    # one run for the whole batch: the feature maps are small beside the input gradient
    return model.run_outputs(images, targets, spec.method.outputs)


def _class_activation_map(cam, model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray) -> Attribution:
    outs = _cam_outputs(model, spec, images, targets)
    cams = cam(outs[contract.OUTPUT_CAM_ACTIVATION], outs[contract.OUTPUT_CAM_GRADIENT])
    return Attribution(upsample(cams, images.shape[2:], order=1)[:, None], outs[contract.OUTPUT_TARGET_INDEX],
                       outs[contract.OUTPUT_LOGITS])


def grad_cam_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                    batch_size: int = 16) -> Attribution:
    """Grad-CAM [N, 1, H, W], upsampled (bilinear) to the input size."""
    return _class_activation_map(grad_cam, model, spec, images, targets)


def grad_cam_plus_plus_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                              batch_size: int = 16) -> Attribution:
    """Grad-CAM++ [N, 1, H, W], upsampled (bilinear) to the input size."""
    return _class_activation_map(grad_cam_plus_plus, model, spec, images, targets)


def hires_cam_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                     batch_size: int = 16) -> Attribution:
    """HiResCAM [N, 1, H, W], upsampled (bilinear) to the input size."""
    return _class_activation_map(hires_cam, model, spec, images, targets)


def xgrad_cam_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                     batch_size: int = 16) -> Attribution:
    """XGradCAM [N, 1, H, W], upsampled (bilinear) to the input size."""
    return _class_activation_map(xgrad_cam, model, spec, images, targets)


def layer_cam_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                     batch_size: int = 16) -> Attribution:
    """LayerCAM [N, 1, H, W], upsampled (bilinear) to the input size."""
    return _class_activation_map(layer_cam, model, spec, images, targets)


def eigen_cam_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                     batch_size: int = 16) -> Attribution:
    """EigenCAM [N, 1, H, W], upsampled (bilinear) to the input size; reads the activation only."""
    outs = model.run_outputs(images, targets, spec.method.outputs)
    cams = eigen_cam(outs[contract.OUTPUT_CAM_ACTIVATION], orientation=spec.orientation)
    return Attribution(upsample(cams, images.shape[2:], order=1)[:, None], outs[contract.OUTPUT_TARGET_INDEX],
                       outs[contract.OUTPUT_LOGITS])


def guided_grad_cam_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                           batch_size: int = 16) -> Attribution:
    """Guided Grad-CAM [N, 3, H, W]."""
    outs = _cam_outputs(model, spec, images, targets)
    values = guided_grad_cam(outs[contract.OUTPUT_GRADIENT_GUIDED], outs[contract.OUTPUT_CAM_ACTIVATION],
                             outs[contract.OUTPUT_CAM_GRADIENT])
    return Attribution(values, outs[contract.OUTPUT_TARGET_INDEX], outs[contract.OUTPUT_LOGITS])
