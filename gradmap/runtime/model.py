"""Loading an exported gradmap model into onnxruntime and running it.

A gradmap model is an ONNX file following :mod:`gradmap.contract`. :class:`SaliencyModel` checks
that contract when it loads (metadata and graph interface) so that a wrong file fails at once with a
:class:`~gradmap.runtime.errors.GradmapModelError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from gradmap.contract import (
    GRADIENT_OUTPUTS,
    INPUT_IMAGE,
    NO_GRADIENT_OPTION,
    INPUT_TARGET,
    OUTPUT_GRADIENT,
    OUTPUT_LOGITS,
    OUTPUT_TARGET_INDEX,
    ContractError,
    ModelMetadata,
    props_have_gradient,
)
from gradmap.runtime._onnx_header import OnnxHeader, ProtobufError, read_external_data, read_onnx_header
from gradmap.runtime._lowering import Lowered, lowered_model, trim_heap
from gradmap.runtime._onnx_prune import prune_to_outputs
from gradmap.runtime._session_cache import cache_root, cached_session
from gradmap.runtime.errors import GradmapModelError
from gradmap.runtime.providers import CPU, CUDA, PROVIDER_ALIASES, ProviderPlan, plan_providers
from gradmap.runtime.postprocess import softmax

__all__ = ["ModelOutputs", "SaliencyModel", "TensorInfo", "check_external_data", "resolve_providers", "PROVIDER_ALIASES",
           "before_run"]

#: ``fn()``, called in this context before each onnxruntime run of :meth:`SaliencyModel.run_outputs`
#: and :meth:`SaliencyModel.logits`; what it raises stops the work between two runs (``gradmap serve``
#: stops a batch once every request in it has been given up). None (default): nothing is called.
before_run: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("gradmap_before_run",
                                                                                        default=None)


def _before_run() -> None:
    check = before_run.get()
    if check is not None:
        check()

logger = logging.getLogger(__name__)

# (name, onnxruntime type, rank) of every tensor the contract requires (a forward-only model: no gradient).
_INPUTS = ((INPUT_IMAGE, "tensor(float)", 4), (INPUT_TARGET, "tensor(int64)", 1))
_FORWARD_OUTPUTS = (
    (OUTPUT_LOGITS, "tensor(float)", 2),
    (OUTPUT_TARGET_INDEX, "tensor(int64)", 1),
)
_OUTPUTS = (*_FORWARD_OUTPUTS, (OUTPUT_GRADIENT, "tensor(float)", 4))


@dataclass(frozen=True)
class TensorInfo:
    """Name, onnxruntime type (e.g. ``tensor(float)``) and shape (ints, or names of free dims)."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class ModelOutputs:
    """One run of the model on a batch: ``logits`` [N,K], ``target_index`` [N], ``gradient`` [N,3,H,W]."""

    logits: np.ndarray
    target_index: np.ndarray
    gradient: np.ndarray


def resolve_providers(provider: str | Sequence[str] = "auto") -> list[str]:
    """Turn a provider choice into onnxruntime's provider names, in priority order.

    Args:
        provider: ``"auto"`` (CUDA when onnxruntime has it, then WebGPU when its plugin finds a GPU,
            then CPU), ``"cpu"``, ``"cuda"``, ``"webgpu"``, a comma-separated list, or a list of
            onnxruntime provider names (``"CPUExecutionProvider"``) or aliases; see
            :mod:`gradmap.runtime.providers`.

    Raises:
        ValueError: a requested provider is not available, saying what to install.
    """
    return list(plan_providers(provider).names)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime session options for a gradmap model: ``threads`` intra-op threads (None or 0:
    onnxruntime decides), warnings off (they bypass logging), and no memory pattern.

    onnxruntime's memory pattern plans one block for all of a run's tensors from the first run of
    each input shape and allocates it on the second, while the arena still holds the first run's
    tensors. A gradient graph keeps every activation the backward reads alive, so that block is
    large (``bench/first_runs.py``, batch 8): peak RSS of resnet50 is 1103 MB with the pattern and
    748 MB without, of densenet121 2011 and 1118 MB, and the second run pays about 86,000 (resnet50)
    and 228,000 (densenet121) page faults again, for every new batch size, such as a folder's last,
    partial batch. Later runs take about the same time: interleaved medians equal for resnet50 at
    batch 1 and 8, up to 4 % slower without the pattern for densenet121 and mobilenet_v3_large,
    inside this machine's run-to-run spread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)
    options.log_severity_level = 3
    options.enable_mem_pattern = False
    return options


