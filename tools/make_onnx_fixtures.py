"""Write the small ONNX classifier fixtures of tests/fixtures/onnx/ from other frameworks' exporters.

CI installs neither JAX nor Paddle (nor TensorFlow for this): it exports these files with
``gradmap export onnx:PATH`` and compares the results with what the source framework computed here,
in float64, when the fixture was made. Each fixture is three things:

    NAME.onnx     the exporter's file, as it wrote it (random weights, seeded)
    NAME.npz      image (float32 NCHW, as fed to gradmap's ``image``), target (int64 [N]), and the
                  framework's own float64 logits [N, K] and gradient of logit[target] w.r.t. the NCHW
                  image [N, 3, H, W] (an NHWC framework's gradient transposed)
    manifest.json NAME -> the export options it needs (layout, input size, preset, cam layer...), the
                  framework and exporter versions, and what the framework reference was

Run each framework in its own environment (one per call; the manifest is merged, not replaced):

    /work/venvs/jax/bin/python tools/make_onnx_fixtures.py jax        # jax, flax, jax2onnx
    /work/venvs/paddle/bin/python tools/make_onnx_fixtures.py paddle  # paddlepaddle, paddle2onnx
    /work/venvs/keras/bin/python tools/make_onnx_fixtures.py keras    # tensorflow-cpu, keras, tf2onnx
    python tools/make_onnx_fixtures.py torch                          # torch.onnx at old opsets
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "onnx"
SIZE = 32  # input height and width: big enough for a few downsamplings, small enough for numpy's float64


def _save(name: str, onnx_bytes: bytes, image: np.ndarray, target: np.ndarray, logits: np.ndarray,
          gradient: np.ndarray, entry: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.onnx").write_bytes(onnx_bytes)
    np.savez_compressed(OUT / f"{name}.npz", image=image.astype(np.float32), target=target.astype(np.int64),
                        logits=logits.astype(np.float64), gradient=gradient.astype(np.float64))
    manifest_path = OUT / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[name] = entry
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    print(f"{name}: {len(onnx_bytes) / 1e3:.0f} kB, logits {logits.shape}, {entry['reference']}")


def _image(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, SIZE, SIZE)).astype(np.float32)


# -- JAX / flax through jax2onnx -----------------------------------------------------------------------

def make_jax() -> None:
    import jax
    import jax.numpy as jnp
    import jax2onnx
    from flax import nnx

    class CNN(nnx.Module):
        """NHWC, as flax is: conv, batch norm, relu, max pool, a residual block, average pool, dense."""

        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.conv2 = nnx.Conv(16, 16, (3, 3), rngs=rngs)
            self.bn2 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.conv3 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
            self.dense = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.conv1(x)))
            x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            x = nnx.relu(x + self.bn2(self.conv2(x)))
            x = nnx.gelu(self.conv3(x))
            x = x.mean(axis=(1, 2))
            return self.dense(x)

    class Mixer(nnx.Module):
        """A patch embedding, layer norm, token mixing by einsum, softmax attention pooling."""

        def __init__(self, rngs):
            self.patch = nnx.Conv(3, 24, (8, 8), strides=(8, 8), rngs=rngs)
            self.norm = nnx.LayerNorm(24, rngs=rngs)
            self.query = nnx.Param(jax.random.normal(jax.random.key(3), (24,)))
            self.mlp1 = nnx.Linear(24, 48, rngs=rngs)
            self.mlp2 = nnx.Linear(48, 24, rngs=rngs)
            self.head = nnx.Linear(24, 7, rngs=rngs)

        def __call__(self, x):
            x = self.patch(x)  # [N, 4, 4, 24]
            tokens = x.reshape(x.shape[0], -1, 24)
            tokens = tokens + self.mlp2(nnx.swish(self.mlp1(self.norm(tokens))))
            weights = jax.nn.softmax(jnp.einsum("ntc,c->nt", tokens, self.query[...]), axis=-1)
            pooled = jnp.einsum("nt,ntc->nc", weights, tokens)
            return self.head(nnx.tanh(pooled))

    # exported in float32 first: with jax_enable_x64 on, jax2onnx writes some constants as doubles
    exported = {}
    for name, cls in (("jax2onnx_flax_cnn", CNN), ("jax2onnx_flax_mixer", Mixer)):
        model = cls(nnx.Rngs(0))
        exported[name] = (model, jax2onnx.to_onnx(model, [("B", SIZE, SIZE, 3)], model_name=name))
    jax.config.update("jax_enable_x64", True)
    for name, (model, proto) in exported.items():
        image = _image()
        target = np.asarray([1, 5])
        nhwc = image.transpose(0, 2, 3, 1)
        # the float64 reference: the same module, parameters in float64
        graphdef, state = nnx.split(model)
        state64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating)
                                         else a, state)
        model64 = nnx.merge(graphdef, state64)

        def score(x, model64=model64, target=target):
            return model64(x)[jnp.arange(2), target].sum()

        x64 = jnp.asarray(nhwc, dtype=jnp.float64)
        logits = np.asarray(model64(x64))
        gradient = np.asarray(jax.grad(score)(x64)).transpose(0, 3, 1, 2)
        _save(name, proto.SerializeToString(), image, target, logits, gradient, {
            "source": "jax2onnx", "framework": f"jax {jax.__version__}, flax nnx", "exporter":
            f"jax2onnx {getattr(jax2onnx, '__version__', '?')}", "reference": "jax.grad in float64 (jax_enable_x64)",
            "options": {"layout": "nhwc", "preset_name": "keras-tf"}, "cam_layer": "auto" if name.endswith("cnn") else None,
            "methods": ["vanilla", "integrated-gradients"] + (["grad-cam"] if name.endswith("cnn") else [])})


# -- PaddlePaddle through paddle2onnx ------------------------------------------------------------------

def make_paddle() -> None:
    import paddle
    import paddle2onnx  # noqa: F401 - paddle.onnx.export uses it

    paddle.seed(0)
    luma = np.asarray([0.299, 0.587, 0.114])  # gradmap feeds a 1-channel model the luma of its RGB image
    # (name, builder, channels, size, methods): 64x64 so that the last feature maps are 2x2, not 1x1
    models = [
        ("paddle2onnx_mobilenet_v3_small", lambda: paddle.vision.models.mobilenet_v3_small(scale=0.5, num_classes=10),
         3, 64, ["vanilla", "smoothgrad", "grad-cam"]),
        ("paddle2onnx_shufflenet_v2", lambda: paddle.vision.models.shufflenet_v2_x0_25(num_classes=10),
         3, 64, ["vanilla", "guided-backprop", "grad-cam"]),
        ("paddle2onnx_lenet_gray", lambda: paddle.vision.models.LeNet(num_classes=10), 1, 28,
         ["vanilla", "integrated-gradients"]),
    ]
    for name, build, channels, size, methods in models:
        model = build()
        model.eval()
        for layer in model.sublayers():  # give the batch norms statistics that are not 0 and 1
            if isinstance(layer, paddle.nn.BatchNorm2D):
                layer._mean.set_value(paddle.uniform(layer._mean.shape, min=-0.2, max=0.2))
                layer._variance.set_value(paddle.uniform(layer._variance.shape, min=0.5, max=1.5))
        prefix = f"/tmp/{name}"
        paddle.onnx.export(model, prefix, opset_version=13,
                           input_spec=[paddle.static.InputSpec([None, channels, size, size], "float32", "x")])
        onnx_bytes = Path(f"{prefix}.onnx").read_bytes()
        image = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
        target = np.asarray([2, 7])
        model64 = build()
        model64.set_state_dict(model.state_dict())
        model64.eval()
        model64.to(dtype="float64")
        pixels = image.astype(np.float64)
        if channels == 1:
            pixels = np.tensordot(luma, pixels, axes=([0], [1]))[:, None]
        x = paddle.to_tensor(pixels, stop_gradient=False)
        logits = model64(x)
        selected = paddle.sum(paddle.take_along_axis(logits, paddle.to_tensor(target[:, None]), axis=1))
        (gradient,) = paddle.grad(selected, x)
        gradient = gradient.numpy()
        if channels == 1:
            gradient = luma.reshape(1, 3, 1, 1) * gradient
        _save(name, onnx_bytes, image, target, logits.numpy(), gradient, {
            "source": "paddle2onnx", "framework": f"paddlepaddle {paddle.__version__}",
            "exporter": f"paddle2onnx {paddle2onnx.__version__}, opset 13",
            "reference": "paddle.grad in float64" + (" (w.r.t. the luma of the RGB image)" if channels == 1 else ""),
            "options": {"preset_name": "keras-tf" if channels == 1 else "torchvision"},
            "cam_layer": "auto" if "grad-cam" in methods else None, "methods": methods})


# -- Keras through tf2onnx -----------------------------------------------------------------------------

def make_keras() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    import tf2onnx

    def build():
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU(6.0)(x)
        x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)
        x = keras.layers.Activation("swish")(x)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Conv2D(24, 1, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(6, activation="softmax")(x)
        return keras.Model(inputs, outputs)

    keras.utils.set_random_seed(0)
    model = build()
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.random.default_rng(1).uniform(-0.2, 0.2, 16).astype(np.float32))
            layer.moving_variance.assign(np.random.default_rng(2).uniform(0.5, 1.5, 16).astype(np.float32))
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=18)
    weights = model.get_weights()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    model64 = build()
    model64.set_weights([w.astype(np.float64) for w in weights])
    model64.layers[-1].activation = keras.activations.linear  # the logits (gradmap cuts the Softmax)
    image = _image()
    target = np.asarray([0, 4])
    x = tf.constant(image.transpose(0, 2, 3, 1).astype(np.float64))
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model64(x, training=False)
        selected = tf.reduce_sum(tf.gather(logits, target, axis=1, batch_dims=1))
    gradient = tape.gradient(selected, x).numpy().transpose(0, 3, 1, 2)
    _save("tf2onnx_keras_cnn", proto.SerializeToString(), image, target, logits.numpy(), gradient, {
        "source": "tf2onnx", "framework": f"tensorflow {tf.__version__}, keras {keras.__version__}",
        "exporter": f"tf2onnx {tf2onnx.__version__}, opset 18", "reference": "tf.GradientTape in float64",
        "options": {"preset_name": "keras-tf"}, "cam_layer": "auto",
        "methods": ["vanilla", "gradient-x-input", "grad-cam"]})


# -- torch.onnx at old opsets --------------------------------------------------------------------------

def make_torch() -> None:
    import warnings

    import torch
    from torch import nn

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    class CaffeNet(nn.Module):
        """An AlexNet/GoogLeNet-era network: LRN, max pooling with ceil mode, dropout, upsampling."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(), nn.LocalResponseNorm(5, alpha=1e-3),
                nn.MaxPool2d(3, stride=2, ceil_mode=True), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                nn.LocalResponseNorm(3))
            self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
            self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(24, 10))

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.max_pool2d(self.upsample(x), 2)
            return self.head(x.mean(dim=(2, 3)))

    class PReLUNet(nn.Module):
        """PReLU, ELU and batch norm at opset 7 (initializers listed as graph inputs, IR version 3)."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.PReLU(12),
                                      nn.Conv2d(12, 12, 3, stride=2, padding=1), nn.ELU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(12, 5), nn.Softmax(dim=1))

        def forward(self, x):
            return self.body(x)

    for name, module, opset, methods in (
            ("torch_onnx_caffenet_opset9", CaffeNet(), 9, ["vanilla", "guided-backprop", "deconvnet", "smoothgrad"]),
            ("torch_onnx_prelu_opset7", PReLUNet(), 7, ["vanilla", "gradient-x-input"])):
        module.eval()
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
        path = f"/tmp/{name}.onnx"
        torch.onnx.export(module, torch.zeros(1, 3, SIZE, SIZE), path, opset_version=opset, dynamo=False,
                          input_names=["data"], output_names=["prob"])
        image = _image(batch=1)
        target = np.asarray([3])
        reference = module.double()
        if isinstance(reference, PReLUNet):
            reference = nn.Sequential(*list(reference.body)[:-1])  # the logits before the Softmax gradmap cuts
        x = torch.from_numpy(image.astype(np.float64)).requires_grad_(True)
        logits = reference(x)
        (gradient,) = torch.autograd.grad(logits[0, 3], x)
        _save(name, Path(path).read_bytes(), image, target, logits.detach().numpy(), gradient.numpy(), {
            "source": "torch.onnx", "framework": f"torch {torch.__version__}",
            "exporter": f"torch.onnx (TorchScript exporter), opset {opset}", "reference": "torch autograd in float64",
            "options": {"preset_name": "torchvision"}, "cam_layer": None, "methods": methods})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("framework", choices=["jax", "paddle", "keras", "torch"])
    args = parser.parse_args()
    {"jax": make_jax, "paddle": make_paddle, "keras": make_keras, "torch": make_torch}[args.framework]()
    sys.exit(0)
