"""gradmap web without a browser: the site's files, model.json, errors and the server's headers.
The page itself runs in Chromium in tests/test_web.py."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from click.testing import CliRunner

from conftest import PLAIN_MODEL, LINEAR_MODEL
from gradmap import contract
from gradmap.cli import main
from gradmap.demo import demo_assets
from gradmap.web import ORT_CDN, ORT_FILES, PAGE_FILES, make_server


def test_demo_site_without_a_model(tmp_path):
    if not demo_assets().joinpath("shapes.onnx").is_file():
        pytest.skip("demo model not generated (python models/make_demo.py)")
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["web", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in (*PAGE_FILES, "model.onnx", "model.json"):
        assert (out / name).is_file(), f"{name} missing from the site"
    config = json.loads((out / "model.json").read_text())
    assert config["labels"] == ["circle", "square", "triangle", "cross", "star"]
    assert config["methods"] == [m.name for m in contract.METHOD_TABLE if m.web]  # the demo model has every output
    assert config["input_size"] == [64, 64] and config["preprocessing"]["crop"] == [64, 64]
    assert config["ort"]["base"] == ORT_CDN and config["ort"]["wasm_script"] == ORT_FILES["wasm"][0]
    assert config["target"] in contract.TARGETS
    assert len(config["colormap"]["table"]) == 256 * 3
    assert len(config["examples"]) == 10 and all((out / e).is_file() for e in config["examples"])
    # the SmoothGrad noise evaluate_demo.py chose for this model
    quality = json.loads(demo_assets().joinpath("quality.json").read_text())
    noise = {s["name"]: s["default"] for m in config["method_table"] for s in m["settings"]}["noise"]
    assert noise == quality["smoothgrad_noise_selection"]["noise"]
    assert not (out / "ort").exists(), "without --ort-dist the page loads onnxruntime-web from the CDN"


def test_local_ort_dist_is_copied_and_checked(tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    result = CliRunner().invoke(main, ["web", str(LINEAR_MODEL), "--out", str(tmp_path / "a"), "--ort-dist", str(dist)])
    assert result.exit_code == 1 and "not an onnxruntime-web dist folder" in result.output, result.output
    assert ORT_FILES["wasm"][2] in result.output
    for name in ORT_FILES["wasm"]:
        (dist / name).write_bytes(b"x")
    (tmp_path / "package.json").write_text('{"version": "9.9.9"}')
    result = CliRunner().invoke(main, ["web", str(LINEAR_MODEL), "--out", str(tmp_path / "b"), "--ort-dist", str(dist)])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "b" / "model.json").read_text())
    assert config["ort"] == {**config["ort"], "base": "ort/", "version": "9.9.9"}
    assert sorted(p.name for p in (tmp_path / "b" / "ort").iterdir()) == sorted(ORT_FILES["wasm"])
    assert config["examples"] == [] and config["methods"] == ["vanilla", "smoothgrad", "gradient-x-input"]


def test_not_a_gradmap_model_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["web", str(PLAIN_MODEL), "--out", str(tmp_path / "site")])
    assert result.exit_code == 1 and "not a gradmap model" in result.output, result.output
    assert not (tmp_path / "site" / "index.html").exists()


def test_server_sends_cross_origin_isolation_headers(tmp_path):
    (tmp_path / "index.html").write_text("<p>hi</p>")
    (tmp_path / "x.wasm").write_bytes(b"\0asm")
    server = make_server(tmp_path, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        with urllib.request.urlopen(base + "index.html") as response:
            assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        with urllib.request.urlopen(base + "x.wasm") as response:
            assert response.headers["Content-Type"] == "application/wasm"
    finally:
        server.shutdown()
        server.server_close()


def test_model_with_external_data_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(LINEAR_MODEL))
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    result = CliRunner().invoke(main, ["web", str(path), "--out", str(tmp_path / "site")])
    assert result.exit_code == 1 and "external data" in result.output and str(path) in result.output, result.output
