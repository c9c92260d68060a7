"""The forward-only methods and the CAM family against independent implementations on the same torch
model and inputs: Captum's Occlusion, pytorch-grad-cam's HiResCAM, XGradCAM, LayerCAM, EigenCAM and
ScoreCAM, and RISE re-implemented from the paper (Petsiuk et al. 2018, the authors' mask recipe)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from gradmap import contract  # noqa: E402
from gradmap.runtime import perturbation  # noqa: E402
from gradmap.runtime.cam import eigen_cam, hires_cam, layer_cam, xgrad_cam  # noqa: E402
from gradmap.runtime.methods import MethodSpec, attribute, baseline_image  # noqa: E402

SIZE = 64
CAM_TOLERANCE = 1e-4  # maps in [0, 1], as pytorch-grad-cam scales them
RELATIVE = 1e-4  # max|diff| / max|reference|


def rel(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


class _Net(torch.nn.Module):
    """A small CNN on 64 x 64 inputs with smooth activations (no float32 near-ties of ReLU decisions),
    its `features` a 16-channel 16 x 16 map."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Softplus(), torch.nn.AvgPool2d(2))
        self.head = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Tanh(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    from gradmap.contract import Preprocessing
    from gradmap.export import export_module
    from gradmap.runtime import SaliencyModel

    torch.manual_seed(0)
    module = _Net().eval()
    with torch.no_grad():  # spread the logits so that Score-CAM's softmax weights are not all alike
        module.head[-1].weight.mul_(20)
    path = tmp_path_factory.mktemp("forward") / "net.onnx"
    export_module(module, path, preprocessing=Preprocessing(crop=(SIZE, SIZE), resize=None), cam_layer="features")
    model = SaliencyModel(path, provider="cpu", threads=1)
    return module.double().requires_grad_(True), model


def _inputs(seed=0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.standard_normal((2, 3, SIZE, SIZE)), sigma=(0, 0, 2, 2)) * 3
    return image.astype(np.float32), np.array([-1, 3], dtype=np.int64)


def _scale_cam_image(maps: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image (without resizing), in float32 as it returns."""
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    return (maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))).astype(np.float32)


def _pytorch_grad_cam(cls_name, module, image, target_index, grid):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pgc, cls_name)(model=module, target_layers=[module.features])
    if grid is not None:  # compare on the feature-map grid: pytorch-grad-cam scales, then resizes to this size
        cam.get_target_width_height = lambda input_tensor: (grid[1], grid[0])
    targets = [ClassifierOutputTarget(int(t)) for t in target_index]
    return cam(input_tensor=torch.from_numpy(image).double(), targets=targets)


def _eigen_cam_as_svd_returns_it(activation, gradient):
    return eigen_cam(activation, gradient, orientation="svd")  # pytorch-grad-cam keeps LAPACK's sign


@pytest.mark.parametrize("cls_name, ours", [("HiResCAM", hires_cam), ("XGradCAM", xgrad_cam),
                                            ("LayerCAM", layer_cam), ("EigenCAM", _eigen_cam_as_svd_returns_it)])
def test_cam_family_matches_pytorch_grad_cam(net, cls_name, ours):
    module, model = net
    image, targets = _inputs()
    out = model.run_outputs(image, targets, (contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_CAM_ACTIVATION,
                                             contract.OUTPUT_CAM_GRADIENT))
    activation, gradient = out[contract.OUTPUT_CAM_ACTIVATION], out[contract.OUTPUT_CAM_GRADIENT]
    expected = _pytorch_grad_cam(cls_name, module, image, out[contract.OUTPUT_TARGET_INDEX], activation.shape[2:])
    # pytorch-grad-cam scales each map twice (per layer, then after averaging the layers)
    mine = _scale_cam_image(_scale_cam_image(ours(activation, gradient)))
    err = float(np.abs(mine - expected).max())
    assert err <= CAM_TOLERANCE, f"{cls_name}: max |diff| {err:.3g} (maps in [0, 1])"
    assert expected.max() > 0.99 and np.ptp(expected) > 0.5  # a map, not a constant


def test_the_runtime_map_matches_pytorch_grad_cam_on_the_input_grid(net):
    """gradmap's default: the map upsampled bilinearly (half-pixel centres) to the input, not scaled;
    min-max scaled it is pytorch-grad-cam's output, which cv2 resizes the same way."""
    pytest.importorskip("cv2")
    module, model = net
    image, targets = _inputs(1)
    _, index, values, _ = attribute(model, MethodSpec("hirescam"), image, targets)
    expected = _pytorch_grad_cam("HiResCAM", module, image, index, None)
    err = float(np.abs(_scale_cam_image(values[:, 0]) - expected).max())
    assert err <= 1e-3, f"HiResCAM on the input grid: max |diff| {err:.3g} (maps in [0, 1])"


def test_score_cam_matches_pytorch_grad_cam(net):
    module, model = net
    image, targets = _inputs(2)
    out = model.run_outputs(image, targets, (contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_CAM_ACTIVATION))
    activation, index = out[contract.OUTPUT_CAM_ACTIVATION], out[contract.OUTPUT_TARGET_INDEX]
    expected = _pytorch_grad_cam("ScoreCAM", module, image, index, activation.shape[2:])
    mine = perturbation.score_cam(model, image, targets, activation, index, mask_batch=5)
    err = float(np.abs(_scale_cam_image(_scale_cam_image(mine)) - expected).max())
    assert err <= CAM_TOLERANCE, f"Score-CAM: max |diff| {err:.3g} (maps in [0, 1])"
    assert np.ptp(expected) > 0.5


@pytest.mark.parametrize("window, stride, baseline", [(8, 4, "black"), (11, 6, "blurred")])
def test_occlusion_matches_captum(net, window, stride, baseline):
    captum_attr = pytest.importorskip("captum.attr")
    module, model = net
    image, targets = _inputs(3)
    _, index, values, _ = attribute(model, MethodSpec("occlusion", window=window, stride=stride, baseline=baseline),
                                    image, targets)
    pre = model.metadata.preprocessing
    baselines = baseline_image(image, baseline, pre.mean, pre.std)
    expected = captum_attr.Occlusion(module).attribute(
        torch.from_numpy(image).double(), sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
        baselines=torch.from_numpy(baselines).double(), target=torch.from_numpy(index),
        perturbations_per_eval=64).detach().numpy()
    # a value is a difference of two scores: float32 rounds each to ~6e-8 of the score, however small the
    # difference, so the error is measured against the largest |logit|
    logits, _ = perturbation._forward(model, image, targets)
    err = float(np.abs(values - expected).max() / np.abs(logits).max())
    assert err <= 1e-6, f"occlusion {window}/{stride}/{baseline}: {err:.3g} of the largest |logit|"
    assert np.abs(expected).max() > 1e-3 * np.abs(logits).max()  # the windows matter


def _rise_from_the_paper(module, image, target, x0, grids, shifts, probability):
    """RISE as Petsiuk et al. describe it and their code builds the masks: each grid resized bilinearly
    (scikit-image, reflect mode) to (s + 1) cells, cropped at the shift; saliency sum_i P_i M_i / (N p)."""
    from skimage.transform import resize

    s = grids.shape[1]
    h, w = image.shape[1:]
    cell = (int(np.ceil(h / s)), int(np.ceil(w / s)))
    up = ((s + 1) * cell[0], (s + 1) * cell[1])
    masks = np.stack([resize(g, up, order=1, mode="reflect", anti_aliasing=False)[dy:dy + h, dx:dx + w]
                      for g, (dy, dx) in zip(grids, shifts)])
    x = torch.from_numpy(image).double()[None]
    b = torch.from_numpy(x0).double()[None]
    m = torch.from_numpy(masks).double()[:, None]
    with torch.no_grad():
        p = torch.softmax(module(b + m * (x - b)), dim=1)[:, target].numpy()
    return np.tensordot(p, masks, axes=1) / len(masks) / probability


def test_rise_matches_the_paper(net):
    module, model = net
    image, targets = _inputs(4)
    rng = np.random.default_rng(7)
    masks, grid, probability = 60, 6, 0.4
    grids = (rng.random((masks, grid, grid)) < probability).astype(np.float32)
    shifts = rng.integers(0, int(np.ceil(SIZE / grid)), size=(masks, 2))
    pre = model.metadata.preprocessing
    x0 = baseline_image(image, "black", pre.mean, pre.std)
    result = perturbation.rise(model, image, targets, x0, masks=masks, grid=grid, probability=probability,
                               grids=grids, shifts=shifts, mask_batch=16)
    for i in range(2):
        expected = _rise_from_the_paper(module, image[i], int(result.target_index[i]), x0[i], grids, shifts,
                                        probability)
        err = rel(result.values[i, 0], expected)
        assert err <= RELATIVE, f"RISE picture {i}: {err:.3g} of the largest value"
