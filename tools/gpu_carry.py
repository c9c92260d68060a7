"""Bring what bench/gpu/run.sh needs onto a GPU machine that has no network: download it here into
bench/gpu/carry/ (ignored by git), which a device call then carries (bench/gpu/README.md).

    python tools/gpu_carry.py                     # wheels/ and debs/: about 23 MB, one call's carry
    python tools/gpu_carry.py --onnxruntime-gpu   # also onnxruntime-gpu in 60 MiB chunks (256 MB in all)

- wheels/ (Python 3.12, manylinux x86_64, no dependencies resolved: the machine has torch, numpy,
  pillow): onnxruntime-ep-webgpu 0.4.0 (the WebGPU plugin provider, for onnxruntime >= 1.24.4) and
  Captum with what it imports (matplotlib and its small dependencies, tqdm).
- debs/: libvulkan1, the Vulkan loader the WebGPU plugin opens (``apt-get download``, unpacked by
  run.sh without installing). NVIDIA's Vulkan driver comes with the machine's NVIDIA driver.
- onnxruntime-gpu/: the onnxruntime-gpu wheel split into chunks of at most 60 MiB and its sha256,
  for one device call per chunk (``run.sh --stash-chunk``), since one call carries at most 64 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / "bench" / "gpu" / "carry"
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--only-binary=:all:"]
WHEELS = ["onnxruntime-ep-webgpu==0.4.0", "captum==0.9.0", "matplotlib==3.11.2", "contourpy==1.3.3", "cycler==0.12.1",
          "fonttools==4.69.1", "kiwisolver==1.5.1", "pyparsing==3.3.3", "python-dateutil==2.9.0.post0", "six==1.17.0",
          "tqdm==4.67.1"]
DEBS = ["libvulkan1"]
ONNXRUNTIME_GPU = "onnxruntime-gpu==1.31.1"
CHUNK = 60 * 2**20


def pip_download(specs: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *PLATFORM, *specs],
                   check=True)


def split(wheel: Path, folder: Path) -> list[Path]:
    """``wheel`` as ``NAME.part-00``, ``-01``... of at most CHUNK bytes in ``folder``, and ``NAME.sha256``."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (folder / f"{wheel.name}.sha256").write_text(f"{digest}  {wheel.name}\n")
    parts = []
    with wheel.open("rb") as source:
        index = 0
        while chunk := source.read(CHUNK):
            parts.append(folder / f"{wheel.name}.part-{index:02d}")
            parts[-1].write_bytes(chunk)
            index += 1
    wheel.unlink()
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnxruntime-gpu", action="store_true", help=f"also {ONNXRUNTIME_GPU}, in chunks")
    args = parser.parse_args()
    pip_download(WHEELS, CARRY / "wheels")
    debs = CARRY / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get"):
        subprocess.run(["apt-get", "download", "-q", *DEBS], cwd=debs, check=True)
    else:
        print("apt-get is missing here: download libvulkan1's .deb into bench/gpu/carry/debs by hand", file=sys.stderr)
    if args.onnxruntime_gpu:
        folder = CARRY / "onnxruntime-gpu"
        shutil.rmtree(folder, ignore_errors=True)
        pip_download([ONNXRUNTIME_GPU], folder)
        (wheel,) = folder.glob("*.whl")
        parts = split(wheel, folder)
        print(f"onnxruntime-gpu: {len(parts)} chunks in {folder}")
    for path in sorted(CARRY.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size / 2**20:8.1f} MiB  {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
