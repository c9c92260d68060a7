"""The export target in a model's metadata: read by the runtime, shown by gradmap info, and a note
from gradmap run when a cpu-target model runs on another provider. Torch-free."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from gradmap import contract
from gradmap.cli import main
from gradmap.runtime import SaliencyModel

from conftest import LINEAR_MODEL


def _with_target(tmp_path, target: str | None):
    proto = onnx.load(str(LINEAR_MODEL))
    props = {p.key: p.value for p in proto.metadata_props if p.key != "gradmap.target"}
    if target is not None:
        props["gradmap.target"] = target
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    path = tmp_path / f"linear_{target}.onnx"
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("target,expected", [("portable", "portable"), ("cpu", "cpu"), (None, "cpu")])
def test_metadata_target_read_and_shown(tmp_path, target, expected):
    path = _with_target(tmp_path, target)
    assert SaliencyModel(path, provider="cpu").metadata.target == expected
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["target"] == expected
    result = CliRunner().invoke(main, ["info", str(path)])
    assert f"target: {expected}" in result.output


def test_unknown_target_is_a_contract_error(tmp_path):
    path = _with_target(tmp_path, "tpu")
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1
    assert "target 'tpu' is not one of cpu, portable" in result.output


def test_cpu_model_on_another_provider_gets_a_note(tmp_path, monkeypatch):
    cpu_model = SaliencyModel(_with_target(tmp_path, "cpu"), provider="cpu")
    portable_model = SaliencyModel(_with_target(tmp_path, "portable"), provider="cpu")
    assert cpu_model.target_notice is None and portable_model.target_notice is None  # on the CPU provider
    monkeypatch.setattr(SaliencyModel, "providers", property(lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert "--target portable" in cpu_model.target_notice and "CUDAExecutionProvider" in cpu_model.target_notice
    assert portable_model.target_notice is None
    assert contract.TARGETS == ("cpu", "portable")
