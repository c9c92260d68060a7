"""bench/gpu's pieces that run without a GPU: onnxruntime-gpu's chunks (split here, stashed and
joined there), and the printed table. The whole CPU dry run is CI's (`.ci/run`)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "bench" / "gpu" / "run.sh"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunks_join_to_the_wheel_and_its_sum(tmp_path, monkeypatch):
    carry = _load(ROOT / "tools" / "gpu_carry.py", "gpu_carry")
    monkeypatch.setattr(carry, "CHUNK", 1000)
    data = os.urandom(2500)
    wheel = tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.whl"
    wheel.write_bytes(data)
    parts = carry.split(wheel, tmp_path)
    assert [p.stat().st_size for p in parts] == [1000, 1000, 500] and not wheel.exists()
    assert b"".join(p.read_bytes() for p in parts) == data
    digest = (tmp_path / f"{wheel.name}.sha256").read_text().split()[0]
    assert digest == hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(sys.platform != "linux", reason="run.sh is a bash script for the Linux GPU machines")
def test_stash_chunk_keeps_the_carried_chunk_and_refuses_none(tmp_path):
    carry, stash = tmp_path / "carry", tmp_path / "stash"
    env = dict(os.environ, GPU_CARRY=str(carry), GPU_STASH=str(stash))
    empty = subprocess.run([str(RUN_SH), "--stash-chunk"], env=env, capture_output=True, text=True)
    assert empty.returncode == 1 and "no onnxruntime-gpu chunk carried" in empty.stderr
    (carry / "onnxruntime-gpu").mkdir(parents=True)
    (carry / "onnxruntime-gpu" / "w.whl.part-01").write_bytes(b"abc")
    (carry / "onnxruntime-gpu" / "w.whl.sha256").write_text("0  w.whl\n")
    done = subprocess.run([str(RUN_SH), "--stash-chunk"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (stash / "w.whl.part-01").read_bytes() == b"abc" and (stash / "w.whl.sha256").exists()


def test_table_shows_parity_ratios_errors_and_skips():
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    bench = _load(ROOT / "bench" / "gpu" / "gpu_bench.py", "gpu_bench")
    result = {
        "dry_run": False, "environment": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "onnxruntime": "1.31.1"},
        "parity": [{"model": "resnet50", "provider": "cuda", "logits_error": 2e-7, "gradient_error": 3e-6, "ok": True},
                   {"model": "resnet50", "provider": "webgpu", "error": "RuntimeError: no adapter", "ok": False}],
        "timings": [
            {"model": "resnet50", "method": "vanilla", "batch": 32, "engine": "torch eager (cuda)", "median_ms": 60.0},
            {"model": "resnet50", "method": "vanilla", "batch": 32, "engine": "gradmap cuda", "median_ms": 40.0},
            {"model": "resnet50", "method": "IG-32", "batch": 32, "engine": "captum (cuda)", "error": "OutOfMemoryError"}],
        "skipped": [{"what": "torch.compile (cuda)", "model": "vit_b_16", "method": "vanilla", "batch": 1,
                     "why": "time budget spent"}],
    }
    text = bench.table(result)
    assert "NVIDIA H100 80GB HBM3" in text and "DRY RUN" not in text
    assert "gradmap cuda" in text and "1.50x" in text, "torch eager's time over gradmap's"
    assert "error: RuntimeError: no adapter" in text and "error: OutOfMemoryError" in text
    assert "torch.compile (cuda) (vit_b_16 vanilla 1): time budget spent" in text
