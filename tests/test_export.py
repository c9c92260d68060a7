"""End to end: torchvision classifiers exported with their input gradient, checked against torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from gradmap import contract  # noqa: E402
from gradmap.cli import main  # noqa: E402
from gradmap.contract import ModelMetadata, Preprocessing  # noqa: E402
from gradmap.export import ExportError, ParityError, export_module, export_torchvision, load_torchvision  # noqa: E402
from gradmap.export._parity import verify_parity  # noqa: E402
from gradmap.graph.parity import Tolerance  # noqa: E402
from gradmap.runtime import SaliencyModel  # noqa: E402
from gradmap.runtime.model import check_external_data  # noqa: E402

TOLERANCE = 1e-4  # max|Δ| / max|torch autograd|

# One model per torchvision family, the smallest of each.
FAMILIES = {
    "alexnet": "alexnet", "convnext": "convnext_tiny", "densenet": "densenet121",
    "efficientnet": "efficientnet_b0", "efficientnet_v2": "efficientnet_v2_s", "googlenet": "googlenet",
    "inception_v3": "inception_v3", "maxvit": "maxvit_t", "mnasnet": "mnasnet0_5",
    "mobilenet_v2": "mobilenet_v2", "mobilenet_v3": "mobilenet_v3_small", "regnet": "regnet_x_400mf",
    "resnet": "resnet18", "resnext": "resnext50_32x4d", "shufflenet_v2": "shufflenet_v2_x0_5",
    "squeezenet": "squeezenet1_0", "swin": "swin_t", "swin_v2": "swin_v2_t", "vgg": "vgg11",
    "vit": "vit_b_16", "wide_resnet": "wide_resnet50_2",
}


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES.values()), ids=list(FAMILIES))
def test_family_gradient_matches_torch_autograd(name, tmp_path):
    path = tmp_path / f"{name}.onnx"
    report = export_torchvision(name, path, weights="none", verify=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    foreign = {(n.domain, n.op_type) for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    assert not foreign, f"nodes outside the default ONNX domain: {foreign}"
    assert [i.name for i in proto.graph.input] == [contract.INPUT_IMAGE, contract.INPUT_TARGET]
    assert [o.name for o in proto.graph.output] == [
        contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_GRADIENT]
    metadata = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert metadata.source_model == f"torchvision.models.{name}"
    assert metadata.num_classes == 1000 and metadata.labels[0] == "tench"
    module, _ = load_torchvision(name, "none")
    # an independent batch (other seed) through the saved file; targets -1 and explicit classes
    logits_error, gradient_error = verify_parity(module, proto, metadata.preprocessing.crop, batch=2, seed=1234,
                                                 tolerance=Tolerance(factor=0.0, floor=TOLERANCE))  # fixed 1e-4
    assert logits_error <= TOLERANCE, f"{name}: logits differ by {logits_error:.3g}"
    assert gradient_error <= TOLERANCE, f"{name}: gradient differs by {gradient_error:.3g}"
    assert report.backward_nodes > 0


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "resnet18.onnx"
    export_torchvision("resnet18", path, weights="none")
    return path


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_any_batch_size_matches_autograd(resnet18_file, batch):
    module, _ = load_torchvision("resnet18", "none")
    proto = onnx.load(str(resnet18_file))
    logits_error, gradient_error = verify_parity(module, proto, (224, 224), batch=batch, seed=batch, attempts=2)
    assert logits_error <= TOLERANCE and gradient_error <= TOLERANCE, (logits_error, gradient_error)


def test_target_resolution_in_graph(resnet18_file):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((4, 3, 224, 224), dtype=np.float32)
    target = np.array([-1, 0, 999, -1], dtype=np.int64)
    logits, target_index, gradient = _session(resnet18_file).run(
        None, {contract.INPUT_IMAGE: image, contract.INPUT_TARGET: target})
    np.testing.assert_array_equal(target_index, [logits[0].argmax(), 0, 999, logits[3].argmax()])
    assert gradient.shape == image.shape and np.all(np.isfinite(gradient))


@pytest.mark.parametrize("score", ["probability", "log_probability"])
def test_score_kinds_match_autograd(score, tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 5)).eval()
    path = tmp_path / "m.onnx"
    export_module(module, path, preprocessing=Preprocessing(crop=(32, 32), resize=36), score=score)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    target = np.array([-1, 2, 4], dtype=np.int64)
    _, _, gradient = _session(path).run(None, {"image": image, "target": target})
    x = torch.from_numpy(image).double().requires_grad_(True)
    logits = module.double()(x)
    values = torch.softmax(logits, 1) if score == "probability" else torch.log_softmax(logits, 1)
    resolved = torch.where(torch.from_numpy(target) < 0, logits.argmax(1), torch.from_numpy(target))
    (ref,) = torch.autograd.grad(values.gather(1, resolved[:, None]).sum(), x)
    np.testing.assert_allclose(gradient, ref.numpy(), rtol=1e-4, atol=1e-4 * np.abs(ref.numpy()).max())
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["gradmap.score"] == score


def test_custom_module_with_labels_and_metadata(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    module(torch.zeros(1, 3, 20, 24))
    pre = Preprocessing(crop=(20, 24), resize=None, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    report = export_module(module, tmp_path / "c.onnx", preprocessing=pre, labels=["cat", "dog", "fox"],
                           source_model="my.classifier", weights="finetuned-v3")
    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(str(report.path)).metadata_props})
    assert meta.labels == ("cat", "dog", "fox")
    assert meta.preprocessing == pre
    assert (meta.source_model, meta.weights, meta.score) == ("my.classifier", "finetuned-v3", "logit")
    assert report.gradient_error is not None and report.gradient_error <= TOLERANCE


def test_preprocessing_options_override_the_source_convention(tmp_path):
    """gradmap export's --preset and field options: a Keras caffe-mode model takes BGR 0-255 input; the
    file says so (format 2) and the runtime feeds it exactly that."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                 torch.nn.LazyLinear(3))
    module(torch.zeros(1, 3, 16, 16))
    report = export_module(module, tmp_path / "caffe.onnx", preprocessing=Preprocessing(crop=(20, 24)),
                           preprocessing_options={"preset_name": "keras-caffe", "crop": 16})
    meta = SaliencyModel(report.path).metadata
    pre = meta.preprocessing
    assert meta.format_version == 2 and (pre.crop, pre.resize, pre.resize_mode) == ((16, 16), (16, 16), "exact")
    assert (pre.channel_order, pre.value_range, pre.mean) == ("bgr", "0-255", (103.939, 116.779, 123.68))
    with pytest.raises(ExportError, match="value_range '0-9' is not one of"):
        export_module(module, tmp_path / "bad.onnx", preprocessing=Preprocessing(crop=(16, 16)),
                      preprocessing_options={"value_range": "0-9"})
    assert not (tmp_path / "bad.onnx").exists()


