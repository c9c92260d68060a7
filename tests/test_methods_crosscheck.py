"""Export-time method variants against Captum on the same torch model and the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
import onnxruntime as ort  # noqa: E402

from gradmap import contract  # noqa: E402
from gradmap.export import export_torchvision, load_torchvision  # noqa: E402
from gradmap.runtime.cam import grad_cam, grad_cam_plus_plus, guided_grad_cam  # noqa: E402

TOLERANCE = 1e-4  # max|Δ| / max|Captum|


def rel(actual, expected):
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# model -> (layer for Grad-CAM or None where the method does not apply, whether Captum's guided /
# deconvnet hooks see every ReLU). Captum hooks nn.ReLU modules only; gradmap's rule applies to every
# Relu node. DenseNet ends with a functional F.relu that Captum leaves alone, so guided and deconvnet
# are compared on the other models. A ViT has no ReLU (GELU) and no spatial feature map to pool:
# guided = vanilla there, and Grad-CAM does not apply (a token-grid layer would be needed).
MODELS = {
    "resnet18": ("layer4", True),
    "vgg11": ("features", True),
    "densenet121": ("features", False),
    "mobilenet_v3_small": ("features", True),
    "vit_b_16": (None, True),
}


@pytest.fixture(scope="module", params=list(MODELS))
def variants(request, tmp_path_factory):
    name = request.param
    layer, relu_modules_only = MODELS[name]
    path = tmp_path_factory.mktemp("variants") / f"{name}.onnx"
    # the CAM layer by its torch module name, as Captum and pytorch-grad-cam take it ("auto" would pick
    # DenseNet's F.relu(features), the input of its pooling, which is no module)
    export_torchvision(name, path, weights="none", backprops=("vanilla", "guided", "deconvnet"), cam_layer=layer)
    module, _ = load_torchvision(name, "none")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # smooth inputs (blurred noise) keep ReLU and max-pool decisions away from float32 near-ties
    rng = np.random.default_rng(5)
    from scipy import ndimage

    image = ndimage.gaussian_filter(rng.standard_normal((2, 3, 224, 224)), sigma=(0, 0, 3, 3)).astype(np.float32) * 4
    target = np.array([-1, 17], dtype=np.int64)
    names = [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_GRADIENT,
             contract.OUTPUT_GRADIENT_GUIDED, contract.OUTPUT_GRADIENT_DECONVNET]
    if layer:
        names += [contract.OUTPUT_CAM_ACTIVATION, contract.OUTPUT_CAM_GRADIENT]
    outputs = dict(zip(names, session.run(names, {"image": image, "target": target})))
    module = module.double()
    return name, module, getattr(module, layer) if layer else None, relu_modules_only, image, outputs


@pytest.mark.slow
@pytest.mark.parametrize("method,output", [
    ("Saliency", contract.OUTPUT_GRADIENT),
    ("GuidedBackprop", contract.OUTPUT_GRADIENT_GUIDED),
    ("Deconvolution", contract.OUTPUT_GRADIENT_DECONVNET),
])
def test_backprop_variants_match_captum(variants, method, output):
    name, module, _, relu_modules_only, image, out = variants
    if method != "Saliency" and not relu_modules_only:
        pytest.skip(f"{name}: Captum's {method} leaves its functional F.relu unmodified")
    targets = out[contract.OUTPUT_TARGET_INDEX]
    kwargs = {"abs": False} if method == "Saliency" else {}
    x = torch.from_numpy(image).double()
    expected = getattr(captum_attr, method)(module).attribute(x, target=torch.from_numpy(targets), **kwargs)
    err = rel(out[output], expected.detach().numpy())
    assert err <= TOLERANCE, f"{name} {method}: {err:.3g}"


@pytest.mark.slow
def test_grad_cam_matches_captum_layer_grad_cam(variants):
    name, module, layer, _, image, out = variants
    if layer is None:
        pytest.skip(f"{name}: no spatial feature map before the classifier")
    targets = torch.from_numpy(out[contract.OUTPUT_TARGET_INDEX])
    x = torch.from_numpy(image).double()
    expected = captum_attr.LayerGradCam(module, layer).attribute(x, target=targets)[:, 0]
    ours = grad_cam(out[contract.OUTPUT_CAM_ACTIVATION], out[contract.OUTPUT_CAM_GRADIENT], relu=False)
    err = rel(ours, expected.detach().numpy())
    assert err <= TOLERANCE, f"{name} Grad-CAM: {err:.3g}"


@pytest.mark.slow
def test_guided_grad_cam_matches_captum(variants):
    name, module, layer, relu_modules_only, image, out = variants
    if layer is None or not relu_modules_only:
        pytest.skip(f"{name}: Grad-CAM or Captum's guided backprop does not apply as in gradmap")
    targets = torch.from_numpy(out[contract.OUTPUT_TARGET_INDEX])
    x = torch.from_numpy(image).double()
    expected = captum_attr.GuidedGradCam(module, layer).attribute(x, target=targets)
    ours = guided_grad_cam(out[contract.OUTPUT_GRADIENT_GUIDED], out[contract.OUTPUT_CAM_ACTIVATION],
                           out[contract.OUTPUT_CAM_GRADIENT])
    err = rel(ours, expected.detach().numpy())
    assert err <= TOLERANCE, f"{name} Guided Grad-CAM: {err:.3g}"


@pytest.mark.slow
def test_grad_cam_plus_plus_matches_pytorch_grad_cam(variants):
    pgc = pytest.importorskip("pytorch_grad_cam")
    name, module, layer, _, image, out = variants
    if layer is None:
        pytest.skip(f"{name}: no spatial feature map before the classifier")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    activation = out[contract.OUTPUT_CAM_ACTIVATION]
    cam = pgc.GradCAMPlusPlus(model=module, target_layers=[layer])
    # compare on the feature-map grid: pytorch-grad-cam min-max scales, then resizes to this size
    cam.get_target_width_height = lambda input_tensor: (activation.shape[3], activation.shape[2])
    targets = [ClassifierOutputTarget(int(t)) for t in out[contract.OUTPUT_TARGET_INDEX]]
    expected = cam(input_tensor=torch.from_numpy(image).double(), targets=targets)
    if name == "densenet121":
        # DenseNet.forward applies F.relu(features, inplace=True) right after the hooked layer, so the
        # activations pytorch-grad-cam keeps are overwritten with their ReLU (its hook stores the tensor,
        # not a copy); compare with what it actually used
        activation = np.maximum(activation, 0)
    ours = grad_cam_plus_plus(activation, out[contract.OUTPUT_CAM_GRADIENT])
    # pytorch-grad-cam scales each map twice with scale_cam_image, (m - min) / (max - min + 1e-7): per
    # layer (BaseCAM.compute_cam_per_layer) and again after averaging the layers (aggregate_multi_layers).
    # With maps far above 1e-7 the second pass changes nothing, but the random mobilenet_v3_small's
    # `features` output is ~4e-8 (Hardswish is ~x/2 near 0 and BatchNorm sits at its initial statistics,
    # so activations shrink layer by layer) and its raw Grad-CAM++ map peaks at ~1e-12: the first pass
    # leaves it at ~1e-5 and the second brings it to [0, 1]. Scaling once made a 0.99 difference there
    # (the activations and gradients its hooks keep equal gradmap's outputs to 6e-7: no aliasing).
    ours = _scale_cam_image(_scale_cam_image(ours))
    err = float(np.abs(ours - expected).max())
    assert err <= 1e-4, f"{name} Grad-CAM++: {err:.3g} (maps in [0, 1])"


def _scale_cam_image(maps: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image (without resizing), in float32 as it returns."""
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    return (maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))).astype(np.float32)


