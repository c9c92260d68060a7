"""gradmap verify MODEL.onnx --reference SPEC: the export's parity check on the user's pictures, exit 1 on a
mismatch; onnx: references run without torch; a source whose reference loader is missing says which."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx_ir")
from click.testing import CliRunner  # noqa: E402

from gradmap.cli import main  # noqa: E402
from gradmap.export._verify import REFERENCES, load_reference  # noqa: E402
from gradmap.graph import ExportError  # noqa: E402
from _onnx_cnn import cnn_file  # noqa: E402

PICTURES = Path(__file__).resolve().parent.parent / "models" / "demo" / "images"


def _cnn_file(folder: Path) -> Path:
    return cnn_file(folder)


def _export(source: Path, out: Path, *extra: str):
    result = CliRunner().invoke(main, ["export", f"onnx:{source}", "--preset", "torchvision", "--crop", "64",
                                       "--resize", "73", "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    source = _cnn_file(folder)
    return source, _export(source, folder / "cnn.gradmap.onnx")


def test_verify_prints_a_row_per_picture_and_exits_0_when_the_file_matches(exported):
    source, model = exported
    result = CliRunner().invoke(main, ["verify", str(model), "--reference", f"onnx:{source}", "--images", str(PICTURES),
                                       "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.endswith(" ok")]
    assert len(rows) == len(list(PICTURES.glob("*.png"))), result.output
    assert "all 10 pictures match" in result.output
    for row in rows:  # logits and gradient errors far below their limits
        logits, logits_limit, gradient, gradient_limit = (float(v) for v in row.split()[-6:-2])
        assert logits < logits_limit / 10 and gradient < gradient_limit / 10, row


def test_verify_without_pictures_checks_random_batches(exported):
    source, model = exported
    result = CliRunner().invoke(main, ["verify", str(model), "--reference", f"onnx:{source}"])
    assert result.exit_code == 0, result.output
    assert "matches" in result.output and "on a random batch" in result.output


def test_verify_exits_1_naming_the_pictures_when_the_file_has_a_wrong_gradient(exported, tmp_path, monkeypatch):
    """A file exported unchecked with a planted wrong rule (the last Conv's input gradient scaled by 1.05):
    every picture's gradient misses, logits still match."""
    from gradmap.graph.gradient import RULES

    source, _ = exported
    original = RULES["Conv"]

    def wrong(ctx, node, dy):
        grads = list(original(ctx, node, dy))
        grads[0] = ctx.op("Mul", grads[0], ctx.scalar(1.05))
        return grads

    with monkeypatch.context() as patch:
        patch.setitem(RULES, "Conv", wrong)
        model = _export(source, tmp_path / "wrong.onnx", "--no-verify")
    pictures = [str(PICTURES / "circle_0.png"), str(PICTURES / "star_1.png")]
    result = CliRunner().invoke(main, ["verify", str(model), "--reference", f"onnx:{source}",
                                       *(a for p in pictures for a in ("--images", p))])
    assert result.exit_code == 1, result.output
    assert result.output.count("MISMATCH") == 2, result.output
    assert "2 of 2 pictures differ from onnx:" in result.output
    assert "circle_0.png: the gradient differs from float64 evaluation of the ONNX graph by" in result.output


def test_verify_refuses_pictures_that_do_not_exist(exported, tmp_path):
    source, model = exported
    result = CliRunner().invoke(main, ["verify", str(model), "--reference", f"onnx:{source}",
                                       "--images", str(tmp_path / "nothing-here")])
    assert result.exit_code == 2, result.output
    assert "nothing-here" in result.output


def test_a_reference_without_its_loader_names_the_missing_piece(monkeypatch):
    monkeypatch.setitem(REFERENCES, "keras:", "gradmap.export._no_such_source:load_reference")
    with pytest.raises(ExportError, match=r"no keras reference \(gradmap.export._no_such_source:load_reference is "
                                          "missing"):
        load_reference("keras:ResNet50")


def test_an_onnx_reference_runs_with_torch_unimportable(exported):
    source, model = exported
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "torchvision", "tensorflow", "keras", "jax"):
            sys.modules[name] = None  # import raises ImportError
        from click.testing import CliRunner
        from gradmap.cli import main
        result = CliRunner().invoke(main, ["verify", {str(model)!r}, "--reference", "onnx:{source}",
                                           "--images", {str(PICTURES / "cross_0.png")!r}])
        print(result.output)
        assert result.exit_code == 0, result.output
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None], "torch was imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_verify_a_torchvision_export_against_torch(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "resnet18.onnx"
    result = CliRunner().invoke(main, ["export", "resnet18", "--weights", "none", "--seed", "1", "--crop", "64",
                                       "--resize", "73", "-o", str(out)])
    assert result.exit_code == 0, result.output
    args = ["verify", str(out), "--reference", "resnet18", "--images", str(PICTURES / "square_0.png")]
    good = CliRunner().invoke(main, [*args, "--weights", "none", "--seed", "1"])
    assert good.exit_code == 0 and "pictures match resnet18" in good.output, good.output
    assert "pools+relus" in good.output, "torch replays the model's max-pooling and ReLU decisions"
    other = CliRunner().invoke(main, [*args, "--weights", "none", "--seed", "2"])
    assert other.exit_code == 1 and "logits differ from torch autograd (float64)" in other.output, other.output
