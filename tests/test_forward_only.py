"""Forward-only models (``gradmap export --no-gradient``): the forward graph with gradmap's metadata, no
backward pass. The methods that read the forward alone give the same maps on such a file as on the full
export of the same classifier; the others are refused naming the method and the reason; the metadata
is format version 3, and older files keep loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gradmap import contract

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from gradmap.cli import main  # noqa: E402
from gradmap.runtime import SaliencyModel  # noqa: E402
from gradmap.runtime.methods import MethodSpec, UnsupportedMethodError, attribute, check_supported  # noqa: E402

SIZE = 64
#: Occlusion, RISE and Score-CAM on the forward-only file against the full file: the same forward ops
#: in onnxruntime, so float32 rounding of a differently fused graph at most.
RELATIVE = 1e-5


def rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


class _Net(torch.nn.Module):
    """A small CNN on 64 x 64 inputs, ReLU and max pooling included; `features` is a 16-channel map."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(full, forward-only) exports of the same module, both with the CAM layer, and the reports."""
    from gradmap.contract import Preprocessing
    from gradmap.export import export_module

    torch.manual_seed(0)
    module = _Net().eval()
    with torch.no_grad():
        module.features[4].running_mean.uniform_(-0.2, 0.2)
        module.features[4].running_var.uniform_(0.5, 2.0)
        module.head[-1].weight.mul_(20)  # spread the logits: Score-CAM's and RISE's softmax weights differ
    folder = tmp_path_factory.mktemp("forward_only")
    pre = Preprocessing(crop=(SIZE, SIZE), resize=None)
    full = export_module(module, folder / "full.onnx", preprocessing=pre, cam_layer="features")
    forward = export_module(module, folder / "forward.onnx", preprocessing=pre, cam_layer="features", gradient=False)
    return full, forward


def _images():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32), np.array([-1, 3], np.int64)


def test_the_file_holds_the_forward_graph_and_the_metadata(files):
    full, forward = files
    import onnx

    proto = onnx.load(str(forward.path))
    outputs = [o.name for o in proto.graph.output]
    assert outputs == [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_CAM_ACTIVATION]
    assert [i.name for i in proto.graph.input] == [contract.INPUT_IMAGE, contract.INPUT_TARGET]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["gradmap.format_version"] == "3" and json.loads(props["gradmap.backprop"]) == []
    meta = contract.ModelMetadata.from_props(props)
    assert not meta.gradient and meta.target == "portable"
    assert meta.methods == ("eigen-cam", "score-cam", "occlusion", "rise"), meta.methods
    # the forward graph alone: a few nodes for target_index and the map's output, none of the backward pass
    assert forward.backward_nodes <= 5 < full.backward_nodes, (forward.backward_nodes, full.backward_nodes)
    assert forward.path.stat().st_size < full.path.stat().st_size
    assert forward.logits_error is not None and forward.gradient_error is None
    assert "no gradient (--no-gradient)" in forward.summary()
    # the full file is still a version 1 file (its preprocessing needs nothing newer)
    full_props = {p.key: p.value for p in onnx.load(str(full.path)).metadata_props}
    assert full_props["gradmap.format_version"] == "1"


@pytest.mark.parametrize("spec", [
    MethodSpec("occlusion", window=16, stride=8, baseline="blurred"),
    MethodSpec("rise", masks=64, grid=4, seed=1, mask_batch=16),
    MethodSpec("score-cam"),
    MethodSpec("eigen-cam"),
], ids=lambda s: s.name)
def test_forward_methods_equal_those_of_the_full_file(files, spec):
    full, forward = (SaliencyModel(r.path, provider="cpu", threads=1) for r in files)
    assert forward.lowering is None, "a forward-only model has no gradient graph to lower"
    images, targets = _images()
    logits, index, values, _ = attribute(full, spec, images, targets)
    logits_f, index_f, values_f, _ = attribute(forward, spec, images, targets)
    np.testing.assert_array_equal(index_f, index)
    assert rel(logits_f, logits) < RELATIVE
    assert np.abs(values).max() > 0, f"{spec.name}: an all-zero map compares nothing"
    assert rel(values_f, values) < RELATIVE, f"{spec.name}: {rel(values_f, values):.2g}"


@pytest.mark.parametrize("method", ["vanilla", "grad-cam", "smoothgrad", "xrai"])
def test_gradient_methods_are_refused_naming_the_method_and_why(files, method):
    model = SaliencyModel(files[1].path, provider="cpu", threads=1)
    with pytest.raises(UnsupportedMethodError) as e:
        check_supported(model, method, "forward.onnx")
    message = str(e.value)
    assert f"does not support {method}" in message and "exported without one (--no-gradient)" in message
    assert "export it with --gradient" in message, message
    with pytest.raises(ValueError, match="--no-gradient"):
        model.run(_images()[0])


