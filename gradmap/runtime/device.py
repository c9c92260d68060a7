"""SmoothGrad and integrated gradients with their images kept on the device (onnxruntime I/O binding).

On the CPU the runtime builds SmoothGrad's noisy copies and IG's path images in numpy and runs the
model on them in chunks. On a GPU that would copy ``samples`` (or ``steps``) images per picture to
the device and as many gradients back: 25 x 32 x 3 x 224 x 224 float32 is 480 MB each way for one
SmoothGrad-25 batch of 32. Here the picture goes up once, three small onnxruntime graphs on the same
provider do the rest, and only one [N, 3, H, W] sum per chunk comes back:

    noisy:      image [m,3,H,W], sigma [m] -> image + sigma * RandomNormal([m,k,3,H,W])  as [m*k,3,H,W]
    path:       baseline [m,3,H,W], delta [m,3,H,W], alpha [k] -> baseline + alpha * delta  as [m*k,3,H,W]
    accumulate: gradient [m*k,3,H,W], weight [k] -> sum_k w_k g, sum_k w_k g^2  as [m,3,H,W] each

(``ModelMetadata``'s gradient graph runs between them, its input and output bound to device memory.)
The noise is drawn on the device by onnxruntime's ``RandomNormal``, seeded with the method's seed
(its kernel's generator moves on with every run; the graphs are made again for each call, so a seed
gives the same maps call after call on one provider): maps equal the host's in expectation, not
draw for draw. The sums are float32 on the
device, float64 across chunks.

:func:`chunk_images` says how many images one run takes so that the gradient graph fills the device
(:func:`per_image_bytes` measures what an image costs; :func:`gpu_memory` reads free memory with
``nvidia-smi``). The same code runs with ``device="cpu"`` (the CPU provider's I/O binding), which is
how its logic is tested on machines without a GPU.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from typing import Callable

import numpy as np
import onnxruntime as ort

from gradmap.contract import INPUT_IMAGE, INPUT_TARGET, OUTPUT_GRADIENT, OUTPUT_LOGITS, OUTPUT_TARGET_INDEX

__all__ = ["DeviceGradients", "chunk_images", "device_gradients", "gpu_memory", "parse_nvidia_smi", "per_image_bytes"]

logger = logging.getLogger(__name__)

#: The share of free device memory a chunk may take: the rest is for onnxruntime's arena growth
#: steps, cuDNN workspaces and other processes.
FILL = 0.8


def chunk_images(free_bytes: int, image_bytes: int, *, fixed_bytes: int = 0, fill: float = FILL,
                 limit: int = 1024, fixed_batch: int | None = None) -> int:
    """How many images one run of the gradient graph takes on a device with ``free_bytes`` free.

    Args:
        image_bytes: device memory one more image costs in a run (:func:`per_image_bytes`).
        fixed_bytes: memory a run needs whatever its size (weights, workspaces) not yet allocated.
        fill: the share of free memory to use.
        limit: the most images per run (beyond a few hundred a GPU is busy anyway).
        fixed_batch: the graph's fixed batch size, if it has one: chunks are that size.

    Raises:
        ValueError: not even one image fits, naming the sizes.
    """
    if image_bytes <= 0:
        raise ValueError(f"the memory per image must be positive, got {image_bytes}")
    budget = free_bytes * fill - fixed_bytes
    fits = int(budget // image_bytes) if budget > 0 else 0
    if fits < 1 or (fixed_batch is not None and fits < fixed_batch):
        need = image_bytes * (fixed_batch or 1) + fixed_bytes
        raise ValueError(f"the device has {free_bytes / 2**20:.0f} MiB free; a run of {fixed_batch or 1} image(s) "
                         f"needs about {need / 2**20:.0f} MiB ({fill:.0%} of free memory is used)")
    if fixed_batch is not None:
        return fixed_batch
    return max(1, min(fits, limit))


def per_image_bytes(used: Callable[[], int], run: Callable[[int], None], *, small: int = 1, large: int = 8) -> int:
    """Device memory one image costs in a run: ``used()`` (bytes in use) after a run of ``small``
    images and after one of ``large``, divided by the difference (onnxruntime's arena keeps what a
    run allocated, so the growth between the two is the larger batch's extra need)."""
    if large <= small:
        raise ValueError("the large probe must be larger than the small one")
    run(small)
    before = used()
    run(large)
    after = used()
    return max(1, (after - before) // (large - small))


def parse_nvidia_smi(text: str) -> list[tuple[int, int]]:
    """``nvidia-smi --query-gpu=memory.free,memory.total --format=csv,noheader,nounits`` output to
    (free, total) bytes per GPU."""
    rows = []
    for line in text.strip().splitlines():
        try:
            free, total = (int(v.strip()) for v in line.split(","))
        except ValueError as e:
            raise ValueError(f"cannot read nvidia-smi's memory line {line!r}") from e
        rows.append((free * 2**20, total * 2**20))
    return rows


def gpu_memory(device_id: int = 0) -> tuple[int, int]:
    """(free, total) bytes of GPU ``device_id``, from ``nvidia-smi``; ValueError when there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise ValueError("nvidia-smi is not on PATH: cannot read the GPU's free memory")
    out = subprocess.run([exe, "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    rows = parse_nvidia_smi(out)
    if device_id >= len(rows):
        raise ValueError(f"no GPU {device_id}: nvidia-smi lists {len(rows)}")
    return rows[device_id]


def _graph(nodes, inputs, outputs, initializers=()):
    from onnx import TensorProto, helper

    model = helper.make_model(helper.make_graph(nodes, "gradmap_device", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString(), TensorProto, helper


class DeviceGradients:
    """SmoothGrad and IG sums of a loaded :class:`~gradmap.runtime.model.SaliencyModel` with every
    image on ``device`` (``cuda`` or ``cpu``), ``chunk`` images per gradient run.

    Needs the ``onnx`` package (to write the small graphs).
    """

    def __init__(self, model, *, device: str = "cuda", device_id: int = 0, chunk: int = 64,
                 output: str = OUTPUT_GRADIENT) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if model.fixed_batch is not None:
            raise ValueError(f"{model.path} has a fixed batch of {model.fixed_batch}: device-side sampling needs a "
                             "free batch dimension")
        self.model, self.device, self.device_id, self.chunk, self.output = model, device, device_id, chunk, output
        self.height, self.width = model.input_size
        self._sessions: dict[tuple, ort.InferenceSession] = {}

    # ---------------------------------------------------------------- helper graphs
    def _session(self, key: tuple, build: Callable[[], bytes]) -> ort.InferenceSession:
        session = self._sessions.get(key)
        if session is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = self.model.plan.session(build(), options) if self.device == "cuda" else \
                ort.InferenceSession(build(), options, providers=["CPUExecutionProvider"])
            self._sessions[key] = session
        return session

    def _noisy(self, m: int, k: int, seed: float) -> ort.InferenceSession:
        h, w = self.height, self.width

        def build() -> bytes:
            from onnx import TensorProto, helper

            nodes = [
                helper.make_node("RandomNormal", [], ["z"], shape=[m, k, 3, h, w], seed=seed),
                helper.make_node("Unsqueeze", ["image", "axis1"], ["x"]),
                helper.make_node("Reshape", ["sigma", "sigma_shape"], ["s"]),
                helper.make_node("Mul", ["z", "s"], ["n"]),
                helper.make_node("Add", ["x", "n"], ["y"]),
                helper.make_node("Reshape", ["y", "out_shape"], ["noisy"]),
            ]
            inits = [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("sigma_shape", TensorProto.INT64, [5], [m, 1, 1, 1, 1]),
                     helper.make_tensor("out_shape", TensorProto.INT64, [4], [m * k, 3, h, w])]
            return _graph(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [m, 3, h, w]),
                                  helper.make_tensor_value_info("sigma", TensorProto.FLOAT, [m])],
                          [helper.make_tensor_value_info("noisy", TensorProto.FLOAT, [m * k, 3, h, w])], inits)[0]

        return self._session(("noisy", m, k, seed), build)

    def _path(self, m: int, k: int) -> ort.InferenceSession:
        h, w = self.height, self.width

        def build() -> bytes:
            from onnx import TensorProto, helper

            nodes = [
                helper.make_node("Reshape", ["alpha", "alpha_shape"], ["a"]),
                helper.make_node("Unsqueeze", ["delta", "axis1"], ["d"]),
                helper.make_node("Unsqueeze", ["baseline", "axis1"], ["b"]),
                helper.make_node("Mul", ["a", "d"], ["ad"]),
                helper.make_node("Add", ["b", "ad"], ["y"]),
                helper.make_node("Reshape", ["y", "out_shape"], ["path"]),
            ]
            inits = [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("alpha_shape", TensorProto.INT64, [5], [1, k, 1, 1, 1]),
                     helper.make_tensor("out_shape", TensorProto.INT64, [4], [m * k, 3, h, w])]
            return _graph(nodes, [helper.make_tensor_value_info("baseline", TensorProto.FLOAT, [m, 3, h, w]),
                                  helper.make_tensor_value_info("delta", TensorProto.FLOAT, [m, 3, h, w]),
                                  helper.make_tensor_value_info("alpha", TensorProto.FLOAT, [k])],
                          [helper.make_tensor_value_info("path", TensorProto.FLOAT, [m * k, 3, h, w])], inits)[0]

        return self._session(("path", m, k), build)

    def _accumulate(self, m: int, k: int) -> ort.InferenceSession:
        h, w = self.height, self.width

        def build() -> bytes:
            from onnx import TensorProto, helper

            nodes = [
                helper.make_node("Reshape", ["gradient", "grad_shape"], ["g"]),
                helper.make_node("Reshape", ["weight", "weight_shape"], ["wk"]),
                helper.make_node("Mul", ["g", "wk"], ["wg"]),
                helper.make_node("ReduceSum", ["wg", "axis1"], ["sum"], keepdims=0),
                helper.make_node("Mul", ["wg", "g"], ["wg2"]),
                helper.make_node("ReduceSum", ["wg2", "axis1"], ["sum_squares"], keepdims=0),
            ]
            inits = [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("grad_shape", TensorProto.INT64, [5], [m, k, 3, h, w]),
                     helper.make_tensor("weight_shape", TensorProto.INT64, [5], [1, k, 1, 1, 1])]
            return _graph(nodes, [helper.make_tensor_value_info("gradient", TensorProto.FLOAT, [m * k, 3, h, w]),
                                  helper.make_tensor_value_info("weight", TensorProto.FLOAT, [k])],
                          [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [m, 3, h, w]),
                           helper.make_tensor_value_info("sum_squares", TensorProto.FLOAT, [m, 3, h, w])], inits)[0]

        return self._session(("accumulate", m, k), build)

    # ---------------------------------------------------------------- device runs
    def _put(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _run(self, session: ort.InferenceSession, inputs: dict, outputs: list[str], host: tuple[str, ...] = ()):
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:
            binding.bind_output(name, "cpu" if name in host else self.device, 0 if name in host else self.device_id)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _gradient_sums(self, images_on_device: ort.OrtValue, m: int, k: int, targets: np.ndarray,
                       weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the model on [m*k] device images for ``targets`` (each repeated k times) and return the
        weighted sums of the gradients and of their squares, [m, 3, H, W] each, on the host."""
        (gradient,) = self._run(self.model.session, {INPUT_IMAGE: images_on_device,
                                                     INPUT_TARGET: np.repeat(targets.astype(np.int64), k)},
                                [self.output])
        total, squares = self._run(self._accumulate(m, k), {"gradient": gradient,
                                                            "weight": weights.astype(np.float32)},
                                   ["sum", "sum_squares"], host=("sum", "sum_squares"))
        return total.numpy().astype(np.float64), squares.numpy().astype(np.float64)

    def _plan(self, n: int, per_image: int) -> list[tuple[int, int, int, int]]:
        """(first image, images, first sample, samples) of each run: whole images' samples together
        when they fit a chunk, a picture's samples split across runs when they do not."""
        k = min(per_image, self.chunk)
        m = max(1, self.chunk // k)
        runs = []
        for start in range(0, n, m):
            count = min(m, n - start)
            for first in range(0, per_image, k):
                runs.append((start, count, first, min(k, per_image - first)))
        return runs

    def smoothgrad_sums(self, images: np.ndarray, target_index: np.ndarray, sigma: np.ndarray, samples: int,
                        seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
        """Sum over ``samples`` noisy copies (noise ``sigma`` per image, drawn on the device) of the
        gradient and of its square: float64 [N, 3, H, W] each."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        n = len(images)
        total = np.zeros(images.shape, np.float64)
        squares = np.zeros(images.shape, np.float64)
        # one noise graph per run shape, made for this call: its RandomNormal kernel starts from the
        # seed and moves on with every run, so a call draws fresh noise per run and the same seed
        # gives the same maps call after call
        seed_value = float((0 if seed is None else seed) + 1)  # the CPU kernel's engine takes seeds 0 and 1 alike
        for key in [key for key in self._sessions if key[0] == "noisy"]:
            del self._sessions[key]
        for start, m, _, k in self._plan(n, samples):
            (noisy,) = self._run(self._noisy(m, k, seed_value), {"image": self._put(images[start:start + m]),
                                                                 "sigma": sigma[start:start + m].astype(np.float32)},
                                 ["noisy"])
            s, q = self._gradient_sums(noisy, m, k, target_index[start:start + m], np.ones(k, np.float32))
            total[start:start + m] += s
            squares[start:start + m] += q
        return total, squares

    def path_sums(self, images: np.ndarray, baselines: np.ndarray, target_index: np.ndarray, alphas: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
        """sum_i w_i grad(baseline + alpha_i (image - baseline)), float64 [N, 3, H, W], the path
        images made on the device."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        delta = (images - baselines).astype(np.float32)
        total = np.zeros(images.shape, np.float64)
        for start, m, first, k in self._plan(len(images), len(alphas)):
            (path,) = self._run(self._path(m, k), {"baseline": self._put(baselines[start:start + m].astype(np.float32)),
                                                   "delta": self._put(delta[start:start + m]),
                                                   "alpha": alphas[first:first + k].astype(np.float32)}, ["path"])
            s, _ = self._gradient_sums(path, m, k, target_index[start:start + m], weights[first:first + k])
            total[start:start + m] += s
        return total

    def logits_and_targets(self, images: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and resolved targets of the clean images (one plain run per chunk)."""
        parts = [self.model.run_outputs(images[s:s + self.chunk], targets[s:s + self.chunk],
                                        (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX)) for s in range(0, len(images), self.chunk)]
        return (np.concatenate([p[OUTPUT_LOGITS] for p in parts]),
                np.concatenate([p[OUTPUT_TARGET_INDEX] for p in parts]))


def device_gradients(model, device: str, output: str = OUTPUT_GRADIENT, batch_size: int = 16) -> DeviceGradients:
    """The model's :class:`DeviceGradients` for ``output``, made once per model and output. On
    ``cuda`` its chunk fills the GPU (:func:`chunk_images` with :func:`per_image_bytes` measured by two
    probe runs); on ``cpu`` it is ``batch_size``."""
    cache = model.__dict__.setdefault("_device_gradients", {})
    if (device, output) not in cache:
        chunk = batch_size
        if device == "cuda":
            chunk = cuda_chunk(model)
            logger.info("%s: %d images per run on the GPU", model.path, chunk)
        cache[(device, output)] = DeviceGradients(model, device=device, chunk=chunk, output=output)
    return cache[(device, output)]


def cuda_chunk(model, device_id: int = 0) -> int:
    """Images per gradient run that fill GPU ``device_id`` for ``model`` (see :func:`chunk_images`)."""
    h, w = model.input_size

    def run(n: int) -> None:
        model.run(np.zeros((n, 3, h, w), np.float32))

    def used() -> int:
        free, total = gpu_memory(device_id)
        return total - free

    image = per_image_bytes(used, run)
    free, _ = gpu_memory(device_id)
    return chunk_images(free, image)
