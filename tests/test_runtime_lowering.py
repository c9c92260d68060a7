"""The runtime's side of lowering a portable model at load (gradmap/runtime/_lowering.py) that needs
neither torch nor onnx-ir: the CPU's block and its overrides, and the slim runtime (no onnx-ir)
running a portable model as written. The lowering itself: tests/test_lowering_at_load.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradmap.runtime import _lowering


def test_block_detection_and_overrides(monkeypatch):
    monkeypatch.setattr(_lowering.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(_lowering, "_cpu_features", lambda: {"SSE2", "AVX", "AVX2", "AVX512F"})
    assert _lowering.detected_block() == (16, "AVX-512")
    monkeypatch.setattr(_lowering, "_cpu_features", lambda: {"SSE2", "AVX", "AVX2"})
    assert _lowering.detected_block() == (8, "AVX2")
    monkeypatch.setattr(_lowering.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(_lowering, "_cpu_features", lambda: {"NEON", "ASIMD"})
    assert _lowering.detected_block()[0] == 0
    monkeypatch.delenv(_lowering.CPU_BLOCK_ENV, raising=False)
    assert _lowering.cpu_block()[0] == 0
    monkeypatch.setenv(_lowering.CPU_BLOCK_ENV, "8")
    assert _lowering.cpu_block() == (8, "$GRADMAP_CPU_BLOCK=8")
    assert _lowering.cpu_block(16) == (16, "cpu_block=16")
    monkeypatch.setenv(_lowering.CPU_BLOCK_ENV, "off")
    assert _lowering.cpu_block()[0] is None
    for bad in ("-8", "sixteen"):
        monkeypatch.setenv(_lowering.CPU_BLOCK_ENV, bad)
        with pytest.raises(_lowering.CpuBlockError, match=rf"GRADMAP_CPU_BLOCK='{bad}': expected 'off' or a channel"):
            _lowering.cpu_block()


def test_without_onnx_ir_the_portable_graph_runs_as_written(tmp_path):
    """The slim runtime (no onnx-ir): a portable model loads, runs as written, and the log says why."""
    fixture = Path(__file__).resolve().parent / "fixtures" / "linear_gradmap.onnx"
    import onnx

    proto = onnx.load(str(fixture))
    for prop in proto.metadata_props:
        if prop.key == "gradmap.target":
            prop.value = "portable"
    if not any(p.key == "gradmap.target" for p in proto.metadata_props):
        proto.metadata_props.add(key="gradmap.target", value="portable")
    path = tmp_path / "linear_portable.onnx"
    onnx.save(proto, str(path))
    code = textwrap.dedent(f"""
        import logging, sys
        sys.modules["onnx_ir"] = None
        logging.basicConfig(level=logging.WARNING)
        import numpy as np
        from gradmap.runtime import SaliencyModel
        m = SaliencyModel({str(path)!r}, provider="cpu", cache_dir=False)
        assert m.lowering.state == "unavailable", m.lowering
        out = m.run(np.zeros((1, 3, *m.input_size), np.float32))
        print("ok", out.gradient.shape)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    assert "pip install 'gradmap[onnx]'" in result.stderr