# -- runtime methods on the vanilla gradient -------------------------------------------------------
from gradmap.runtime import methods  # noqa: E402


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    # smooth activations: these tests check the methods' arithmetic, and a ReLU or max-pool input
    # within float32 rounding of its threshold on one of the ~50 path or noise points would make
    # the float32 and float64 runs take different branches (test_export covers those ops)
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Sigmoid(), torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 4)).eval()
    from gradmap.contract import Preprocessing
    from gradmap.export import export_module

    path = tmp_path_factory.mktemp("small") / "small.onnx"
    export_module(module, path, preprocessing=Preprocessing(crop=(16, 16), resize=None))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return module.double(), methods.gradient_function(session, batch_size=64)


def _inputs(seed=0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.standard_normal((2, 3, 16, 16)), sigma=(0, 0, 1.5, 1.5)) * 3
    return image.astype(np.float32), np.array([1, 3], dtype=np.int64)


@pytest.mark.parametrize("variant,nt_type", [("plain", "smoothgrad"), ("squared", "smoothgrad_sq"),
                                             ("vargrad", "vargrad")])
def test_smoothgrad_matches_captum_noise_tunnel(small_model, variant, nt_type):
    module, fn = small_model
    image, target = _inputs()
    samples, stdev = 8, 0.3
    torch.manual_seed(11)
    expected = captum_attr.NoiseTunnel(captum_attr.Saliency(module)).attribute(
        torch.from_numpy(image).double(), nt_type=nt_type, nt_samples=samples, stdevs=stdev,
        target=torch.from_numpy(target), abs=False)
    # the same draws Captum took: torch.normal over the repeat-interleaved batch
    torch.manual_seed(11)
    draws = torch.normal(0, torch.tensor(stdev).repeat((2 * samples, 3, 16, 16))).numpy()
    ours = methods.smoothgrad(fn, image, target, samples=samples, variant=variant,
                              noise_draws=draws.reshape(2, samples, 3, 16, 16).astype(np.float32))
    err = rel(ours.values, expected.detach().numpy())
    assert err <= 1e-4, f"smoothgrad {variant}: {err:.3g}"