def test_export_cli_preprocessing_options(tmp_path):
    out = tmp_path / "r.onnx"
    result = CliRunner().invoke(main, ["export", "resnet18", "--weights", "none", "-o", str(out), "--no-verify",
                                       "--crop", "32", "--resize", "40", "--interpolation", "bicubic",
                                       "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--channel-order", "bgr"])
    assert result.exit_code == 0, result.output
    pre = SaliencyModel(out).metadata.preprocessing
    assert (pre.crop, pre.resize, pre.interpolation, pre.mean, pre.std, pre.channel_order) == (
        (32, 32), 40, "bicubic", (0.5,) * 3, (0.25,) * 3, "bgr")
    bad = CliRunner().invoke(main, ["export", "resnet18", "-o", str(tmp_path / "x.onnx"), "--std", "1,2"])
    assert bad.exit_code == 2 and "'--std': '1,2': give 3 numbers" in bad.output


def test_wrong_label_count_is_refused(tmp_path):
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(ExportError, match="3 labels given for a model with 4 outputs"):
        export_module(module, tmp_path / "x.onnx", preprocessing=Preprocessing(crop=(8, 8)), labels=["a", "b", "c"])
    assert not (tmp_path / "x.onnx").exists()


def test_parity_check_catches_a_wrong_gradient(resnet18_file):
    """Scale one adjoint convolution's kernel in the backward part only: the check must refuse the model."""
    proto = onnx.load(str(resnet18_file))
    backward = next(n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")
                    and any(p.key == "gradmap.vjp" and p.value.startswith("Conv:") for p in n.metadata_props))
    factor = onnx.numpy_helper.from_array(np.asarray(1.01, dtype=np.float32), "wrong_factor")
    proto.graph.initializer.append(factor)
    scale = onnx.helper.make_node("Mul", [backward.input[1], factor.name], ["wrong_kernel"])
    position = list(proto.graph.node).index(backward)
    proto.graph.node.insert(position, scale)
    backward.input[1] = "wrong_kernel"
    module, _ = load_torchvision("resnet18", "none")
    with pytest.raises(ParityError, match="gradient differs from torch autograd"):
        verify_parity(module, proto, (224, 224), attempts=2)


