"""Write tests/fixtures/keras/: a small seeded Keras CNN exported with ``gradmap export keras:PATH``,
and TensorFlow's own float64 values for it, for the tests that run where TensorFlow is not installed
(the web page, ``--engine ray``, every method, lowering at load and ``--target cpu``).

The model is what a Keras user would train: NHWC at 48x64, Conv2D + BatchNormalization + ReLU, max pooling,
global average pooling and a softmax head, preprocessed as Keras' ``caffe`` mode (BGR, the ImageNet
mean subtracted at 0-255; format 2 of the model contract). It is exported three ways:

    cnn.keras                     the Keras model itself (random weights, seeded)
    cnn.gradmap.onnx              --preset keras-caffe --cam-layer auto --backprop guided --backprop deconvnet
    cnn_plain.gradmap.onnx        --preset keras-caffe (no Grad-CAM outputs, vanilla only)
    cnn_cpu.gradmap.onnx          as cnn.gradmap.onnx, with --target cpu
    cnn.npz                       image (float32 NCHW, as fed to ``image``: BGR, mean subtracted), target,
                                  and tf.GradientTape on a float64 copy of the model: logits, the
                                  gradient of logit[target] w.r.t. the NCHW image, the same under guided
                                  backpropagation's and deconvnet's ReLU rules (a tf.custom_gradient ReLU),
                                  the last ReLU's NHWC feature map (as NCHW), its gradient, and Grad-CAM
    manifest.json                 the commands, versions and what each reference is

Run in the Keras venv (tensorflow-cpu, keras, tf2onnx), from the repository root:

    /work/venvs/keras/bin/python tools/make_keras_fixtures.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "keras"
SIZE = (48, 64)  # height, width: not square, so that a height/width swap anywhere downstream shows
CLASSES = 10
SEED = 0
#: the files and the ``gradmap export`` options each is written with
EXPORTS = {
    "cnn.gradmap.onnx": ["--cam-layer", "auto", "--backprop", "guided", "--backprop", "deconvnet"],
    "cnn_plain.gradmap.onnx": [],
    "cnn_cpu.gradmap.onnx": ["--cam-layer", "auto", "--backprop", "guided", "--backprop", "deconvnet",
                             "--target", "cpu"],
}
COMMON = ["--preset", "keras-caffe"]


def build(keras, relu="relu"):
    """The classifier; ``relu`` replaces every ReLU (the float64 references' guided and deconvnet rules).
    Returns the model and the name of the layer whose output is the last feature map."""
    inputs = keras.Input((*SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation(relu)(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation=relu)(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation=relu, name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="scores")(x)
    return keras.Model(inputs, outputs), "features"


def _relus(tf):
    """ReLUs whose backward pass is guided backpropagation's or deconvnet's (Springenberg et al. 2015)."""

    @tf.custom_gradient
    def guided(x):
        def backward(dy):
            return dy * tf.cast(x > 0, dy.dtype) * tf.cast(dy > 0, dy.dtype)
        return tf.nn.relu(x), backward

    @tf.custom_gradient
    def deconvnet(x):
        def backward(dy):
            return tf.nn.relu(dy)
        return tf.nn.relu(x), backward

    return {"vanilla": "relu", "guided": guided, "deconvnet": deconvnet}


def make() -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    import tf2onnx

    OUT.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(SEED)
    model, _ = build(keras)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):  # statistics that are not 0 and 1
            layer.moving_mean.assign(rng.uniform(-0.3, 0.3, 8).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, 8).astype(np.float32))
    # caffe-mode inputs span about +-150: scale the first kernel so that the logits stay readable
    first = model.layers[1]
    first.kernel.assign(first.kernel.numpy() / 100)
    source = OUT / "cnn.keras"
    model.save(source)

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    summaries = {}
    for name, options in EXPORTS.items():
        command = ["export", f"keras:{source.relative_to(REPO)}", "-o", str((OUT / name).relative_to(REPO)),
                   *COMMON, *options]
        done = subprocess.run([sys.executable, "-m", "gradmap.cli", *command], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"gradmap {' '.join(command)} failed:\n{done.stdout}{done.stderr}")
        summaries[name] = {"command": "gradmap " + " ".join(command), "report": done.stdout.strip().splitlines(),
                           "bytes": (OUT / name).stat().st_size}
        print(f"{name}: {(OUT / name).stat().st_size / 1e3:.0f} kB")

    # TensorFlow's float64 values: the same weights in float64 models, stopped at the logits
    weights = model.get_weights()
    image = (rng.uniform(0, 255, (2, 3, *SIZE)) - np.asarray([103.939, 116.779, 123.68])[:, None, None])
    image = image.astype(np.float32)  # BGR, the ImageNet mean subtracted: what caffe mode feeds the model
    target = np.asarray([3, 7])
    x = tf.constant(image.transpose(0, 2, 3, 1).astype(np.float64))
    values = {"image": image, "target": target}
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        for rule, relu in _relus(tf).items():
            model64, features = build(keras, relu)
            model64.set_weights([w.astype(np.float64) for w in weights])
            model64.get_layer("scores").activation = keras.activations.linear
            both = keras.Model(model64.inputs, [model64.get_layer(features).output, model64.output])
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                feature_map, logits = both(x, training=False)
                chosen = tf.reduce_sum(tf.gather(logits, target[:, None], axis=1, batch_dims=1))
            values[f"gradient_{rule}"] = tape.gradient(chosen, x).numpy().transpose(0, 3, 1, 2)
            if rule == "vanilla":
                values["logits"] = logits.numpy()
                activation = feature_map.numpy()
                gradient = tape.gradient(chosen, feature_map).numpy()
                # Grad-CAM (Selvaraju et al. 2017) on the NHWC map: channel weights are the mean gradient
                weights_c = gradient.mean(axis=(1, 2), keepdims=True)
                values["cam_activation"] = activation.transpose(0, 3, 1, 2)
                values["cam_gradient"] = gradient.transpose(0, 3, 1, 2)
                values["grad_cam"] = np.maximum((weights_c * activation).sum(axis=-1), 0)
            del tape
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)
    np.savez_compressed(OUT / "cnn.npz", **values)
    manifest = {
        "model": "cnn.keras",
        "framework": f"tensorflow {tf.__version__}, keras {keras.__version__}, tf2onnx {tf2onnx.__version__}",
        "size": list(SIZE), "classes": CLASSES,
        "cam_layer": "features (the last ReLU's output: NHWC 12x16x16, whose width and channels are equal)",
        "reference": "tf.GradientTape on a float64 copy of cnn.keras (stopped before its softmax); guided and "
                     "deconvnet through a tf.custom_gradient ReLU; Grad-CAM = relu(sum_c mean_hw(dS/dA_c) A_c)",
        "exports": summaries,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    make()
