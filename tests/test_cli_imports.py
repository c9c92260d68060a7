"""What the CLI imports when it starts: the slim runtime has no torch, onnx-ir or TensorFlow, so
``gradmap --help`` and every command's help must start without them (the export options read
gradmap.export.presets, plain data, while the export code itself loads only when a command runs).
Each check runs in a fresh interpreter with those packages made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_BLOCKED = ("torch", "torchvision", "onnx", "onnx_ir", "onnxscript", "tensorflow", "keras", "tf2onnx")


@pytest.mark.parametrize("args", [["--help"], ["export", "--help"], ["run", "--help"], ["info", "--help"]],
                         ids=["main", "export", "run", "info"])
def test_help_starts_without_the_export_stack(args):
    code = textwrap.dedent(f"""
        import sys
        for name in {_BLOCKED!r}:
            sys.modules[name] = None
        from gradmap.cli import main
        main({args!r})
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr[-2000:]
