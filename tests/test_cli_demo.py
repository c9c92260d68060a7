"""gradmap demo: the bundled model on the bundled pictures, offline, torch-free."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import image_info
from gradmap.cli import main
from gradmap.demo import demo_assets


def test_demo_writes_a_figure_per_picture(tmp_path):
    assets = demo_assets()
    if not assets.joinpath("shapes.onnx").is_file():
        pytest.skip("demo model not generated (python models/make_demo.py)")
    pictures = sorted(p.name for p in assets.joinpath("images").iterdir() if p.name.endswith(".png"))
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    figures = sorted((tmp_path / "demo").glob("*.methods.png"))
    assert len(figures) == len(pictures) >= 5, result.output
    assert "vanilla" in result.output and str((tmp_path / "demo").resolve()) in result.output
    size, mode = image_info(figures[0])
    assert mode == "RGB" and size[0] > 3 * size[1], "one row: the picture and one overlay per method"
