"""`gradmap run` and `gradmap info` through click's CliRunner, and the torch-free guarantee."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import image_info, LINEAR_MODEL, PLAIN_MODEL, WRONG_INTERFACE_MODEL
from gradmap.cli import main


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def test_help_lists_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "run" in result.output and "info" in result.output and "export" in result.output
    assert runner.invoke(main, ["run", "--help"]).exit_code == 0


def test_run_writes_default_formats_and_prints_top5(runner, photo_files, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), *map(str, photo_files), "--out", str(out),
                                  "--provider", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    for photo in photo_files:
        for kind in ("heatmap", "overlay", "figure"):
            assert (out / f"{photo.name}.{kind}.png").is_file(), f"{kind} missing for {photo.name}"
        assert not (out / f"{photo.name}.map.npy").exists(), "npy is not a default format"
        size = image_info(photo)[0]
        assert image_info(out / f"{photo.name}.overlay.png")[0] == size
    assert str(photo_files[0]) in result.stdout
    assert all(label in result.stdout for label in ("cat", "dog", "bird", "fish"))


def test_run_bad_image_among_good_ones_exits_1(runner, photo_files, tmp_path):
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(photo_files[1].read_bytes()[:300])
    out = tmp_path / "out"
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(tmp_path), "--out", str(out), "--format", "npy"])
    assert result.exit_code == 1, result.output
    assert f"{bad}: empty file" in result.stderr
    assert str(truncated) in result.stderr
    assert "2 of 4 inputs failed" in result.stderr
    for photo in photo_files:
        assert np.load(out / f"{photo.name}.map.npy").shape == (32, 32)


def test_run_json_output_parses(runner, photo_files, tmp_path):
    missing = tmp_path / "nope.jpg"
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), *map(str, photo_files), str(missing), "--out",
                                  str(tmp_path / "o"), "--json", "--target", "top2", "--format", "heatmap,npy"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["failed"] == 1 and doc["input_errors"] == [{"path": str(missing), "error": "no such file or directory"}]
    first = doc["images"][0]
    assert first["path"] == str(photo_files[0]) and first["error"] is None
    assert len(first["predictions"]) == 4
    assert sum(p["probability"] for p in first["predictions"]) == pytest.approx(1.0)
    assert [m["rank"] for m in first["maps"]] == [1, 2]
    assert first["maps"][0]["target"]["index"] == first["predictions"][0]["index"]
    assert set(first["maps"][1]["files"]) == {"heatmap", "gradient", "map"}
    assert first["maps"][1]["files"]["heatmap"].endswith("chelsea.jpg.top2.heatmap.png")


def test_run_mirrors_tree_and_globs(runner, photos, tmp_path):
    for folder in ("a", "b/c"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        Image.fromarray(photos["astronaut"]).resize((64, 64)).save(tmp_path / "in" / folder / "x.png")
    out = tmp_path / "in" / "results"  # output inside the input tree: not picked up as input
    args = ["run", str(LINEAR_MODEL), str(tmp_path / "in" / "**" / "*.png"), "--out", str(out), "--format", "heatmap"]
    for _ in range(2):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a/x.png.heatmap.png",
                                                                                "b/c/x.png.heatmap.png"]


def test_run_options(runner, photo_files, tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(out), "--target", "dog",
                                  "--reduce", "l2", "--no-equalize", "--no-crop", "--placement", "stretch",
                                  "--colormap", "viridis", "--alpha", "0.3", "--clip-percentile", "99",
                                  "--format", "heatmap", "--format", "npy", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    heatmap_size, heatmap_mode = image_info(out / "chelsea.jpg.heatmap.png")
    assert heatmap_mode == "RGB" and heatmap_size == image_info(photo_files[0])[0]  # stretch: no transparency
    assert np.load(out / "chelsea.jpg.gradient.npy").shape == (3, 32, 32)
    assert "for dog (1)" in result.stdout


def test_progress_bar_for_many_images(runner, photos, tmp_path):
    for i in range(5):
        Image.fromarray(photos["coffee"]).resize((40, 40)).save(tmp_path / f"p{i}.png")
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(tmp_path), "--out", str(tmp_path / "o"),
                                  "--format", "npy", "--batch-size", "2"])
    assert result.exit_code == 0
    assert "saliency" in result.stderr, "progress bar label expected on stderr"


@pytest.mark.parametrize("args,message", [
    (["--reduce", "mean"], "Invalid value for '--reduce'"),
    (["--format", "gif"], "Invalid value for '--format'"),
    (["--target", "zebra"], "no class named 'zebra'"),
    (["--target", "top9"], "K must be"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--provider", "NoSuchExecutionProvider"], "not available"),
], ids=["reduce", "format", "target-name", "target-k", "batch", "provider"])
def test_usage_errors_exit_2(runner, photo_files, tmp_path, args, message):
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "o").exists()


def test_missing_model_and_missing_inputs_are_usage_errors(runner, tmp_path, photo_files):
    result = runner.invoke(main, ["run", str(tmp_path / "none.onnx"), str(photo_files[0])])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert runner.invoke(main, ["run", str(LINEAR_MODEL)]).exit_code == 2


@pytest.mark.parametrize("model,message", [
    (PLAIN_MODEL, "not a gradmap model: no gradmap metadata"),
    (WRONG_INTERFACE_MODEL, "wrong interface"),
], ids=["no-metadata", "wrong-interface"])
def test_non_gradmap_model_exits_1(runner, photo_files, model, message):
    for command in (["run", str(model), str(photo_files[0])], ["info", str(model)]):
        result = runner.invoke(main, command)
        assert result.exit_code == 1
        assert str(model) in result.stderr and message in result.stderr


def test_not_onnx_exits_1(runner, tmp_path, photo_files):
    result = runner.invoke(main, ["info", str(photo_files[0])])
    assert result.exit_code == 1 and "not an ONNX model" in result.stderr


def test_info(runner):
    result = runner.invoke(main, ["info", str(LINEAR_MODEL)])
    assert result.exit_code == 0, result.output
    for text in ("linear-fixture", "resize 36", "center crop 32x32", "4 (cat, dog, bird, fish)", "ai.onnx 18",
                 "gradient", "tensor(int64)", "CPUExecutionProvider"):
        assert text in result.stdout, f"{text!r} missing from info"
    doc = json.loads(runner.invoke(main, ["info", str(LINEAR_MODEL), "--json"]).stdout)
    assert doc["opsets"] == {"ai.onnx": 18} and doc["num_classes"] == 4
    assert [o["name"] for o in doc["outputs"]] == ["logits", "target_index", "gradient"]


def test_runtime_and_run_never_import_torch(photo_files, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import gradmap.runtime, gradmap.cli
        from click.testing import CliRunner
        result = CliRunner().invoke(gradmap.cli.main, ["run", {str(LINEAR_MODEL)!r}, {str(photo_files[0])!r},
                                    "--out", {str(tmp_path / "o")!r}, "--format", "heatmap,overlay,figure,npy"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(gradmap.cli.main, ["info", {str(LINEAR_MODEL)!r}])
        assert result.exit_code == 0, result.output
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "matplotlib"))
        print("HEAVY", heavy)
        assert not heavy, heavy
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout


def test_run_without_json_holds_no_record_per_picture(runner, tmp_path, monkeypatch):
    """Over a long folder, gradmap run's Python memory does not grow with the pictures done: only
    --json keeps every picture's record (for the list it prints at the end). A resnet50 run over 3000
    pictures grew 2.4 kB per picture (6.8 MB) while every run kept them."""
    import tracemalloc

    import gradmap.cli

    picture = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(picture)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(400):
        (folder / f"p{i:04d}.png").hardlink_to(picture)
    traced = []  # Python's traced memory as each picture's record is printed
    print_record = gradmap.cli._print_record
    monkeypatch.setattr(gradmap.cli, "_print_record",
                        lambda record: (traced.append(tracemalloc.get_traced_memory()[0]), print_record(record)))
    tracemalloc.start()
    try:
        result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(folder), "--out", str(tmp_path / "out"),
                                      "--format", "npy", "--provider", "cpu", "--threads", "1", "--batch-size", "8"])
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0, result.output
    assert len(traced) == 400
    # between the 100th and the 400th picture: the captured output grows (about 140 bytes a picture
    # here, CliRunner keeps it), a record kept would add kilobytes
    growth = (traced[399] - traced[99]) / 300
    assert growth < 1000, f"{growth:.0f} bytes more per picture done"
