"""A Keras export used where TensorFlow is not installed: tests/fixtures/keras (written by
tools/make_keras_fixtures.py with ``gradmap export keras:PATH``: a seeded NHWC CNN with ReLUs, max
pooling and Keras' caffe preprocessing, BGR at 0-255, model format 2).

- every output of the file (the gradient, guided backpropagation, deconvnet, the NCHW view of the NHWC
  Grad-CAM feature map and its gradient) against tf.GradientTape on the float64 Keras model, stored with
  the fixture; Grad-CAM from them against TensorFlow's;
- the portable file as written, lowered at load (blocks 8 and 16) and the ``--target cpu`` export:
  the same numbers, and the lowering is the cpu target's graph;
- every method ``gradmap info`` lists for each file runs through ``gradmap run``, with the same maps
  from the portable and the cpu files; the methods it does not list are refused by name.

Torch-free: CI runs it in the ONNX venv too (the web page and ``--engine ray`` on these files are in
tests/test_web.py and tests/test_distributed.py).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gradmap import contract
from gradmap.cli import main
from gradmap.runtime import SaliencyModel
from gradmap.runtime.cam import grad_cam

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "keras"
PORTABLE = FIXTURES / "cnn.gradmap.onnx"
PLAIN = FIXTURES / "cnn_plain.gradmap.onnx"
CPU = FIXTURES / "cnn_cpu.gradmap.onnx"
#: float32 against TensorFlow's float64: measured 7e-8 (logits) to 4e-7 (the feature map) when the
#: fixture was made; a wrong rule or a wrong NHWC transpose is off by the values' own size
FLOAT32 = 1e-5
#: what each output of the file is in the fixture's TensorFlow values
REFERENCE = {contract.OUTPUT_LOGITS: "logits", contract.OUTPUT_GRADIENT: "gradient_vanilla",
             contract.OUTPUT_GRADIENT_GUIDED: "gradient_guided", contract.OUTPUT_GRADIENT_DECONVNET: "gradient_deconvnet",
             contract.OUTPUT_CAM_ACTIVATION: "cam_activation", contract.OUTPUT_CAM_GRADIENT: "cam_gradient"}
#: small settings for the methods that take many gradients
SETTINGS = {"smoothgrad": ["--samples", "4"], "integrated-gradients": ["--steps", "6"], "blur-ig": ["--steps", "8"],
            "guided-ig": ["--steps", "8"], "xrai": ["--steps", "6"], "rise": ["--masks", "40"],
            "occlusion": ["--window", "16", "--stride", "8"]}


def _relative(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.fixture(scope="module")
def tensorflow():
    return dict(np.load(FIXTURES / "cnn.npz"))


def _outputs(model: SaliencyModel, values: dict, names=tuple(REFERENCE)) -> dict:
    return model.run_outputs(values["image"], values["target"], names)


def test_fixture_files_are_what_the_generator_writes():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert set(manifest["exports"]) == {PORTABLE.name, PLAIN.name, CPU.name}
    for name, entry in manifest["exports"].items():
        assert entry["command"].startswith("gradmap export keras:"), entry["command"]
        assert (FIXTURES / name).stat().st_size == entry["bytes"], f"{name} is not the file the generator wrote"
    meta = SaliencyModel(PORTABLE, provider="cpu", threads=1, cpu_block="off").metadata
    assert meta.format_version == 2 and meta.source_model == "keras:cnn.keras"
    p = meta.preprocessing
    assert (p.channel_order, p.value_range, p.std) == ("bgr", "0-255", (1.0, 1.0, 1.0)), p


@pytest.mark.parametrize("path,cpu_block", [(PORTABLE, "off"), (PORTABLE, 8), (PORTABLE, 16), (CPU, None)],
                         ids=["portable-as-written", "portable-lowered-8", "portable-lowered-16", "cpu-target"])
def test_outputs_equal_float64_gradient_tape(tensorflow, path, cpu_block):
    model = SaliencyModel(path, provider="cpu", threads=1, cpu_block=cpu_block, cache_dir=False)
    if cpu_block in (8, 16):
        assert model.lowering.state == "memory" and model.lowering.block == cpu_block, model.lowering
    outputs = _outputs(model, tensorflow)
    for name, key in REFERENCE.items():
        assert outputs[name].shape == tensorflow[key].shape, (name, outputs[name].shape, tensorflow[key].shape)
        error = _relative(outputs[name], tensorflow[key])
        assert error < FLOAT32, f"{path.name} ({cpu_block}) {name}: {error:.2e} from float64 tf.GradientTape"
    # Grad-CAM from the file's NCHW view of the NHWC map equals TensorFlow's on the NHWC map itself
    cam = grad_cam(outputs[contract.OUTPUT_CAM_ACTIVATION], outputs[contract.OUTPUT_CAM_GRADIENT])
    assert _relative(cam, tensorflow["grad_cam"]) < FLOAT32
    assert np.count_nonzero(tensorflow["grad_cam"]) > 0.1 * tensorflow["grad_cam"].size, "a Grad-CAM worth comparing"


def test_guided_and_deconvnet_differ_from_the_gradient(tensorflow):
    """The fixture's ReLU rules do something here: a test of them on a graph where they equal the
    plain gradient could not fail."""
    for rule in ("guided", "deconvnet"):
        assert _relative(tensorflow[f"gradient_{rule}"], tensorflow["gradient_vanilla"]) > 0.1, rule


def test_lowering_at_load_and_the_cpu_target_give_the_portable_numbers(tensorflow, tmp_path):
    """The runtime's lowering of the portable file (block 16, the export's default channel multiple) and
    the --target cpu file are other graphs than the portable one, with its numbers. (Node for node
    equality of the two is tests/test_lowering_at_load.py's; the committed cpu file keeps the lowering of
    the day it was written.)"""
    import onnx

    lowered = SaliencyModel(PORTABLE, provider="cpu", threads=1, cpu_block=16, cache_dir=tmp_path)
    assert lowered.lowering.state == "written"

    def histogram(path):
        return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)

    assert histogram(lowered.lowering.path) != histogram(PORTABLE), "the lowering changed nothing"
    assert histogram(CPU) != histogram(PORTABLE), "the cpu target is another graph"
    written = _outputs(SaliencyModel(PORTABLE, provider="cpu", threads=1, cpu_block="off"), tensorflow)
    for other in (_outputs(lowered, tensorflow), _outputs(SaliencyModel(CPU, provider="cpu", threads=1), tensorflow)):
        for name, value in other.items():
            assert _relative(value, written[name]) <= 1e-5, name


def _info(path: Path) -> dict:
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_info_lists_the_methods_of_each_export():
    full, plain = _info(PORTABLE), _info(PLAIN)
    assert {"guided-backprop", "deconvnet", "grad-cam", "guided-grad-cam", "score-cam"} <= set(full["methods"])
    assert not {"guided-backprop", "deconvnet", "grad-cam"} & set(plain["methods"])
    assert plain["other_methods"]["grad-cam"] == ["--cam-layer auto"]
    assert _info(CPU)["methods"] == full["methods"] and _info(CPU)["target"] == "cpu"
    assert full["cam_layer"].startswith("auto (") and full["outputs"][-1]["shape"][1:] == [16, 12, 16], full


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("keras") / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    return path


def _run(path: Path, picture: Path, out: Path, method: str) -> np.ndarray:
    result = CliRunner().invoke(main, ["run", str(path), str(picture), "--out", str(out), "--method", method,
                                       "--format", "npy", "--json", "--provider", "cpu", "--threads", "1",
                                       *SETTINGS.get(method, [])])
    assert result.exit_code == 0, f"{path.name} {method}: {result.output[-2000:]}"
    (record,) = json.loads(result.stdout)["images"]
    assert record["error"] is None and record["maps"], record
    return np.load(record["maps"][0]["files"]["map"])


@pytest.mark.parametrize("path", [PORTABLE, PLAIN], ids=["cam-guided-deconvnet", "plain"])
def test_every_method_info_lists_runs_and_the_cpu_target_agrees(path, picture, tmp_path):
    """Each method ``gradmap info`` lists gives a finite, non-constant map; on the file with Grad-CAM
    and the ReLU rules, the --target cpu export's maps are the portable file's."""
    methods = _info(path)["methods"]
    assert len(methods) >= (19 if path == PORTABLE else 9), methods
    for method in methods:
        ours = _run(path, picture, tmp_path / path.stem / method, method)
        assert np.all(np.isfinite(ours)) and ours.std() > 0, f"{path.name} {method}: a flat or non-finite map"
        if path == PORTABLE:
            cpu = _run(CPU, picture, tmp_path / "cpu" / method, method)
            assert ours.shape == cpu.shape and _relative(cpu, ours) <= 1e-4, (method, _relative(cpu, ours))
    for method in _info(path)["other_methods"]:
        result = CliRunner().invoke(main, ["run", str(path), str(picture), "--out", str(tmp_path / "refused"),
                                           "--method", method])
        assert result.exit_code != 0 and method in result.output, (method, result.output[-500:])