def test_cli_export_writes_a_checked_model(tmp_path):
    out = tmp_path / "squeeze.onnx"
    result = CliRunner().invoke(main, ["export", "squeezenet1_1", "--weights", "none", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "parity with torch" in result.output and out.exists()
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"


def test_external_data_export_gives_the_same_outputs(tmp_path):
    """--external-data: the weights go to NAME.data beside the model (a relative location, so the two
    files move together), the runtime reads the pair, and the outputs are those of the single file."""
    single, split = tmp_path / "one" / "squeeze.onnx", tmp_path / "two" / "squeeze.onnx"
    for out, flags in ((single, []), (split, ["--external-data"])):
        result = CliRunner().invoke(main, ["export", "squeezenet1_1", "--weights", "none", "-o", str(out), *flags])
        assert result.exit_code == 0, result.output
    assert f"and its weights {split}.data" in result.output
    assert sorted(p.name for p in split.parent.iterdir()) == ["squeeze.onnx", "squeeze.onnx.data"], "leftovers"
    # squeezenet1_1: 4.9 MB of weights; the model keeps its graph, metadata and 1000 labels
    assert split.stat().st_size < 1_000_000 < 4_000_000 < (split.parent / "squeeze.onnx.data").stat().st_size
    moved = tmp_path / "moved"
    (tmp_path / "two").rename(moved)
    assert check_external_data(str(moved / "squeeze.onnx")) == [os.path.realpath(moved / "squeeze.onnx.data")]
    image = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    target = np.array([1, 7], dtype=np.int64)
    outputs = [_session(p).run(None, {"image": image, "target": target}) for p in (single, moved / "squeeze.onnx")]
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)
    model = SaliencyModel(moved / "squeeze.onnx", threads=1)
    assert model.metadata.source_model == "torchvision.models.squeezenet1_1"


def test_cli_unknown_model_suggests_close_names(tmp_path):
    result = CliRunner().invoke(main, ["export", "resnet5O", "--weights", "none", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1
    assert "unknown model 'resnet5O'" in result.output and "resnet50" in result.output


def test_cli_failed_download_says_how_to_proceed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    import torch.hub

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    result = CliRunner().invoke(main, ["export", "resnet18", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1
    assert "--weights none" in result.output and "--weights PATH" in result.output
    assert "resnet18-f37072fd.pth" in result.output, result.output
    assert not (tmp_path / "x.onnx").exists()


def test_default_weights_load_from_torchvision_cache(tmp_path, monkeypatch):
    """The real DEFAULT code path: a state dict placed where torchvision's cache expects it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    weights = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    cache.parent.mkdir(parents=True)
    torch.manual_seed(7)
    source = torchvision.models.squeezenet1_1(weights=None).eval()
    torch.save(source.state_dict(), cache)
    out = tmp_path / "sq.onnx"
    report = export_torchvision("squeezenet1_1", out, weights="DEFAULT")
    assert report.weights == str(weights)
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    logits = _session(out).run(["logits"], {"image": image, "target": np.array([-1])})[0]
    with torch.no_grad():
        expected = source(torch.from_numpy(image)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["gradmap.labels"])[:2] == ["tench", "goldfish"]


def test_weights_file_and_bad_weights_file(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    good = tmp_path / "good.pth"
    torch.save(state, good)
    report = export_torchvision("squeezenet1_1", tmp_path / "a.onnx", weights=str(good))
    assert report.weights == "file:good.pth"
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ExportError, match="does not fit squeezenet1_1"):
        export_torchvision("squeezenet1_1", tmp_path / "b.onnx", weights=str(bad))
    pickled = tmp_path / "code.pth"
    torch.save({"fn": print}, pickled)  # an object that weights_only=True refuses to unpickle
    with pytest.raises(ExportError, match="weights_only=True"):
        export_torchvision("squeezenet1_1", tmp_path / "c.onnx", weights=str(pickled))
    with pytest.raises(ExportError, match="does not exist"):
        export_torchvision("squeezenet1_1", tmp_path / "d.onnx", weights=str(tmp_path / "missing.pth"))
    assert not any((tmp_path / f"{c}.onnx").exists() for c in "bcd")


def test_cam_layer_auto_needs_a_pooled_feature_map(tmp_path):
    """Like a ViT, this classifier turns its feature map into tokens instead of pooling or flattening it."""
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patches = torch.nn.Conv2d(3, 4, 4, stride=4)
            self.mix = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            tokens = self.patches(x).flatten(2).transpose(1, 2)  # [N, 16, 4]
            return self.head(self.mix(tokens).mean(dim=1))

    module = Tokens()
    with pytest.raises(ExportError, match="no .N, C, H, W. feature map is pooled or flattened") as refused:
        export_module(module, tmp_path / "x.onnx", preprocessing=Preprocessing(crop=(16, 16)), cam_layer="auto",
                      source_model="my-tokens")
    # the refusal names the model and the layers that would do, nearest the logits first
    assert str(refused.value).startswith("my-tokens: --cam-layer auto:"), refused.value
    assert str(refused.value).endswith("e.g. --cam-layer mix (4x4 tokens), --cam-layer patches (4x4 feature map)"), \
        refused.value
    with pytest.raises(ExportError, match="no module or value of that name"):
        export_module(module, tmp_path / "x.onnx", preprocessing=Preprocessing(crop=(16, 16)), cam_layer="layer9")
    assert not (tmp_path / "x.onnx").exists()


def test_variants_share_one_forward_pass_and_list_methods(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 6, 3, padding=1),
                                 torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3))
    plain = export_module(module, tmp_path / "plain.onnx", preprocessing=Preprocessing(crop=(12, 12)))
    rich = export_module(module, tmp_path / "rich.onnx", preprocessing=Preprocessing(crop=(12, 12)),
                         backprops=("guided", "deconvnet"), cam_layer="auto")
    assert rich.forward_nodes == plain.forward_nodes
    proto = onnx.load(str(rich.path))
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == sum(
        n.op_type == "Conv" for n in onnx.load(str(plain.path)).graph.node) + 2 * 2, "one forward, three backward passes"
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.methods == ("vanilla", "smoothgrad", "integrated-gradients", "gradient-x-input", "guided-backprop",
                            "deconvnet", "grad-cam", "grad-cam++", "guided-grad-cam", "hirescam", "xgrad-cam",
                            "layer-cam", "eigen-cam", "score-cam", "occlusion", "rise", "blur-ig", "guided-ig", "xrai")
    assert meta.cam_layer.startswith("auto (")
    cli = CliRunner().invoke(main, ["export", "nonexistent", "--backprop", "sideways", "-o", str(tmp_path / "y.onnx")])
    assert cli.exit_code == 2 and "sideways" in cli.output


class _RowsAndColumns(torch.nn.Module):
    """Sequencer2D-like: a recurrent layer along image rows and another along columns."""

    def __init__(self, kind):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 6, 2, stride=2)
        cell = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
        self.rows = cell(6, 5, batch_first=True, bidirectional=True)
        self.cols = cell(10, 4, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)                  # N H W C
        n, h, w, c = x.shape
        rows, _ = self.rows(x.reshape(n * h, w, c))           # along each row
        cols = rows.reshape(n, h, w, -1).transpose(1, 2).reshape(n * w, h, -1)
        cols, _ = self.cols(cols)                             # along each column
        return self.head(cols.mean(1).reshape(n, w, -1).mean(1))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_layers_are_unrolled_and_match_autograd(kind, tmp_path):
    """ONNX's LSTM/GRU/RNN ops output neither gates nor cell states, so they have no gradient rule:
    the trace unrolls them into elementwise ops and matrix products whose gradients parity checks."""
    torch.manual_seed(0)
    module = _RowsAndColumns(kind).eval()
    report = export_module(module, tmp_path / "r.onnx", preprocessing=Preprocessing(crop=(12, 10)))
    ops = {n.op_type for n in onnx.load(str(report.path)).graph.node}
    assert not ops & {"LSTM", "GRU", "RNN"}
    assert report.gradient_error is not None and report.gradient_error <= TOLERANCE
    image = np.random.default_rng(2).standard_normal((3, 3, 12, 10), dtype=np.float32)
    logits, _, gradient = _session(report.path).run(None, {"image": image, "target": np.array([-1, 0, 2])})
    x = torch.from_numpy(image).double().requires_grad_(True)
    out = module.double()(x)
    np.testing.assert_allclose(logits, out.detach().numpy(), rtol=1e-4, atol=1e-5)
    target = torch.tensor([int(out[0].argmax()), 0, 2])
    (ref,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    np.testing.assert_allclose(gradient, ref.numpy(), rtol=1e-4, atol=1e-4 * np.abs(ref.numpy()).max())


class _ClippableLinear(torch.nn.Module):
    """timm's Gemma 4 ViT layer: a linear layer whose input and output are clamped to buffers
    (-inf/inf until pretrained weights set them)."""

    def __init__(self, features_in, features_out):
        super().__init__()
        self.linear = torch.nn.Linear(features_in, features_out, bias=False)
        for name in ("input_min", "input_max", "output_min", "output_max"):
            self.register_buffer(name, torch.tensor(float("-inf") if "min" in name else float("inf")))

    def forward(self, x):
        x = self.linear(torch.clamp(x, self.input_min, self.input_max))
        return torch.clamp(x, self.output_min, self.output_max)


class _ClampedProjections(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 12, 4, stride=4)
        self.q, self.k, self.v = (_ClippableLinear(12, 6) for _ in range(3))
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((self.q(x) + self.k(x) * self.v(x)).mean(1))


def test_clamps_of_one_tensor_to_buffers_export(tmp_path):
    """Three clamps of one tensor to separate -inf/inf buffers: torch.onnx's optimizer hands the
    merged Clips min/max constants it registers nowhere, which ONNX's checker refuses; the trace
    registers them."""
    torch.manual_seed(0)
    report = export_module(_ClampedProjections().eval(), tmp_path / "c.onnx", preprocessing=Preprocessing(crop=(16, 16)))
    assert report.gradient_error is not None and report.gradient_error <= TOLERANCE
    onnx.checker.check_model(onnx.load(str(report.path)), full_check=True)