@pytest.mark.parametrize("rule,captum_rule", [("trapezoid", "riemann_trapezoid"), ("gauss-legendre", "gausslegendre")])
def test_integrated_gradients_matches_captum(small_model, rule, captum_rule):
    module, fn = small_model
    image, target = _inputs(1)
    baseline = methods.baseline_image(image, "black", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected, delta = captum_attr.IntegratedGradients(module).attribute(
        torch.from_numpy(image).double(), baselines=torch.from_numpy(baseline.copy()).double(),
        target=torch.from_numpy(target), n_steps=24, method=captum_rule, return_convergence_delta=True)
    ours = methods.integrated_gradients(fn, image, target, baseline, steps=24, rule=rule)
    values = ours.values
    if rule == "trapezoid":
        # Captum's riemann_trapezoid spaces its 24 points 1/(n-1) apart but weights them 1/n (ends
        # 1/2n), so its weights sum to (n-1)/n; gradmap integrates with the trapezoid rule proper.
        values = values * (24 - 1) / 24
    err = rel(values, expected.detach().numpy())
    assert err <= 1e-4, f"integrated gradients ({rule}): {err:.3g}"
    if rule == "gauss-legendre":
        np.testing.assert_allclose(ours.completeness_gap, np.abs(delta.detach().numpy()), rtol=1e-3, atol=1e-5)


def test_gradient_x_input_matches_captum(small_model):
    module, fn = small_model
    image, target = _inputs(2)
    expected = captum_attr.InputXGradient(module).attribute(torch.from_numpy(image).double(),
                                                            target=torch.from_numpy(target))
    ours = methods.gradient_x_input(fn, image, target)
    assert rel(ours.values, expected.detach().numpy()) <= 1e-4


def test_completeness_gap_shrinks_with_steps(small_model):
    _, fn = small_model
    image, target = _inputs(3)
    baseline = methods.baseline_image(image, "blurred", (0.5,) * 3, (0.25,) * 3, blur_sigma=4)
    coarse = methods.integrated_gradients(fn, image, target, baseline, steps=2, rule="trapezoid")
    fine = methods.integrated_gradients(fn, image, target, baseline, steps=64, rule="gauss-legendre")
    assert np.all(fine.completeness_gap < coarse.completeness_gap), (fine.completeness_gap, coarse.completeness_gap)


def test_modifiers():
    a = np.array([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(methods.modify(a, "absolute"), [2, 0, 3])
    np.testing.assert_array_equal(methods.modify(a, "positive"), [0, 0, 3])
    np.testing.assert_array_equal(methods.modify(a, "negative"), [2, 0, 0])
    with pytest.raises(ValueError, match="modifier 'bogus'"):
        methods.modify(a, "bogus")
