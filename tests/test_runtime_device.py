"""GPU providers, their CPU-side logic: ``--provider auto|cpu|cuda|webgpu`` resolution and its
messages, chunk sizing, and SmoothGrad/IG with their images kept on the device (onnxruntime I/O
binding), run here on the CPU provider's I/O binding against the host implementation.

Nothing here runs on a GPU; bench/gpu/run.sh is the prepared GPU run.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from gradmap.contract import OUTPUT_GRADIENT
from gradmap.demo import demo_assets
from gradmap.runtime import SaliencyModel
from gradmap.runtime.device import DeviceGradients, chunk_images, parse_nvidia_smi, per_image_bytes
from gradmap.runtime.methods import (MethodSpec, _alphas, attribute, baseline_image, gradient_function,
                                     integrated_gradients)
from gradmap.runtime.providers import (CPU, CUDA, PROVIDER_CHOICES, WEBGPU, WebGpuDevices, find_webgpu_devices,
                                       plan_providers)


class FakeDevice:
    """An ``OrtEpDevice`` stand-in: the plan only passes it on."""

    def __init__(self, kind: str = "GPU") -> None:
        self.device = type("HardwareDevice", (), {"type": getattr(ort.OrtHardwareDeviceType, kind), "vendor": "NVIDIA"})()


def _webgpu(devices=(), gpu=True, reason=""):
    return lambda: WebGpuDevices(devices=tuple(devices), gpu=gpu, reason=reason)


NO_PLUGIN = _webgpu(reason="the WebGPU plugin is not installed")


# ---------------------------------------------------------------- provider resolution
def test_named_providers():
    assert plan_providers("cpu", available=[CPU], webgpu=NO_PLUGIN).names == (CPU,)
    assert plan_providers("cuda", available=[CUDA, CPU], webgpu=NO_PLUGIN).names == (CUDA, CPU)
    assert plan_providers("CUDAExecutionProvider", available=[CUDA, CPU], webgpu=NO_PLUGIN).names == (CUDA, CPU), \
        "the CPU provider is appended after the named one"
    assert plan_providers(["cpu"], available=[CPU], webgpu=NO_PLUGIN).names == (CPU,)
    device = FakeDevice()
    plan = plan_providers("webgpu", available=[CPU], webgpu=_webgpu([device]))
    assert plan.names == (WEBGPU, CPU) and plan.plugin_devices == (device,), "webgpu goes through the plugin's device"
    assert set(PROVIDER_CHOICES) == {"auto", "cpu", "cuda", "webgpu"}


@pytest.mark.parametrize("provider, available, webgpu, message", [
    ("cuda", [CPU], NO_PLUGIN, "CUDAExecutionProvider is not available .*install onnxruntime-gpu"),
    ("webgpu", [CPU], NO_PLUGIN, "--provider webgpu: the WebGPU plugin is not installed"),
    ("webgpu", [CPU], _webgpu(reason="the WebGPU plugin found no device"), "found no device"),
    ("cpu,webgpu", [CPU], _webgpu([FakeDevice()]), "WebGPU plugin provider must come first"),
    ("NoSuchExecutionProvider", [CPU], NO_PLUGIN, "NoSuchExecutionProvider is not available"),
    (" , ", [CPU], NO_PLUGIN, "no execution provider given: choose auto, cpu, cuda, webgpu"),
])
def test_unavailable_providers_are_refused_with_the_reason(provider, available, webgpu, message):
    with pytest.raises(ValueError, match=message):
        plan_providers(provider, available=available, webgpu=webgpu)


def test_auto_prefers_cuda_then_a_webgpu_gpu_then_the_cpu():
    device = FakeDevice()
    assert plan_providers("auto", available=[CUDA, CPU], webgpu=_webgpu([device])).names == (CUDA, CPU)
    plan = plan_providers("auto", available=[CPU], webgpu=_webgpu([device]))
    assert plan.names == (WEBGPU, CPU) and plan.plugin_devices == (device,)
    software = plan_providers("auto", available=[CPU], webgpu=_webgpu([FakeDevice("CPU")], gpu=False))
    assert software.names == (CPU,), "a WebGPU device that is no GPU (a software Vulkan) is not chosen by auto"
    plan = plan_providers("auto", available=[CPU], webgpu=NO_PLUGIN)
    assert plan.names == (CPU,) and "no CUDA" in plan.why and "not installed" in plan.why


def test_webgpu_here_says_what_is_missing():
    """On this machine: either the plugin is absent (the message says what to install) or it finds
    no GPU; either way no device and a reason."""
    found = find_webgpu_devices()
    if found.devices:
        pytest.skip("the WebGPU plugin found a device here")
    assert "onnxruntime-ep-webgpu" in found.reason or "no device" in found.reason or "Vulkan" in found.reason, found.reason
    with pytest.raises(ValueError, match="--provider webgpu: "):
        SaliencyModel(str(demo_assets().joinpath("shapes.onnx")), provider="webgpu")


def test_cli_names_the_provider_choices_and_refuses_webgpu_here(tmp_path):
    from gradmap.cli import main

    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    assert "auto, cpu, cuda, webgpu" in help_text
    info = CliRunner().invoke(main, ["info", str(demo_assets().joinpath("shapes.onnx"))]).output
    assert "--provider auto: " in info and "auto: " in info.split("--provider auto: ")[1], info
    if find_webgpu_devices().devices:
        pytest.skip("the WebGPU plugin found a device here")
    from PIL import Image

    Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "p.png")
    result = CliRunner().invoke(main, ["run", str(demo_assets().joinpath("shapes.onnx")), str(tmp_path / "p.png"),
                                       "--out", str(tmp_path / "out"), "--provider", "webgpu"])
    assert result.exit_code == 2 and "--provider webgpu:" in result.output, result.output


# ---------------------------------------------------------------- chunk sizing
def test_chunk_fills_the_free_memory():
    mib = 2**20
    assert chunk_images(80_000 * mib, 500 * mib) == 128, "80 GB free, 500 MiB per image: 80 % of it is 128 images"
    assert chunk_images(80_000 * mib, 500 * mib, fixed_bytes=4_000 * mib) == 120
    assert chunk_images(80_000 * mib, 10 * mib) == 1024, "capped at the limit"
    assert chunk_images(80_000 * mib, 10 * mib, fixed_batch=8) == 8, "a fixed batch graph takes its batch"
    with pytest.raises(ValueError, match="1000 MiB free; a run of 1 image"):
        chunk_images(1000 * mib, 2000 * mib)
    with pytest.raises(ValueError, match="a run of 8 image"):
        chunk_images(1000 * mib, 200 * mib, fixed_batch=8)
    with pytest.raises(ValueError, match="positive"):
        chunk_images(1000 * mib, 0)


def test_per_image_bytes_from_two_probe_runs():
    arena = {"used": 1000}

    def run(n: int) -> None:  # an arena that grows to fit the largest run: 300 + 70 per image
        arena["used"] = max(arena["used"], 1300 + 70 * n)

    assert per_image_bytes(lambda: arena["used"], run) == 70


def test_nvidia_smi_memory_lines():
    assert parse_nvidia_smi("81000, 81559\n140000, 143771\n") == [(81000 * 2**20, 81559 * 2**20),
                                                                 (140000 * 2**20, 143771 * 2**20)]
    with pytest.raises(ValueError, match="nvidia-smi"):
        parse_nvidia_smi("[N/A], 81559")


# ---------------------------------------------------------------- images kept on the device
@pytest.fixture(scope="module")
def demo_model():
    return SaliencyModel(str(demo_assets().joinpath("shapes.onnx")), provider="cpu", threads=1)


@pytest.fixture(scope="module")
def pictures(demo_model):
    h, w = demo_model.input_size
    return np.random.default_rng(3).standard_normal((3, 3, h, w)).astype(np.float32)


@pytest.mark.parametrize("rule", ["gauss-legendre", "trapezoid"])
@pytest.mark.parametrize("chunk", [5, 16, 40], ids=["steps-split", "one-picture-per-run", "pictures-packed"])
def test_device_integrated_gradients_equal_the_host(demo_model, pictures, rule, chunk):
    steps = 16
    pre = demo_model.metadata.preprocessing
    baselines = baseline_image(pictures, "blurred", pre.mean, pre.std)
    host = integrated_gradients(gradient_function(demo_model), pictures, np.full(3, -1), baselines, steps=steps,
                                rule=rule)
    device = DeviceGradients(demo_model, device="cpu", chunk=chunk)
    alphas, weights = _alphas(steps, rule)
    average = device.path_sums(pictures, baselines, host.target_index, alphas, weights)
    values = (pictures - baselines) * average
    scale = np.abs(host.values).max()
    assert np.abs(values - host.values).max() <= 1e-5 * scale, \
        f"device IG differs from the host's by {np.abs(values - host.values).max() / scale:.3g} of its range"


def test_device_smoothgrad_without_noise_is_the_gradient(demo_model, pictures):
    _, target_index, gradient = gradient_function(demo_model)(pictures, np.full(3, -1))
    device = DeviceGradients(demo_model, device="cpu", chunk=7)  # 10 samples: split 7 + 3
    total, squares = device.smoothgrad_sums(pictures, target_index, np.zeros(3, np.float32), 10)
    assert np.abs(total / 10 - gradient).max() <= 1e-6 * np.abs(gradient).max(), "sum of 10 equal gradients / 10"
    assert np.abs(squares / 10 - gradient.astype(np.float64) ** 2).max() <= 1e-6 * (gradient ** 2).max()


def test_device_noise_has_the_requested_sigma(demo_model, pictures):
    device = DeviceGradients(demo_model, device="cpu", chunk=50)
    sigma = np.array([0.5, 2.0], np.float32)
    session = device._noisy(2, 25, 7.0)
    (noisy,) = device._run(session, {"image": device._put(pictures[:2]), "sigma": sigma}, ["noisy"], host=("noisy",))
    noise = noisy.numpy().reshape(2, 25, *pictures.shape[1:]) - pictures[:2, None]
    for i in range(2):
        assert abs(noise[i].std() / sigma[i] - 1) < 0.01, f"picture {i}: noise sigma {noise[i].std():.4f} != {sigma[i]}"
        assert abs(noise[i].mean()) < 0.01 * sigma[i], "the noise is centred"
    assert not np.allclose(noise[:, 0], noise[:, 1]), "each sample draws its own noise"


def test_device_methods_through_attribute(demo_model, pictures):
    """SaliencyModel.io_device routes SmoothGrad and IG through the device path (as the CUDA provider
    sets it): IG equals the host's; SmoothGrad is reproducible for one seed, changes with another, and
    agrees with the host's SmoothGrad as well as two host draws agree with each other."""
    targets = np.full(3, -1)
    ig = MethodSpec("integrated-gradients", steps=16)
    sg = MethodSpec("smoothgrad", samples=64, noise=0.1)
    host_ig, host_sg = attribute(demo_model, ig, pictures, targets), attribute(demo_model, sg, pictures, targets)
    demo_model.io_device = "cpu"
    try:
        device_ig = attribute(demo_model, ig, pictures, targets)
        first, again = attribute(demo_model, sg, pictures, targets), attribute(demo_model, sg, pictures, targets)
        other = attribute(demo_model, MethodSpec("smoothgrad", samples=64, noise=0.1, seed=1), pictures, targets)
    finally:
        demo_model.io_device = None
        demo_model.__dict__.pop("_device_gradients", None)
    assert np.array_equal(device_ig[1], host_ig[1]), "targets"
    scale = np.abs(host_ig[2]).max()
    assert np.abs(device_ig[2] - host_ig[2]).max() <= 1e-5 * scale, "IG values"
    assert np.allclose(device_ig[3], host_ig[3], rtol=1e-3, atol=1e-4 * scale), "IG completeness gap"
    assert np.array_equal(first[2], again[2]), "one seed, the same SmoothGrad map"
    assert not np.array_equal(first[2], other[2]), "another seed, another draw"
    host_other = attribute(demo_model, MethodSpec("smoothgrad", samples=64, noise=0.1, seed=1), pictures, targets)
    correlation = np.corrcoef(first[2].ravel(), host_sg[2].ravel())[0, 1]
    between_draws = np.corrcoef(host_other[2].ravel(), host_sg[2].ravel())[0, 1]  # 0.34 on the demo model
    assert correlation > between_draws - 0.1, (f"device and host SmoothGrad correlate {correlation:.3f}, two host "
                                               f"draws {between_draws:.3f}: the device's noise is not the host's")


def test_device_gradients_refuse_a_fixed_batch(demo_model):
    class Fixed:
        fixed_batch, path, input_size = 8, "fixed.onnx", (64, 64)

    with pytest.raises(ValueError, match="fixed batch of 8"):
        DeviceGradients(Fixed(), device="cpu")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        DeviceGradients(demo_model, device="cpu", chunk=0)
    assert OUTPUT_GRADIENT == DeviceGradients(demo_model, device="cpu").output
