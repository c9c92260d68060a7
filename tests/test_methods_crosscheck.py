"""Export-time method variants against Captum on the same torch model and the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
import onnxruntime as ort  # noqa: E402

from gradmap import contract  # noqa: E402
from gradmap.export import export_torchvision, load_torchvision  # noqa: E402
from gradmap.runtime.cam import grad_cam, guided_grad_cam  # noqa: E402

TOLERANCE = 1e-4  # max|Δ| / max|Captum|


def rel(actual, expected):
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def resnet18_variants(tmp_path_factory):
    path = tmp_path_factory.mktemp("variants") / "r18.onnx"
    export_torchvision("resnet18", path, weights="none", backprops=("vanilla", "guided", "deconvnet"),
                       cam_layer="layer4")
    module, _ = load_torchvision("resnet18", "none")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # smooth inputs (blurred noise) keep ReLU and max-pool decisions away from float32 near-ties
    rng = np.random.default_rng(5)
    from scipy import ndimage

    image = ndimage.gaussian_filter(rng.standard_normal((2, 3, 224, 224)), sigma=(0, 0, 3, 3)).astype(np.float32) * 4
    target = np.array([-1, 17], dtype=np.int64)
    names = [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_GRADIENT,
             contract.OUTPUT_GRADIENT_GUIDED, contract.OUTPUT_GRADIENT_DECONVNET,
             contract.OUTPUT_CAM_ACTIVATION, contract.OUTPUT_CAM_GRADIENT]
    outputs = dict(zip(names, session.run(names, {"image": image, "target": target})))
    return module.double(), image, outputs


def _captum(cls, module, image, targets, **kwargs):
    x = torch.from_numpy(image).double()
    return cls(module, **kwargs).attribute(x, target=torch.from_numpy(targets)).detach().numpy()


@pytest.mark.parametrize("method,output", [
    ("Saliency", contract.OUTPUT_GRADIENT),
    ("GuidedBackprop", contract.OUTPUT_GRADIENT_GUIDED),
    ("Deconvolution", contract.OUTPUT_GRADIENT_DECONVNET),
])
def test_backprop_variants_match_captum(resnet18_variants, method, output):
    module, image, out = resnet18_variants
    targets = out[contract.OUTPUT_TARGET_INDEX]
    kwargs = {"abs": False} if method == "Saliency" else {}
    x = torch.from_numpy(image).double()
    expected = getattr(captum_attr, method)(module).attribute(x, target=torch.from_numpy(targets), **kwargs)
    err = rel(out[output], expected.detach().numpy())
    assert err <= TOLERANCE, f"{method}: {err:.3g}"


def test_grad_cam_matches_captum_layer_grad_cam(resnet18_variants):
    module, image, out = resnet18_variants
    targets = torch.from_numpy(out[contract.OUTPUT_TARGET_INDEX])
    x = torch.from_numpy(image).double()
    expected = captum_attr.LayerGradCam(module, module.layer4).attribute(x, target=targets)[:, 0]
    ours = grad_cam(out[contract.OUTPUT_CAM_ACTIVATION], out[contract.OUTPUT_CAM_GRADIENT], relu=False)
    err = rel(ours, expected.detach().numpy())
    assert err <= TOLERANCE, f"Grad-CAM: {err:.3g}"


def test_guided_grad_cam_matches_captum(resnet18_variants):
    module, image, out = resnet18_variants
    targets = torch.from_numpy(out[contract.OUTPUT_TARGET_INDEX])
    x = torch.from_numpy(image).double()
    expected = captum_attr.GuidedGradCam(module, module.layer4).attribute(x, target=targets)
    ours = guided_grad_cam(out[contract.OUTPUT_GRADIENT_GUIDED], out[contract.OUTPUT_CAM_ACTIVATION],
                           out[contract.OUTPUT_CAM_GRADIENT])
    err = rel(ours, expected.detach().numpy())
    assert err <= TOLERANCE, f"Guided Grad-CAM: {err:.3g}"
