#!/usr/bin/env bash
# The prepared GPU run (bench/gpu/README.md): sets up what travelled in bench/gpu/carry/ (wheels,
# the Vulkan loader from Debian packages, onnxruntime-gpu from its chunks), then runs
# bench/gpu/gpu_bench.py within 300 s. Writes gpu.json into $OUT (the device machine's folder that
# comes back) or bench/results/, and prints the table.
#
#   bench/gpu/run.sh                 the GPU run (CUDA torch; gradmap on CUDA and WebGPU where present)
#   bench/gpu/run.sh --dry-run       tiny sizes on the CPU (CI)
#   bench/gpu/run.sh --stash-chunk   keep the onnxruntime-gpu chunk carried in this call (see README)
# GPU_PYTHON chooses the interpreter (default python3); other options go to gpu_bench.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
carry="${GPU_CARRY:-$here/carry}"   # GPU_CARRY: another folder (tests)
PY="${GPU_PYTHON:-python3}"
stash="${GPU_STASH:-/tmp/gradmap-gpu-stash}"   # outside the tree: kept between calls on a warm machine
work="$(mktemp -d /tmp/gradmap-gpu.XXXXXX)"
site="$work/site"
mkdir -p "$site" "$stash"

if [[ "${1:-}" == "--stash-chunk" ]]; then
  found=0
  for part in "$carry"/onnxruntime-gpu/*.part-*; do
    [[ -f "$part" ]] || continue
    cp "$part" "$stash/" && found=1 && echo "stashed $(basename "$part") ($(du -m "$part" | cut -f1) MiB) in $stash"
  done
  cp "$carry"/onnxruntime-gpu/*.sha256 "$stash/" 2>/dev/null || true
  [[ $found == 1 ]] || { echo "no onnxruntime-gpu chunk carried in $carry/onnxruntime-gpu" >&2; exit 1; }
  ls -l "$stash"
  exit 0
fi

# 1. wheels (onnxruntime-ep-webgpu, captum and what captum imports): unpacked, not installed
shopt -s nullglob
wheels=("$carry"/wheels/*.whl)
if (( ${#wheels[@]} )); then
  "$PY" -m pip install -q --no-deps --no-index --target "$site" "${wheels[@]}"
  echo "wheels: ${#wheels[@]} from $carry/wheels"
fi
# 2. the Vulkan loader (libvulkan.so.1) from Debian packages, unpacked without dpkg's database
for deb in "$carry"/debs/*.deb; do
  (cd "$work" && ar x "$deb" && tar -xf data.tar.* -C "$site" && rm -f data.tar.* control.tar.* debian-binary)
done
for dir in "$site"/usr/lib/x86_64-linux-gnu "$site"/usr/lib; do
  [[ -d "$dir" ]] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
# 3. NVIDIA's Vulkan driver: the driver's own ICD file, or one written for libGLX_nvidia.so.0 when
#    the container has the library but no ICD file (graphics capabilities without the json)
if [[ -z "${VK_ICD_FILENAMES:-}" ]] && ! ls /usr/share/vulkan/icd.d/*nvidia* /etc/vulkan/icd.d/*nvidia* >/dev/null 2>&1; then
  nvidia_glx="$(ldconfig -p 2>/dev/null | awk '/libGLX_nvidia.so.0/ {print $NF; exit}')"
  if [[ -n "$nvidia_glx" ]]; then
    printf '{"file_format_version": "1.0.1", "ICD": {"library_path": "%s", "api_version": "1.3.0"}}\n' \
      "$nvidia_glx" > "$work/nvidia_icd.json"
    export VK_ICD_FILENAMES="$work/nvidia_icd.json"
    echo "Vulkan: wrote an ICD file for $nvidia_glx"
  else
    echo "Vulkan: no NVIDIA ICD file and no libGLX_nvidia.so.0: WebGPU will find no NVIDIA GPU"
  fi
fi
# 4. onnxruntime-gpu, joined from the chunks stashed by earlier calls (and any carried in this one)
pythonpath="$site"
cp "$carry"/onnxruntime-gpu/*.part-* "$carry"/onnxruntime-gpu/*.sha256 "$stash/" 2>/dev/null || true
sums=("$stash"/*.sha256)
if (( ${#sums[@]} )); then
  wheel_name="$(basename "${sums[0]}" .sha256)"
  cat "$stash/$wheel_name".part-* > "$work/$wheel_name"
  if (cd "$work" && sha256sum -c --status "${sums[0]}"); then
    "$PY" -m pip install -q --no-deps --no-index --target "$work/ort-gpu" "$work/$wheel_name"
    pythonpath="$work/ort-gpu:$pythonpath"
    echo "onnxruntime-gpu: $wheel_name joined from $(ls "$stash/$wheel_name".part-* | wc -l) chunks"
  else
    echo "onnxruntime-gpu: the stashed chunks of $wheel_name are incomplete or damaged (sha256 differs): skipped"
  fi
else
  echo "onnxruntime-gpu: not brought in (tools/gpu_carry.py --onnxruntime-gpu and --stash-chunk calls): skipped"
fi

out="${OUT:-$root/bench/results}/gpu.json"
cd "$root"
set +e
PYTHONPATH="$pythonpath:$root${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$PY" bench/gpu/gpu_bench.py --out "$out" "$@"
status=$?
set -e
rm -rf "$work"
[[ $status == 124 ]] && echo "gpu_bench.py ran past 300 s and was stopped" >&2
exit $status
