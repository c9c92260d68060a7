"""Other frameworks' ONNX files (tests/fixtures/onnx, made by tools/make_onnx_fixtures.py) exported with
``gradmap export onnx:PATH`` and checked against the float64 logits and gradients their own framework
computed when the fixture was made (jax.grad, paddle.grad, tf.GradientTape, torch autograd), then run
with the attribution methods their graphs allow. No framework is needed here: CI runs this file in a
venv without torch, JAX, Paddle or TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnx_ir")
import onnxruntime as ort  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from gradmap.cli import main  # noqa: E402
from gradmap.export._onnx_file import export_onnx  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "onnx"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text()) if (FIXTURES / "manifest.json").exists() else {}


def _relative(actual, expected):
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def _export_options(entry: dict) -> dict:
    options = dict(entry["options"])
    preset = options.pop("preset_name")
    backprops = ["vanilla", *(["guided"] if "guided-backprop" in entry["methods"] else []),
                 *(["deconvnet"] if "deconvnet" in entry["methods"] else [])]
    return dict(options, preprocessing_options={"preset_name": preset}, backprops=backprops,
                cam_layer=entry.get("cam_layer"))


@pytest.fixture(scope="module", params=sorted(MANIFEST) or [pytest.param(None, marks=pytest.mark.skip("no fixtures"))])
def exported(request, tmp_path_factory):
    name = request.param
    entry = MANIFEST[name]
    out = tmp_path_factory.mktemp(name) / f"{name}.gradmap.onnx"
    report = export_onnx(FIXTURES / f"{name}.onnx", out, target="cpu", **_export_options(entry))
    return name, entry, report, out


def test_export_matches_the_source_framework_in_float64(exported):
    name, entry, report, out = exported
    data = np.load(FIXTURES / f"{name}.npz")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, gradient = session.run(["logits", "gradient"], {"image": data["image"], "target": data["target"]})
    logits_error = _relative(logits, data["logits"])
    gradient_error = _relative(gradient, data["gradient"])
    assert logits_error < 1e-4, f"{name}: logits {logits_error:.2e} from the {entry['reference']}"
    assert gradient_error < 1e-3, f"{name}: gradient {gradient_error:.2e} from the {entry['reference']}"
    assert report.gradient_error is not None and report.gradient_error < 1e-3, report.summary()


def test_the_methods_of_its_graph_run(exported, tmp_path):
    name, entry, _, out = exported
    from PIL import Image

    picture = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(picture)
    for method in entry["methods"]:
        result = CliRunner().invoke(main, ["run", str(out), str(picture), "--out", str(tmp_path / method),
                                           "--method", method, "--samples", "3", "--steps", "4", "--format", "npy",
                                           "--json"])
        assert result.exit_code == 0, f"{name} {method}: {result.output[-2000:]}"
        record = json.loads(result.output)["images"][0]
        assert record["error"] is None and record["maps"], record
        values = np.load(next(iter(record["maps"][0]["files"].values())))
        assert np.all(np.isfinite(values)) and np.any(values), f"{name} {method}: empty or non-finite map"


def test_manifest_lists_every_fixture_file():
    files = {p.stem for p in FIXTURES.glob("*.onnx")}
    assert files == set(MANIFEST), f"fixtures without a manifest entry or the reverse: {files ^ set(MANIFEST)}"
    for name in files:
        assert (FIXTURES / f"{name}.npz").exists(), f"{name}: no reference values"