def test_cli_info_run_and_verify(files, tmp_path, photo_files):
    path = str(files[1].path)
    runner = CliRunner()
    result = runner.invoke(main, ["info", path])
    assert result.exit_code == 0, result.output
    assert "no gradient (--no-gradient" in result.output and "methods:        eigen-cam, score-cam, occlusion, rise" \
        in result.output
    assert "vanilla (export with --gradient)" in result.output, result.output
    assert "grad-cam (export with --gradient --cam-layer auto)" in result.output
    info = json.loads(runner.invoke(main, ["info", path, "--json"]).output)
    assert info["gradient"] is False and info["format_version"] == 3 and info["cpu_lowering"]["where"] == "none"
    result = runner.invoke(main, ["run", path, str(photo_files[0]), "--out", str(tmp_path / "maps")])
    assert result.exit_code != 0 and "does not support vanilla" in result.output and "--no-gradient" in result.output
    result = runner.invoke(main, ["run", path, str(photo_files[0]), "--method", "occlusion", "--window", "16",
                                  "--stride", "16", "--out", str(tmp_path / "maps"), "--format", "npy"])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "maps").glob("*.npy")), "no map written"


def test_export_refuses_options_that_need_the_gradient(tmp_path):
    from gradmap.contract import Preprocessing
    from gradmap.export import export_module
    from gradmap.graph import ExportError

    module = _Net().eval()
    pre = Preprocessing(crop=(SIZE, SIZE), resize=None)
    with pytest.raises(ExportError, match="--backprop guided"):
        export_module(module, None, preprocessing=pre, backprops=("guided",), gradient=False)
    with pytest.raises(ExportError, match="--target cpu"):
        export_module(module, None, preprocessing=pre, target="cpu", gradient=False)


def test_a_forward_only_export_needs_no_gradient_rule(tmp_path):
    """A classifier with an op gradmap has no gradient rule for exports forward-only (and is refused with it)."""
    from gradmap.contract import Preprocessing
    from gradmap.export import export_module
    from gradmap.graph import UnsupportedOpsError
    from gradmap.graph.gradient import RULES

    class Integrated(torch.nn.Module):  # CumSum: an op without a gradient rule in gradmap
        def __init__(self):
            super().__init__()
            self.net = _Net()

        def forward(self, x):
            return self.net(torch.cumsum(x, dim=3) / SIZE)

    assert "CumSum" not in RULES
    module = Integrated().eval()
    pre = Preprocessing(crop=(SIZE, SIZE), resize=None)
    report = export_module(module, tmp_path / "cumsum.onnx", preprocessing=pre, gradient=False)
    model = SaliencyModel(report.path, provider="cpu", threads=1)
    images, _ = _images()
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
    assert rel(model.logits(images), expected) < 1e-5
    with pytest.raises(UnsupportedOpsError, match="CumSum"):
        export_module(module, None, preprocessing=pre, verify=False)


def test_metadata_versions():
    pre = contract.Preprocessing(crop=(8, 8), resize=None)
    forward = contract.ModelMetadata("m", "w", pre, ("a", "b"), backprops=(), target="portable")
    assert forward.format_version == 3 and forward.lowest_format_version == 3
    props = forward.to_props()
    assert props["gradmap.format_version"] == "3"
    assert contract.ModelMetadata.from_props(props).methods == ("occlusion", "rise")
    assert not contract.props_have_gradient(props)
    # older files: version 1 and 2 read as before, with their gradient
    full = contract.ModelMetadata("m", "w", pre, ("a", "b"))
    assert full.to_props()["gradmap.format_version"] == "1" and full.gradient
    v2 = contract.ModelMetadata("m", "w", contract.Preprocessing(crop=(8, 8), resize=None, value_range="0-255"),
                                ("a", "b"))
    assert contract.ModelMetadata.from_props(v2.to_props()).format_version == 2
    # an empty backprop list claims version 3: a version 2 file with one is malformed
    bad = dict(props, **{"gradmap.format_version": "2"})
    with pytest.raises(contract.ContractError, match="forward-only models are version 3"):
        contract.ModelMetadata.from_props(bad)
    with pytest.raises(contract.ContractError, match="upgrade gradmap"):
        contract.ModelMetadata.from_props(dict(props, **{"gradmap.format_version": "4"}))

