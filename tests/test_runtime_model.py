"""Loading gradmap models (and refusing what is not one), running them, and the saliency pipeline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import image_info, LINEAR_MODEL, PLAIN_MODEL, WRONG_INTERFACE_MODEL, assert_close
from gradmap.runtime import (
    GradmapModelError,
    NonFiniteGradientError,
    OutputLayout,
    SaliencyModel,
    Target,
    TargetError,
    compute_saliency,
    iter_saliency,
    parse_target,
    preprocess,
    resolve_providers,
    write_outputs,
)
from gradmap.runtime.model import ModelOutputs


def test_loads_fixture(linear_model):
    assert linear_model.labels == ("cat", "dog", "bird", "fish")
    assert linear_model.input_size == (32, 32)
    assert linear_model.providers == ["CPUExecutionProvider"]
    assert linear_model.opsets == {"ai.onnx": 18}
    assert [t.name for t in linear_model.inputs] == ["image", "target"]


def test_session_options():
    """Threads pass through; no memory pattern, which holds a second copy of a gradient graph's
    activations (see ``session_options``)."""
    options = SaliencyModel(LINEAR_MODEL, threads=3).session.get_session_options()
    assert options.intra_op_num_threads == 3
    assert options.enable_mem_pattern is False


def test_header_matches_onnx_package():
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(LINEAR_MODEL))
    model = SaliencyModel(LINEAR_MODEL, provider="cpu")
    assert model.header.ir_version == proto.ir_version
    assert model.opsets == {(o.domain or "ai.onnx"): o.version for o in proto.opset_import}
    assert model.header.producer_name == proto.producer_name


@pytest.mark.parametrize("make,reason", [
    (lambda d: d / "missing.onnx", "no such file"),
    (lambda d: d, "not a file"),
    (lambda d: _write(d / "empty.onnx", b""), r"not an ONNX model \(empty file\)"),
    (lambda d: _write(d / "text.onnx", b"hello, this is text\n" * 20), "not an ONNX model"),
    (lambda d: _write(d / "cut.onnx", LINEAR_MODEL.read_bytes()[:5000]), "not an ONNX model|cannot load"),
    (lambda d: shutil.copy(PLAIN_MODEL, d / "plain.onnx"), "not a gradmap model: no gradmap metadata"),
    (lambda d: shutil.copy(WRONG_INTERFACE_MODEL, d / "w.onnx"), "wrong interface.*no output named 'gradient'"),
], ids=["missing", "directory", "empty", "text", "truncated", "no-metadata", "wrong-interface"])
def test_refuses_what_is_not_a_gradmap_model(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(GradmapModelError, match=reason) as info:
        SaliencyModel(path, provider="cpu")
    assert info.value.path == str(path), "the error must name the file"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_providers():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="not available"):
        resolve_providers("NoSuchExecutionProvider")
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            resolve_providers("cuda")


def test_gradient_is_the_weight_row(linear_model, linear_weights):
    w, b = linear_weights
    images = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    out = linear_model.run(images, [-1, 0, 1, 2, -1])
    logits = images.reshape(5, -1).astype(np.float64) @ w.T.astype(np.float64) + b
    assert_close(out.logits, logits, 1e-4, "logits")
    assert out.target_index.tolist() == [int(np.argmax(logits[0])), 0, 1, 2, int(np.argmax(logits[4]))]
    for n in range(5):
        assert_close(out.gradient[n], w[out.target_index[n]].reshape(3, 32, 32), 0.0, f"gradient {n}")


def test_run_validates_inputs(linear_model):
    with pytest.raises(ValueError, match="shape"):
        linear_model.run(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="targets"):
        linear_model.run(np.zeros((2, 3, 32, 32), np.float32), [7, 0])


def test_parse_target():
    labels = ("cat", "dog", "Crane", "crane", "fish")
    assert parse_target(None, labels) == Target("top", 1)
    assert parse_target("top3", labels) == Target("top", 3)
    assert parse_target("4", labels) == Target("class", 4)
    assert parse_target(1, labels) == Target("class", 1)
    assert parse_target("DOG", labels) == Target("class", 1)
    assert parse_target("crane", labels) == Target("class", 3)  # exact match wins
    for bad, message in [("top0", "K must be"), ("top9", "K must be"), ("5", "out of range"),
                         ("zebra", "no class named"), ("CRANE", "ambiguous")]:
        with pytest.raises(TargetError, match=message):
            parse_target(bad, labels)


def test_compute_saliency_matches_independent_computation(linear_model, linear_weights, photos):
    w, _ = linear_weights
    picture = Image.fromarray(photos["chelsea"])
    result = compute_saliency(linear_model, picture, target="top3")
    assert [m.rank for m in result.maps] == [1, 2, 3]
    tensor, _ = preprocess(picture, linear_model.metadata.preprocessing)
    logits = tensor.reshape(-1).astype(np.float64) @ w.T.astype(np.float64)
    order = np.argsort(-(logits + linear_weights[1]))
    assert [m.target_index for m in result.maps] == order[:3].tolist()
    assert [p.index for p in result.predictions(4)] == order.tolist()
    assert sum(p.probability for p in result.predictions(4)) == pytest.approx(1.0)
    for m in result.maps:
        g = w[m.target_index].reshape(3, 32, 32)
        expected = np.max(np.abs(g), axis=0)
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        assert_close(m.saliency_map, expected, 1e-6, f"map for class {m.target_index}")
        assert m.target_label == linear_model.labels[m.target_index]


def test_class_name_target(linear_model, photos):
    result = compute_saliency(linear_model, Image.fromarray(photos["coffee"]), target="bird")
    assert [(m.target_index, m.rank) for m in result.maps] == [(2, None)]


def test_iter_saliency_streams_batches_and_isolates_failures(linear_model, photo_files, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    calls = []
    original = SaliencyModel.run

    def counting_run(self, images, targets=None):
        calls.append(images.shape[0])
        return original(self, images, targets)

    monkeypatch.setattr(SaliencyModel, "run", counting_run)
    sources = [photo_files[0], bad, photo_files[1]]
    results = list(iter_saliency(linear_model, sources, batch_size=2))
    assert [r.ok for r in results] == [True, False, True]
    assert "not an image" in str(results[1].error)
    assert calls == [1, 1], "two batches of two, the bad picture not sent to the model"


def test_nan_gradient_is_a_clear_per_image_error(linear_model, photo_files, monkeypatch):
    original = SaliencyModel.run

    def nan_run(self, images, targets=None):
        out = original(self, images, targets)
        gradient = out.gradient.copy()
        gradient[1, 0, 0, 0] = np.nan
        return ModelOutputs(out.logits, out.target_index, gradient)

    monkeypatch.setattr(SaliencyModel, "run", nan_run)
    results = list(iter_saliency(linear_model, photo_files, batch_size=2))
    assert results[0].ok and not results[1].ok
    assert isinstance(results[1].error, NonFiniteGradientError) and "NaN" in str(results[1].error)


def test_write_outputs_layout_and_atomicity(linear_model, photos, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        Image.fromarray(photos["rocket"]).save(tmp_path / "in" / folder / "x.jpg")
    sources = [str(tmp_path / "in" / f / "x.jpg") for f in ("a", "b")]
    layout = OutputLayout(tmp_path / "out", sources)
    written = []
    for result in iter_saliency(linear_model, sources):
        written.append(write_outputs(result, result.maps[0], layout, ["heatmap", "overlay", "figure", "npy"]))
    assert written[0]["heatmap"] == str(tmp_path / "out" / "a" / "x.jpg.heatmap.png")
    assert written[1]["heatmap"] == str(tmp_path / "out" / "b" / "x.jpg.heatmap.png")
    height, width = photos["rocket"].shape[:2]
    for files in written:
        assert image_info(files["heatmap"])[0] == (width, height)
        assert image_info(files["heatmap"])[1] == "RGBA"
        assert image_info(files["overlay"])[0] == (width, height)
        assert np.load(files["gradient"]).shape == (3, 32, 32)
        m = np.load(files["map"])
        assert m.shape == (32, 32) and m.dtype == np.float32
    assert not list((tmp_path / "out").rglob("*.tmp")), "temporary files left behind"


def test_never_overwrites_an_input(tmp_path, photos):
    source = tmp_path / "x.jpg.heatmap.png"
    Image.fromarray(photos["rocket"]).save(source)
    layout = OutputLayout(tmp_path, [str(tmp_path / "x.jpg"), str(source)])
    with pytest.raises(FileExistsError, match="refusing to overwrite input"):
        layout.path(str(tmp_path / "x.jpg"), "heatmap", ".png")


def test_names_have_one_source_in_the_contract():
    from gradmap import cli, contract
    from gradmap.runtime import io, methods

    assert methods.METHODS is contract.METHODS and io.FORMATS is contract.OUTPUT_FORMATS
    params = {p.name: p for p in cli.run_command.params}
    assert tuple(params["method"].type.choices) == contract.METHODS
    assert tuple(next(p for p in cli.export_command.params if p.name == "score").type.choices) == contract.SCORE_KINDS
    assert all(m.kind in contract.METHOD_KINDS for m in contract.METHOD_TABLE), "every method names its saved array"
    assert all(m.export_options or set(m.outputs) <= set(contract.model_outputs((contract.DEFAULT_BACKPROP,), False))
               for m in contract.METHOD_TABLE), "every method a default export lacks says what to export"
    assert contract.methods_for(("vanilla", "guided", "deconvnet"), True, True) == contract.METHODS
    assert contract.methods_for(("vanilla",), False) == ("vanilla", "smoothgrad", "integrated-gradients",
                                                         "gradient-x-input", "occlusion", "rise", "blur-ig",
                                                         "guided-ig", "xrai")
    special = ("guided-backprop", "deconvnet", "grad-cam", "grad-cam++", "guided-grad-cam")
    assert tuple(m for m in contract.methods_for(("vanilla", "deconvnet"), True) if m in special) == \
        ("deconvnet", "grad-cam", "grad-cam++")


def test_the_runtime_reaches_onnxruntime_only_through_saliency_model():
    """model.py is the one module that creates or runs onnxruntime sessions (with _session_cache.py,
    which creates SaliencyModel's session through the cache of optimized graphs, providers.py, which
    creates a session for a provider choice, and device.py, which runs SaliencyModel's session with
    its images on the GPU through I/O binding)."""
    import re
    from pathlib import Path

    import gradmap.runtime

    offenders = []
    for path in sorted(Path(gradmap.runtime.__file__).parent.glob("*.py")):
        if path.name in ("model.py", "_session_cache.py", "providers.py", "device.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"import onnxruntime|InferenceSession|session\.run\(|\.session\b", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "calls into onnxruntime outside SaliencyModel:\n" + "\n".join(offenders)


def test_run_outputs_and_probabilities(linear_model, linear_weights):
    from gradmap.runtime import softmax

    W, b = linear_weights
    rng = np.random.default_rng(2)
    images = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = linear_model.run_outputs(images, [-1, 0, 1], ("logits", "gradient"))
    assert set(out) == {"logits", "gradient"} and out["gradient"].shape == (3, 3, 32, 32)
    expected = softmax(images.reshape(3, -1).astype(np.float64) @ W.T.astype(np.float64) + b, axis=1)
    np.testing.assert_allclose(linear_model.probabilities(images), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no output gradient_guided.*--backprop"):
        linear_model.run_outputs(images, None, ("gradient_guided",))
