"""Export-time method variants against Captum on the same torch model and the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from gradmap import contract  # noqa: E402
from gradmap.export import export_torchvision, load_torchvision  # noqa: E402
from gradmap.export._parity import _ReplayMismatch, _replayed, expose_decisions  # noqa: E402
from gradmap.runtime.cam import grad_cam, grad_cam_plus_plus, guided_grad_cam  # noqa: E402

TOLERANCE = 1e-4  # max|Δ| / max|Captum|
# how far Captum's float64 values may be from the float32 decisions it replays (relative to each
# layer's largest |value|): float32 near-ties only, never a different choice
NEAR_TIE = 1e-5


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
    # the float32 run's ReLU and max-pool decisions, for test_backprop_variants_match_captum
    exposed = expose_decisions(onnx.load(str(path)))
    decided = ort.InferenceSession(exposed.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs["decisions"] = exposed.split(dict(zip(exposed.names, decided.run(exposed.names,
                                                                              {"image": image, "target": target}))))
    module = module.double()
    return name, module, getattr(module, layer) if layer else None, relu_modules_only, image, outputs


def _attribute_replayed(attribute, decisions):
    """``attribute()`` (one forward pass of the module) with torch's F.relu and F.max_pool2d taking
    the decisions of gradmap's float32 run, as the export's parity check replays them
    (gradmap/export/_parity.py): smooth inputs keep most decisions far from float32 near-ties, but
    not all on every CPU (densenet121 on AVX2: torch's own float32 gradient is 0.0085 from its
    float64 one on this input). Values stay Captum's, in float64; the replay must only settle
    near-ties (NEAR_TIE) and must use every decision. Captum's guided and deconvnet hooks call
    F.relu on gradients during the backward pass (grad mode off): those calls are not replayed.
    Not _RecordingGradient.replay below: that one replays every F.relu call, grad mode on or off,
    as Captum's integrated gradients need (one of its forward passes runs with grad off)."""
    functional = torch.nn.functional
    original = functional.relu
    gaps: list[float] = []
    try:
        with _replayed(decisions.pool_inputs or None, decisions.relu_outputs or None, overrides=gaps) as all_used:
            replay = functional.relu
            functional.relu = lambda input, inplace=False: (
                replay(input, inplace) if torch.is_grad_enabled() else original(input, inplace=inplace))
            result = attribute()
    except _ReplayMismatch:
        raise AssertionError("the module's F.relu / F.max_pool2d calls do not match the graph's decisions") from None
    assert all_used(), "some of the graph's decisions were not used by the module's forward pass"
    assert max(gaps, default=0.0) <= NEAR_TIE, f"replayed decisions off by {max(gaps):.3g}"
    return result


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
    expected = _attribute_replayed(
        lambda: getattr(captum_attr, method)(module).attribute(x, target=torch.from_numpy(targets), **kwargs),
        out["decisions"])
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
    from gradmap.runtime import SaliencyModel

    return module.double(), methods.gradient_function(SaliencyModel(path, provider="cpu"), batch_size=64)


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


# -- the gradient methods on the five models, against Captum replaying onnxruntime's decisions --------
# SmoothGrad, integrated gradients and gradient x input evaluate the gradient at many inputs. On a
# ReLU / max-pool network the float32 gradient is discontinuous: where a ReLU input or two pooled values
# lie within float32 rounding, onnxruntime and torch may take different branches, which moves the
# gradient by percents around a pixel. Compared plainly with Captum in float64, resnet18's SmoothGrad below
# differed by up to 4.2% (vargrad) and densenet121's by 0.18%, while every replayed comparison on the
# five models stayed at or under 3.3e-6 (the largest: vit_b_16's vargrad). So, as the
# exporter's parity check does (gradmap/export/_parity.py), torch replays the max-pool argmax and ReLU
# decisions onnxruntime took for each of the inputs gradmap evaluated (values still come from torch in
# float64), and the methods then agree with Captum to 1e-4 (max|Δ| / max|Captum|, the gradient parity
# tolerance): each is a weighted sum, or a mean of squares, of per-input gradients that agree to ~1e-6.
# GELU, softmax and Hardswish have no replayed decisions (the ViT needs none). The models are the
# seeded random torchvision models at 64x64 (the ViT built for 64x64: 16 patches) to keep the run short.
REPLAY_SIZE = 64
REPLAY_SAMPLES = 8  # SmoothGrad samples and integrated-gradients steps