def _check_interface(session: ort.InferenceSession, metadata: ModelMetadata) -> list[str]:
    """Return what is wrong with the session's inputs/outputs with respect to the contract."""
    problems = []
    inputs = {t.name: t for t in session.get_inputs()}
    outputs = {t.name: t for t in session.get_outputs()}
    for kind, have, wanted in (("input", inputs, _INPUTS),
                               ("output", outputs, _OUTPUTS if metadata.gradient else _FORWARD_OUTPUTS)):
        for name, type_, rank in wanted:
            tensor = have.get(name)
            if tensor is None:
                problems.append(f"no {kind} named {name!r} (has {', '.join(sorted(have)) or 'none'})")
            elif tensor.type != type_:
                problems.append(f"{kind} {name!r} is {tensor.type}, expected {type_}")
            elif len(tensor.shape) != rank:
                problems.append(f"{kind} {name!r} has rank {len(tensor.shape)}, expected {rank}")
    extra_inputs = sorted(set(inputs) - {name for name, _, _ in _INPUTS})
    if extra_inputs:
        problems.append(f"unexpected inputs {', '.join(extra_inputs)}")
    if problems:
        return problems
    image_shape = inputs[INPUT_IMAGE].shape
    expected = (3, *metadata.preprocessing.crop)
    for axis, size in zip((1, 2, 3), expected):
        if isinstance(image_shape[axis], int) and image_shape[axis] != size:
            problems.append(f"input 'image' has shape {list(image_shape)}, metadata crop implies [N, {', '.join(map(str, expected))}]")
            break
    classes = outputs[OUTPUT_LOGITS].shape[1]
    if isinstance(classes, int) and classes != metadata.num_classes:
        problems.append(f"output 'logits' has {classes} classes but the metadata lists {metadata.num_classes} labels")
    return problems


def check_external_data(path: str) -> list[str]:
    """Refuse a model whose tensors point to external data outside the model's folder.

    ONNX stores large tensors in side files named by a ``location`` relative to the model. An
    untrusted model could name ``/etc/passwd``, ``../../secret`` or a symlink leading out of its folder,
    and onnxruntime would read that file into a weight (whose values then show through the logits and
    gradients). So every location must be relative, free of ``..``, resolve (symlinks followed) inside
    the model's folder and be a regular file -- checked here, before onnxruntime opens the model.

    Returns the external data files (resolved paths, each once).

    Raises:
        GradmapModelError: naming the tensor, its location and what is wrong.
    """
    try:
        tensors = read_external_data(path)
    except ProtobufError as e:
        raise GradmapModelError(path, f"not an ONNX model (unparseable: {e})") from e
    folder = os.path.dirname(os.path.abspath(path))
    real_folder = os.path.realpath(folder)
    files: list[str] = []
    for tensor in tensors:
        location = tensor.location
        what = f"external data of tensor {tensor.name!r}"
        if not location or "\0" in location:
            raise GradmapModelError(path, f"refusing {what}: location {location!r} is empty or holds a NUL byte")
        # Windows forms too (C:..., \\server\share): refused on every platform, a model travels.
        if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
            raise GradmapModelError(path, f"refusing {what}: location {location!r} is an absolute path; "
                                          "it must name a file inside the model's folder")
        if ".." in re.split(r"[\\/]", location):
            raise GradmapModelError(path, f"refusing {what}: location {location!r} contains '..'; "
                                          "it must name a file inside the model's folder")
        target = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([real_folder, target]) != real_folder:
            raise GradmapModelError(path, f"refusing {what}: location {location!r} resolves to {target}, outside "
                                          f"the model's folder {real_folder} (a symlink)")
        if not os.path.isfile(target):
            raise GradmapModelError(path, f"{what}: file {location!r} is missing from the model's folder"
                                    if not os.path.exists(target) else
                                    f"refusing {what}: {location!r} is not a regular file")
        if target not in files:
            files.append(target)
    return files


