"""Which onnxruntime execution provider runs a gradmap model: ``--provider auto|cpu|cuda|webgpu``.

- ``cpu``: onnxruntime's CPU provider (every onnxruntime build).
- ``cuda``: ``CUDAExecutionProvider``, from the ``onnxruntime-gpu`` wheel (which replaces the CPU
  ``onnxruntime`` wheel). SmoothGrad and integrated gradients then keep their noisy and path images
  on the GPU (:mod:`gradmap.runtime.device`).
- ``webgpu``: onnxruntime's WebGPU *plugin* provider, the ``onnxruntime-ep-webgpu`` wheel beside an
  onnxruntime >= 1.24.4. It is not in ``get_available_providers()``: its library is registered with
  onnxruntime, which then lists the devices it supports (``get_ep_devices``), and a session gets it
  through ``SessionOptions.add_provider_for_devices``. On Linux it runs over Vulkan and needs a
  Vulkan loader (``libvulkan.so.1``) and a driver for the GPU.
- ``auto``: CUDA when this onnxruntime has it, otherwise WebGPU when the plugin is installed and
  finds a GPU, otherwise the CPU.

A comma-separated list of onnxruntime provider names (``CUDAExecutionProvider,CPUExecutionProvider``)
is taken as it is. Every choice ends with the CPU provider, which runs what the first one cannot.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import onnxruntime as ort

from gradmap.contract import PROVIDERS

__all__ = ["CPU", "CUDA", "PROVIDER_ALIASES", "PROVIDER_CHOICES", "WEBGPU", "WEBGPU_PACKAGE", "ProviderPlan",
           "WebGpuDevices", "find_webgpu_devices", "plan_providers"]

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
WEBGPU = "WebGpuExecutionProvider"
#: The short provider names ``--provider`` takes, besides ``auto`` and onnxruntime's own names.
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "webgpu": WEBGPU}
#: ``--provider``'s named choices (gradmap.contract.PROVIDERS), in the order ``--help`` lists them.
PROVIDER_CHOICES = PROVIDERS
assert set(PROVIDER_CHOICES) == {"auto", *PROVIDER_ALIASES}, "every named provider choice has an onnxruntime name"
#: The wheel that brings the WebGPU plugin provider.
WEBGPU_PACKAGE = "onnxruntime-ep-webgpu"
#: The first onnxruntime release the WebGPU plugin loads into.
WEBGPU_MIN_ORT = (1, 24, 4)


@dataclass(frozen=True)
class WebGpuDevices:
    """What looking for the WebGPU plugin found: its onnxruntime devices (``OrtEpDevice``), whether
    one of them is a GPU, and, when there is none, why."""

    devices: tuple[Any, ...] = ()
    gpu: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ProviderPlan:
    """The providers a session gets: ``names`` in priority order (onnxruntime's names, the CPU last),
    ``plugin_devices`` for a plugin provider (added to the session options, not named in
    ``providers=``), and ``why`` this choice (for ``auto``)."""

    names: tuple[str, ...]
    plugin_devices: tuple[Any, ...] = ()
    plugin_options: dict[str, str] = field(default_factory=dict)
    why: str = ""

    @property
    def first(self) -> str:
        return self.names[0]

    def session(self, path_or_bytes, options: ort.SessionOptions) -> ort.InferenceSession:
        """An onnxruntime session of the model with these providers (``options`` gets the plugin's devices)."""
        if self.plugin_devices:
            options.add_provider_for_devices(list(self.plugin_devices), dict(self.plugin_options))
            return ort.InferenceSession(path_or_bytes, options)
        return ort.InferenceSession(path_or_bytes, options, providers=list(self.names))


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


_registered: dict[str, str] = {}  # library path -> registration name, once per process


def find_webgpu_devices() -> WebGpuDevices:
    """Register the WebGPU plugin's library with onnxruntime (once) and return its devices, or why
    there are none: the wheel is not installed, this onnxruntime is too old for plugins, the library
    does not load (no Vulkan loader), or no GPU was found."""
    if importlib.util.find_spec("onnxruntime_ep_webgpu") is None:
        return WebGpuDevices(reason=f"the WebGPU plugin is not installed (pip install {WEBGPU_PACKAGE}, beside "
                                    f"onnxruntime >= {'.'.join(map(str, WEBGPU_MIN_ORT))})")
    if _version(ort.__version__) < WEBGPU_MIN_ORT or not hasattr(ort, "register_execution_provider_library"):
        return WebGpuDevices(reason=f"onnxruntime {ort.__version__} cannot load plugin providers: the WebGPU plugin "
                                    f"needs onnxruntime >= {'.'.join(map(str, WEBGPU_MIN_ORT))}")
    import onnxruntime_ep_webgpu as plugin

    library = plugin.get_library_path()
    if library not in _registered:
        try:
            ort.register_execution_provider_library("gradmap-webgpu", library)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind types
            return WebGpuDevices(reason=f"onnxruntime cannot load the WebGPU plugin ({library}): {e}; on Linux it "
                                        "needs a Vulkan loader (libvulkan.so.1) and a Vulkan driver for the GPU")
        _registered[library] = "gradmap-webgpu"
    name = plugin.get_ep_name()
    every = ort.get_ep_devices()
    devices = tuple(d for d in every if d.ep_name == name)
    if not devices:
        seen = ", ".join(sorted({f"{d.device.type.name} ({d.device.vendor})" for d in every})) or "none"
        return WebGpuDevices(reason=f"the WebGPU plugin found no device (onnxruntime sees: {seen}); on Linux it "
                                    "needs a GPU with a Vulkan driver and loader (libvulkan.so.1)")
    gpu = any(d.device.type == ort.OrtHardwareDeviceType.GPU for d in devices)
    return WebGpuDevices(devices=devices[:1], gpu=gpu)  # the plugin takes one device and picks the adapter itself


def plan_providers(provider: str | Sequence[str] = "auto", *, available: Sequence[str] | None = None,
                   webgpu: Callable[[], WebGpuDevices] = find_webgpu_devices) -> ProviderPlan:
    """Turn ``--provider`` into a :class:`ProviderPlan` (see the module docstring).

    Args:
        provider: ``auto``, ``cpu``, ``cuda``, ``webgpu``, a comma-separated list or a list of names.
        available: onnxruntime's built-in providers (default: ``ort.get_available_providers()``).
        webgpu: looks for the WebGPU plugin's devices (tests pass their own).

    Raises:
        ValueError: a requested provider is not there, saying what to install.
    """
    available = list(ort.get_available_providers() if available is None else available)
    if isinstance(provider, str):
        if provider.strip().lower() == "auto":
            return _auto(available, webgpu)
        names = [p for p in (s.strip() for s in provider.split(",")) if p]
    else:
        names = [str(p).strip() for p in provider]
    if not names:
        raise ValueError("no execution provider given: choose " + ", ".join(PROVIDER_CHOICES))
    resolved = list(dict.fromkeys(PROVIDER_ALIASES.get(name.lower(), name) for name in names))
    devices: tuple[Any, ...] = ()
    if WEBGPU in resolved:
        found = webgpu()
        if not found.devices:
            raise ValueError(f"--provider webgpu: {found.reason}")
        if resolved.index(WEBGPU) != 0:
            raise ValueError("--provider: the WebGPU plugin provider must come first in the list")
        devices = found.devices
    missing = [name for name in resolved if name not in available and name != WEBGPU]
    if missing:
        hint = f" (install onnxruntime-gpu for CUDA; --provider webgpu needs {WEBGPU_PACKAGE})" if CUDA in missing else ""
        raise ValueError(f"execution provider {', '.join(missing)} is not available in this onnxruntime "
                         f"{ort.__version__}; available: {', '.join(available)}{hint}")
    if CPU not in resolved:
        resolved.append(CPU)  # onnxruntime runs on the CPU what the first provider cannot
    return ProviderPlan(tuple(resolved), plugin_devices=devices, why="requested")


def _auto(available: list[str], webgpu: Callable[[], WebGpuDevices]) -> ProviderPlan:
    if CUDA in available:
        return ProviderPlan((CUDA, CPU), why="auto: this onnxruntime has CUDA")
    found = webgpu()  # cheap without the plugin: find_webgpu_devices looks for the package first
    if found.devices and found.gpu:
        return ProviderPlan((WEBGPU, CPU), plugin_devices=found.devices, why="auto: the WebGPU plugin found a GPU")
    reason = found.reason or "the WebGPU plugin found no GPU"
    return ProviderPlan((CPU,), why=f"auto: CPU (no CUDA in onnxruntime {ort.__version__}; {reason})")