class _RecordingGradient:
    """A gradient function for gradmap.runtime.methods whose session also outputs every MaxPool's argmax
    and every Relu's output; keeps them per call, so torch can replay the decisions behind each
    gradient gradmap used (the gradient and the decisions come from the same onnxruntime run)."""

    def __init__(self, proto, threads: int = 0):
        from gradmap.export._parity import _expose_decisions

        proto, self.pool_names, self.relu_names = _expose_decisions(proto)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.calls: list[tuple[list, list]] = []

    def __call__(self, images, targets):
        names = [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_GRADIENT]
        outs = self.session.run(names + self.pool_names + self.relu_names,
                                {contract.INPUT_IMAGE: np.ascontiguousarray(images, np.float32),
                                 contract.INPUT_TARGET: np.asarray(targets, np.int64)})
        pools = outs[3:3 + len(self.pool_names)]
        self.calls.append((np.array(images, np.float32), pools, outs[3 + len(self.pool_names):]))
        return tuple(outs[:3])

    def replay(self, module, calls, attribute):
        """Run ``attribute()`` (Captum on ``module``) with torch's F.max_pool2d and F.relu taking the
        recorded decisions of ``calls`` (indices into the recorded calls, in the order Captum runs
        forward). Checks that each forward pass gets the inputs gradmap evaluated (to float32
        rounding), and that the replay only settles near-ties: wherever torch's own float64 decision
        differs, its deciding value is within 1e-5 of the layer's largest |input| (measured: <= 3.4e-8,
        in 1 of 18 ReLU/pool calls for resnet18's SmoothGrad). Both checks matter: a ReLU network's
        gradient depends on its input only through these decisions, so replaying decisions taken on
        other noise draws gives the same gradient (measured: 3e-7 from Captum with seed 12 draws
        against 11); their gaps are ~0.5 instead."""
        from gradmap.export._parity import _replayed

        inputs = [self.calls[i][0] for i in calls]
        pools = [p for i in calls for p in self.calls[i][1]]
        relus = [r for i in calls for r in self.calls[i][2]]

        def same_input(_, args):
            x, expected = args[0].detach().numpy(), inputs.pop(0)
            assert x.shape == expected.shape, f"Captum evaluated {x.shape}, gradmap {expected.shape}"
            err = rel(x.astype(np.float32), expected)
            assert err <= 1e-6, f"Captum evaluated other inputs than gradmap: {err:.3g}"

        overrides: list[float] = []
        hook = module.register_forward_pre_hook(same_input)
        try:
            with _replayed(pools, relus, overrides=overrides) as all_used:
                result = attribute()
                assert all_used() and not inputs, "torch's forward passes did not use every onnxruntime decision"
        finally:
            hook.remove()
        assert max(overrides, default=0.0) <= 1e-5, f"replayed decisions beyond near-ties: {max(overrides):.3g}"
        return result


@pytest.fixture(scope="module", params=list(MODELS))
def replay_model(request, tmp_path_factory):
    import onnx
    import torchvision

    from gradmap.contract import Preprocessing
    from gradmap.export import export_module
    from gradmap.export._torchvision import _fill_zero_weights

    name = request.param
    torch.manual_seed(0)
    module = torchvision.models.get_model(name, weights=None,
                                          **({"image_size": REPLAY_SIZE} if name.startswith("vit") else {}))
    _fill_zero_weights(module)  # the ViT's zero-initialized head, as `--weights none` does
    module.eval()
    path = tmp_path_factory.mktemp("replay") / f"{name}.onnx"
    # verify=False: the tests below compare the gradient (gradient x input) and more with torch
    export_module(module, path, preprocessing=Preprocessing(crop=(REPLAY_SIZE,) * 2, resize=None), verify=False)
    # vgg11 at 64x64 pools a 2x2 feature map to 7x7 (AdaptiveAvgPool2d), exported as GatherND with repeated
    # indices. Its gradient was once ScatterND(reduction=add), which onnxruntime's CPU kernel runs on several
    # threads without guarding repeated indices (onnxruntime#18048, #23396); the GatherND rule now sums
    # repeated indices with a MatMul, so every model runs on onnxruntime's default threads here.
    threads = 0
    recorder = _RecordingGradient(onnx.load(str(path)), threads=threads)
    rng = np.random.default_rng(3)
    image = rng.standard_normal((1, 3, REPLAY_SIZE, REPLAY_SIZE)).astype(np.float32)
    return name, module.double(), recorder, image