def _load_failure(message: str, header: OnnxHeader) -> str:
    """onnxruntime's load error, reworded when the model is simply too new for it."""
    version = getattr(ort, "__version__", "?")
    opset = re.search(r"Current official support for domain (\S+) is till opset (\d+)", message)
    if opset:
        domain, supported = opset.group(1), int(opset.group(2))
        have = header.opsets.get(domain) or header.opsets.get("ai.onnx")
        return (f"opset {have} of domain {domain} is newer than this onnxruntime ({version}) supports "
                f"(up to opset {supported}); upgrade onnxruntime or export with --opset {supported} or lower")
    ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", message)
    if ir:
        return (f"ONNX IR version {ir.group(1)} is newer than this onnxruntime ({version}) supports "
                f"(up to IR version {ir.group(2)}); upgrade onnxruntime")
    return f"onnxruntime cannot load it: {message}"


class SaliencyModel:
    """An exported gradmap model, loaded into onnxruntime and checked against the contract.

    Args:
        path: the ``.onnx`` file written by ``gradmap export``.
        provider: see :func:`resolve_providers`.
        threads: onnxruntime intra-op threads; ``None`` or 0 lets onnxruntime choose.
        cache_dir: where onnxruntime's optimized graph of the model is kept for later sessions
            (:mod:`gradmap.runtime._session_cache`): ``None`` for ``$GRADMAP_CACHE_DIR`` or the
            user's cache folder, a folder, or False for no cache.
        cpu_block: for a portable model on the CPU provider, the channel block it is lowered for
            (:mod:`gradmap.runtime._lowering`): ``None`` for ``$GRADMAP_CPU_BLOCK`` or the block of
            this CPU (16 with AVX-512, 8 with AVX2), a number (0: no channel padding), or ``off`` to
            run the file as written.

    Raises:
        GradmapModelError: the file is missing, not ONNX, too new for the installed onnxruntime, points
            to external data outside its folder (see :func:`check_external_data`), has no gradmap
            metadata, or its inputs and outputs are not the contract's.
        ValueError: the provider is not available.

    Example:
        >>> model = SaliencyModel("resnet50.gradmap.onnx", provider="cpu")
        >>> out = model.run(batch)            # batch: float32 [N, 3, 224, 224], normalized
        >>> out.gradient.shape
        (N, 3, 224, 224)
    """

    def __init__(self, path: str | os.PathLike[str], *, provider: str | Sequence[str] = "auto",
                 threads: int | None = None, cache_dir: str | os.PathLike[str] | bool | None = None,
                 cpu_block: int | str | None = None) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise GradmapModelError(self.path, "no such file")
        if not os.path.isfile(self.path):
            raise GradmapModelError(self.path, "not a file")
        if threads is not None and threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.header: OnnxHeader = self._read_header()
        data_files = check_external_data(self.path)
        self._data_files = data_files
        #: The providers chosen for ``provider`` and why (:func:`gradmap.runtime.providers.plan_providers`).
        self.plan: ProviderPlan = plan_providers(provider)
        names = list(self.plan.names)
        #: The lowering of a portable model for the CPU provider (None: the file runs as written).
        self.lowering: Lowered | None = None
        session_path, session_data = self.path, data_files
        # a forward-only model has no gradient graph to lower: onnxruntime's own forward optimizations do the rest
        if not self.plan.plugin_devices and names == [CPU] and self.header.metadata.get("gradmap.target") == "portable" \
                and props_have_gradient(self.header.metadata):
            self.lowering = lowered_model(self.path, data_files, cpu_block, cache_root(cache_dir))
            if self.lowering.message:
                logger.warning("%s: %s", self.path, self.lowering.message)
            if self.lowering.path is not None:
                session_path, session_data = self.lowering.path, list(self.lowering.data_files)
        try:
            if self.plan.plugin_devices:  # a plugin provider (WebGPU): no session cache, CPU sessions only
                self.session, self.cache_state = self.plan.session(self.path, session_options(threads)), "off"
            else:
                #: What the session cache did: read, written, unwritable or off.
                self.session, self.cache_state = cached_session(session_path, session_options(threads), names,
                                                                cache_dir, data_files=session_data)
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise GradmapModelError(self.path, _load_failure(str(e), self.header)) from e
        finally:
            if self.lowering is not None and self.lowering.state == "memory" and self.lowering.path is not None:
                shutil.rmtree(os.path.dirname(self.lowering.path), ignore_errors=True)
        trim_heap()  # what creating the session freed, before the first run's activations
        first = self.plan.first
        if first != CPU and first not in self.session.get_providers():
            if not (isinstance(provider, str) and provider.strip().lower() == "auto"):
                raise ValueError(f"{first} was requested but onnxruntime could not use its device "
                                 f"(the session has {', '.join(self.session.get_providers())})")
            logger.info("%s present but unusable; running on CPU", first)
        #: Where SmoothGrad's noisy and IG's path images are made and kept (gradmap.runtime.device):
        #: "cuda" on the CUDA provider, None (host memory, plain runs) otherwise.
        self.io_device: str | None = "cuda" if self.session.get_providers()[0] == CUDA else None
        try:
            self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)
        except ContractError as e:
            raise GradmapModelError(self.path, f"not a gradmap model: {e}") from e
        problems = _check_interface(self.session, self.metadata)
        if problems:
            raise GradmapModelError(self.path, "wrong interface for a gradmap model: " + "; ".join(problems))
        image_batch = next(t for t in self.session.get_inputs() if t.name == INPUT_IMAGE).shape[0]
        #: A fixed batch size baked into the graph, or None when the batch dimension is free.
        self.fixed_batch: int | None = image_batch if isinstance(image_batch, int) and image_batch > 0 else None
        self._forward_parts: dict[tuple[str, ...], ort.InferenceSession] = {}  # forward parts, cut out on first use
        logger.debug("loaded %s with providers %s", self.path, self.session.get_providers())

    def _read_header(self) -> OnnxHeader:
        if os.path.getsize(self.path) == 0:
            raise GradmapModelError(self.path, "not an ONNX model (empty file)")
        try:
            header = read_onnx_header(self.path)
        except ProtobufError as e:
            raise GradmapModelError(self.path, f"not an ONNX model (unparseable: {e})") from e
        except OSError as e:
            raise GradmapModelError(self.path, f"cannot read it: {e.strerror or e}") from e
        if header.ir_version is None or not header.has_graph:
            raise GradmapModelError(self.path, "not an ONNX model (no IR version or no graph)")
        return header

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.labels

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return self.metadata.preprocessing.crop

    @property
    def providers(self) -> list[str]:
        """The providers onnxruntime actually uses, in priority order."""
        return list(self.session.get_providers())

    @property
    def target_notice(self) -> str | None:
        """Why this model may be a poor fit for the provider running it, or None.

        A ``cpu``-target export is lowered for onnxruntime's CPU provider (blocked channel layout,
        fused masks, MaxPool indices); it is exact there, but another provider may run it slowly or,
        for engines that disagree on those forms, wrongly. ``gradmap export --target portable``
        writes the graph every engine agrees on.
        """
        running = self.providers[0] if self.providers else "?"
        if self.metadata.target == "cpu" and running != "CPUExecutionProvider":
            return (f"{os.path.basename(self.path)} was exported for onnxruntime's CPU provider (--target cpu) and runs on "
                    f"{running}; export with --target portable for other providers and engines")
        return None

    @property
    def opsets(self) -> dict[str, int]:
        return dict(self.header.opsets)

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo(t.name, t.type, tuple(t.shape)) for t in self.session.get_inputs()]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo(t.name, t.type, tuple(t.shape)) for t in self.session.get_outputs()]

    def run(self, images: np.ndarray, targets: Sequence[int] | np.ndarray | None = None) -> ModelOutputs:
        """Run the model on a batch of preprocessed images.

        Args:
            images: float32 [N, 3, H, W], already normalized (see :func:`gradmap.runtime.preprocess`).
            targets: class index per image, -1 (or ``None`` for all) meaning that image's top-1 class.

        Returns:
            :class:`ModelOutputs` with logits, the resolved target_index and the input gradient.
        """
        out = self.run_outputs(images, targets, (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_GRADIENT))
        return ModelOutputs(out[OUTPUT_LOGITS], out[OUTPUT_TARGET_INDEX], out[OUTPUT_GRADIENT])

    def run_outputs(self, images: np.ndarray, targets: Sequence[int] | np.ndarray | None,
                    outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model and return the named ``outputs`` (e.g. ``gradient_guided``, ``cam_activation``).

        The one place where the runtime calls onnxruntime on a gradmap model: inputs are checked as
        in :meth:`run`, and a graph with a fixed batch size gets full batches (padded, then cut).

        Raises:
            ValueError: wrong image or target shapes, targets out of range, or an output the model
                does not have (naming the export option that adds it).
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        n = images.shape[0] if images.ndim == 4 else 0
        if images.ndim != 4 or images.shape[1:] != (3, *self.input_size):
            raise ValueError(f"images must have shape [N, 3, {self.input_size[0]}, {self.input_size[1]}], "
                             f"got {list(images.shape)}")
        targets = self.checked_targets(n, targets)
        have = {t.name for t in self.session.get_outputs()}
        missing = [name for name in outputs if name not in have]
        if missing:
            if not self.metadata.gradient and any(name in GRADIENT_OUTPUTS for name in missing):
                raise ValueError(f"{self.path} has no output {', '.join(missing)} (it has {', '.join(sorted(have))}): "
                                 f"it was exported without a gradient ({NO_GRADIENT_OPTION}); export it again "
                                 f"without {NO_GRADIENT_OPTION}")
            raise ValueError(f"{self.path} has no output {', '.join(missing)} (it has {', '.join(sorted(have))}); "
                             "export with --backprop guided|deconvnet or --cam-layer auto for those")
        names = list(outputs)
        if self.fixed_batch is None:
            _before_run()
            return dict(zip(names, self.session.run(names, {INPUT_IMAGE: images, INPUT_TARGET: targets})))
        parts = []
        step = self.fixed_batch
        for start in range(0, n, step):
            chunk, chunk_targets = images[start:start + step], targets[start:start + step]
            real = chunk.shape[0]
            if real < step:  # the graph only takes full batches: pad, then drop the padding
                chunk = np.concatenate([chunk, np.zeros((step - real, *chunk.shape[1:]), np.float32)])
                chunk_targets = np.concatenate([chunk_targets, np.full(step - real, -1, np.int64)])
            _before_run()
            values = self.session.run(names, {INPUT_IMAGE: chunk, INPUT_TARGET: chunk_targets})
            parts.append([v[:real] for v in values])
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}

    def checked_targets(self, n: int, targets: Sequence[int] | np.ndarray | None) -> np.ndarray:
        """``targets`` for ``n`` images as int64 [n] (None: all -1, each image's top-1 class).

        Raises:
            ValueError: a shape other than [n], or a class index out of range.
        """
        targets = np.full(n, -1, dtype=np.int64) if targets is None else np.asarray(targets, dtype=np.int64)
        if targets.shape != (n,):
            raise ValueError(f"targets must have shape [{n}], got {list(targets.shape)}")
        if np.any(targets >= self.metadata.num_classes) or np.any(targets < -1):
            raise ValueError(f"targets must be -1 or class indices below {self.metadata.num_classes}")
        return targets

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits [N, K] of a batch of preprocessed images, from the forward part of the graph alone.

        onnxruntime runs the whole graph whatever outputs are requested, so a caller that needs only
        the classes (the thousands of perturbed images of deletion and insertion curves, occlusion,
        RISE and Score-CAM) would pay for the gradient too. The forward part is cut out of the model
        file once (:func:`~gradmap.runtime._onnx_prune.prune_to_outputs`, no ``onnx`` package needed):
        the same logits up to float32 rounding (onnxruntime may fuse the forward's nodes differently
        once no gradient reads them), about 5x cheaper on the demo model. A graph it cannot cut (one
        with subgraphs) runs whole.
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, *self.input_size):
            raise ValueError(f"images must have shape [N, 3, {self.input_size[0]}, {self.input_size[1]}], "
                             f"got {list(images.shape)}")
        session = self._forward_part((OUTPUT_LOGITS,))
        if session is self.session:
            return self.run_outputs(images, None, (OUTPUT_LOGITS,))[OUTPUT_LOGITS]
        return self._run_forward(session, images, (OUTPUT_LOGITS,))[OUTPUT_LOGITS]

    @property
    def _forward(self) -> ort.InferenceSession | None:
        """The forward part :meth:`logits` runs (None until its first use)."""
        return self._forward_parts.get((OUTPUT_LOGITS,))

    def forward_outputs(self, images: np.ndarray, targets: Sequence[int] | np.ndarray | None,
                        outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """The logits, the resolved target_index and the named forward ``outputs`` (``cam_activation``,
        ``attention``: values of the forward pass, no gradient) from the forward part of the graph.

        As :meth:`logits`, for the methods that read the forward pass alone (Score-CAM's activations,
        attention rollout): on a full export onnxruntime would compute the gradient too. The part is
        cut out once per set of outputs; target_index is resolved as the graph does (-1: the top-1
        class, the first of equal logits). A graph that cannot be cut runs whole (:meth:`run_outputs`).

        Raises:
            ValueError: as :meth:`run_outputs`, and for a gradient output (not a forward value).
        """
        gradients = [name for name in outputs if name in GRADIENT_OUTPUTS]
        if gradients:
            raise ValueError(f"{', '.join(gradients)}: not an output of the forward pass")
        wanted = tuple(dict.fromkeys((OUTPUT_LOGITS, *(n for n in outputs if n != OUTPUT_TARGET_INDEX))))
        names = (*wanted, OUTPUT_TARGET_INDEX)
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, *self.input_size):
            return self.run_outputs(images, targets, names)  # raises the shape error
        targets = self.checked_targets(images.shape[0], targets)
        have = {t.name for t in self.session.get_outputs()}
        if any(name not in have for name in wanted):
            return self.run_outputs(images, targets, names)  # raises, naming the export option
        session = self._forward_part(wanted)
        if session is self.session:
            return self.run_outputs(images, targets, names)
        values = self._run_forward(session, images, wanted)
        values[OUTPUT_TARGET_INDEX] = np.where(targets < 0, values[OUTPUT_LOGITS].argmax(axis=1), targets)
        return values

    def _run_forward(self, session: ort.InferenceSession, images: np.ndarray,
                     names: Sequence[str]) -> dict[str, np.ndarray]:
        """``names`` from a forward part's ``session`` (image input only), full batches where the graph
        has a fixed batch size (padded, then cut)."""
        names = list(names)
        if self.fixed_batch is None:
            _before_run()
            return dict(zip(names, session.run(names, {INPUT_IMAGE: images})))
        parts, step = [], self.fixed_batch
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            real = len(chunk)
            if real < step:  # the graph only takes full batches: pad, then drop the padding
                chunk = np.concatenate([chunk, np.zeros((step - real, *chunk.shape[1:]), np.float32)])
            _before_run()
            parts.append([v[:real] for v in session.run(names, {INPUT_IMAGE: chunk})])
        if not parts:  # no image: empty outputs of the graph's shapes (a free dimension as 0)
            shapes = {t.name: [d if isinstance(d, int) else 0 for d in t.shape[1:]] for t in session.get_outputs()}
            return {name: np.zeros((0, *shapes[name]), np.float32) for name in names}
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities [N, K] of a batch of preprocessed images, from the forward part alone
        (see :meth:`logits`)."""
        return softmax(self.logits(images), axis=1)

    def _forward_part(self, outputs: tuple[str, ...]) -> ort.InferenceSession:
        """The session of the graph cut to ``outputs`` (made once per set of outputs), or the whole
        model's where the graph cannot be cut."""
        if outputs not in self._forward_parts:
            self._forward_parts[outputs] = self._forward_session(outputs)
        return self._forward_parts[outputs]

    def _forward_session(self, outputs: tuple[str, ...]) -> ort.InferenceSession:
        """The session of the graph cut to ``outputs``; the logits' part without spinning threads.

        Each onnxruntime session has its own intra-op threads, and after a run they spin, waiting for
        more work, for tens of milliseconds (2^20 pauses). The logits' part runs between the gradient
        graph's runs and host work (the end points of Blur IG and Guided IG, evaluation curves,
        perturbation masks), so on 2 cores each switch ran on one core while the other session's
        thread spun: resnet50's forward of one picture took 75-79 ms right after a gradient and 39 ms
        alone, and a gradient 126-140 ms right after that forward and 89-105 ms alone. Without
        spinning in the logits' part a gradient right after it takes its own time. The parts that
        serve one method alone (Score-CAM's activations, attention rollout) keep spinning: it saves
        10-30 % of a small forward (vit_b_16 on one picture: 191 against 211-223 ms;
        ``session.intra_op.allow_spinning``)."""
        try:
            with open(self.path, "rb") as f:
                forward = prune_to_outputs(f.read(), outputs)
            options = session_options(self.session.get_session_options().intra_op_num_threads)
            if outputs == (OUTPUT_LOGITS,):
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self._data_files:  # weights in other files: found beside the model, as when loading the file
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 os.path.dirname(os.path.abspath(self.path)))
            return self.plan.session(forward, options)
        except Exception as e:  # a graph that cannot be cut (subgraphs), or onnxruntime refusing the cut: the full model is exact too
            logger.debug("running the full model for %s alone (%s)", ", ".join(outputs), e)
            return self.session