def _replay_target(recorder, image):
    _, target, _ = recorder(image, np.array([-1]))  # the top-1 class
    recorder.calls.clear()
    return target


@pytest.mark.slow
@pytest.mark.parametrize("variant,nt_type", [("plain", "smoothgrad"), ("squared", "smoothgrad_sq"),
                                             ("vargrad", "vargrad")])
def test_smoothgrad_matches_captum_on_models(replay_model, variant, nt_type):
    name, module, recorder, image = replay_model
    target = _replay_target(recorder, image)
    samples, stdev, size = REPLAY_SAMPLES, 0.3, (3, REPLAY_SIZE, REPLAY_SIZE)
    torch.manual_seed(11)  # Captum's draws: torch.normal over the repeated batch
    draws = torch.normal(0, torch.tensor(stdev).repeat((samples, *size))).numpy().astype(np.float32)
    ours = methods.smoothgrad(recorder, image, target, samples=samples, variant=variant,
                              noise_draws=draws.reshape(1, samples, *size))

    def captum():
        torch.manual_seed(11)
        return captum_attr.NoiseTunnel(captum_attr.Saliency(module)).attribute(
            torch.from_numpy(image).double(), nt_type=nt_type, nt_samples=samples, stdevs=stdev,
            target=torch.from_numpy(target), abs=False)

    # gradmap's calls: the clean image (to resolve the target), then the noisy batch; Captum's: the noisy batch
    expected = recorder.replay(module, [1], captum)
    err = rel(ours.values, expected.detach().numpy())
    assert err <= TOLERANCE, f"{name} smoothgrad {variant}: {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("rule,captum_rule", [("trapezoid", "riemann_trapezoid"), ("gauss-legendre", "gausslegendre")])
def test_integrated_gradients_matches_captum_on_models(replay_model, rule, captum_rule):
    name, module, recorder, image = replay_model
    target = _replay_target(recorder, image)
    steps = REPLAY_SAMPLES
    baseline = methods.baseline_image(image, "black", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ours = methods.integrated_gradients(recorder, image, target, baseline, steps=steps, rule=rule)

    def captum():
        return captum_attr.IntegratedGradients(module).attribute(
            torch.from_numpy(image).double(), baselines=torch.from_numpy(baseline.copy()).double(),
            target=torch.from_numpy(target), n_steps=steps, method=captum_rule, return_convergence_delta=True)

    # gradmap runs the image, the baseline, then the path; Captum the path, then (for its convergence
    # delta) the baseline and the image
    expected, delta = recorder.replay(module, [2, 1, 0], captum)
    values = ours.values
    if rule == "trapezoid":
        values = values * (steps - 1) / steps  # Captum's weights sum to (n-1)/n: see the small-model test
    err = rel(values, expected.detach().numpy())
    assert err <= TOLERANCE, f"{name} integrated gradients ({rule}): {err:.3g}"
    if rule == "gauss-legendre":
        np.testing.assert_allclose(ours.completeness_gap, np.abs(delta.detach().numpy()), rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_gradient_x_input_matches_captum_on_models(replay_model):
    name, module, recorder, image = replay_model
    target = _replay_target(recorder, image)
    ours = methods.gradient_x_input(recorder, image, target)
    expected = recorder.replay(module, [0], lambda: captum_attr.InputXGradient(module).attribute(
        torch.from_numpy(image).double(), target=torch.from_numpy(target)))
    err = rel(ours.values, expected.detach().numpy())
    assert err <= TOLERANCE, f"{name} gradient x input: {err:.3g}"
