"""``gradmap export keras:NAME|PATH``: Keras models, exported through tf2onnx without torch.

    NAME      a ``keras.applications`` constructor (ResNet50, MobileNetV2, ...; any case)
    PATH      a saved model: ``.keras`` (loaded in Keras' safe mode: Lambda layers' code does not
              run), a legacy ``.h5`` model or a TensorFlow SavedModel directory (both can run code
              when they are loaded: only with ``trust_model``)
    weights   for NAME: ``imagenet`` (``DEFAULT``; from Keras' own cache, downloaded by Keras where
              the network allows), ``none`` (random, seeded) or a file (``.weights.h5``, a legacy
              ``.h5`` weights file, or a whole saved ``.keras`` model with the same architecture)

The model is converted with tf2onnx (opset 18) and its ONNX shapes inferred; from there the
bare-ONNX entrance (:func:`gradmap.export._foreign.prepare_classifier`) does the rest: the NHWC input
is fed from gradmap's NCHW ``image``, a trailing softmax is cut (``score`` decides what is
differentiated). Each application brings its own preprocessing (``preprocess_input`` of its module,
matched against :data:`gradmap.export.presets.PRESETS`); the export's preprocessing options override it.

The parity reference (:class:`KerasReference`) is TensorFlow's own: ``tf.GradientTape`` on a
float64 copy of the Keras model with the same weights. Imports tensorflow, keras and tf2onnx on use,
never torch.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from gradmap import contract
from gradmap.contract import ContractError, Preprocessing
from gradmap.graph import ExportError, ExportReport, ParityError

__all__ = ["KerasReference", "application_names", "export_keras", "load_keras", "load_reference"]

logger = logging.getLogger(__name__)

#: The opset tf2onnx writes (gradmap's own, :data:`gradmap.export._foreign.MIN_OPSET`).
TF2ONNX_OPSET = 18
_IMAGENET = ("IMAGENET", "DEFAULT", "PRETRAINED")
_TRUST_HINT = "pass --trust-model (trust_model=True) only if you trust where the file comes from"


def _frameworks():
    """tensorflow and keras, imported quietly, or an ImportError naming the extra."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(f"gradmap export keras:... needs TensorFlow and Keras ({e.name or e}): "
                          "pip install 'gradmap[keras]'", name=e.name) from e
    return tf, keras


# -- the model ------------------------------------------------------------------------------------

def application_names() -> dict[str, Any]:
    """Every ``keras.applications`` constructor, by name (``ResNet50``: the function)."""
    _, keras = _frameworks()
    names = {}
    for name in dir(keras.applications):
        value = getattr(keras.applications, name)
        if name[:1].isupper() and callable(value):
            names[name] = value
    return names


def _application(name: str):
    names = application_names()
    found = names.get(name) or next((f for n, f in names.items() if n.lower() == name.lower()), None)
    if found is None:
        raise ExportError(f"keras:{name}: not a keras.applications model (a saved model needs its file's path: "
                          f".keras, .h5 or a SavedModel directory); the applications are {', '.join(sorted(names))}")
    return found.__name__, found


@dataclass
class KerasModel:
    """A loaded Keras model and how it was made (for the report, the metadata and the reference)."""

    model: Any  # keras.Model, or a SavedModel's concrete function (``savedmodel``)
    source: str  # "keras:ResNet50" or "keras:model.keras"
    weights: str  # for the metadata: "imagenet", "random (seed 0)", "file x.weights.h5", "from model.keras"
    kind: str  # "application", "keras" (a .keras file), "h5", "savedmodel"
    preset: str | None  # the application's preprocessing preset; None for saved models
    input_size: tuple[int, int]
    channels: int
    notes: list[str] = field(default_factory=list)  # what the conversion changed (for the report)


def _seeded(keras, seed: int) -> None:
    keras.utils.set_random_seed(int(seed))


def _input_shape(input_size: tuple[int, int] | None, channels: int = 3):
    return None if input_size is None else (int(input_size[0]), int(input_size[1]), channels)


def _build_application(constructor, name: str, weights: str | None, input_size, seed: int):
    """``constructor(weights=weights, input_shape=...)``; Keras' own errors as ExportError."""
    tf, keras = _frameworks()
    shape = _input_shape(input_size)
    kwargs = {} if shape is None else {"input_shape": shape}
    if weights is None:
        _seeded(keras, seed)
    try:
        return constructor(weights=weights, **kwargs)
    except ValueError as e:
        size = "" if shape is None else f" at --input-size {shape[0]},{shape[1]}"
        raise ExportError(f"keras:{name}{size}: Keras refuses it: {str(e).strip()[:400]}") from e
    except Exception as e:  # the download: urllib / OSError / tf errors, whatever Keras raises offline
        if weights != "imagenet":
            raise
        cache = os.path.join(_keras_home(), "models")
        raise ExportError(
            f"keras:{name} --weights imagenet: the ImageNet weights are not in Keras' cache ({cache}) and Keras "
            f"could not download them ({type(e).__name__}: {str(e).strip()[:200]}). Download them where the network "
            f"is reachable (python -c 'import keras; keras.applications.{name}()') and copy the cache folder, or "
            "give a weights file with --weights PATH, or random weights with --weights none") from e


def _keras_home() -> str:
    try:
        from keras.src.backend import config

        return os.path.expanduser(config.keras_home())
    except (ImportError, AttributeError):
        return os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras"))


def _load_weights_into(model, path: str, trust_model: bool) -> str:
    """Weights from ``path`` into ``model``: a ``.weights.h5``/``.h5`` weights file, or a saved model."""
    _, keras = _frameworks()
    if not os.path.exists(path):
        raise ExportError(f"--weights {path}: no such file")
    try:
        if path.endswith(".keras"):
            donor = _load_saved_keras(path, trust_model)
            model.set_weights(donor.get_weights())
        elif path.endswith(".h5") or path.endswith(".hdf5"):
            model.load_weights(path)  # weights only: an HDF5 weights file holds no code
        else:
            raise ExportError(f"--weights {path}: give a .weights.h5 file, a legacy .h5 weights file or a .keras "
                              "model of the same architecture")
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"--weights {path}: Keras cannot load these weights into this model: "
                          f"{str(e).strip()[:400]}") from e
    return f"file {os.path.basename(path)}"


def _load_saved_keras(path: str, trust_model: bool):
    _, keras = _frameworks()
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=not trust_model)
    except Exception as e:
        text = str(e).strip()
        if "safe_mode" in text or "unsafe" in text.lower():
            raise ExportError(f"{path}: Keras' safe mode refused it: the model holds Python code (a Lambda layer) "
                              f"that would run on loading. {_TRUST_HINT}") from e
        raise ExportError(f"{path}: Keras cannot load it: {text[:400]}") from e


def load_keras(spec: str, *, weights: str = "DEFAULT", seed: int = 0, input_size: tuple[int, int] | None = None,
               trust_model: bool = False) -> KerasModel:
    """The Keras model that ``keras:NAME|PATH`` (``spec``, without the prefix too) names.

    Raises:
        ExportError: unknown name, missing or refused file (a legacy ``.h5`` model or a SavedModel without
            ``trust_model``; a ``.keras`` file whose Lambda code safe mode will not run), weights Keras
            cannot find or load.
    """
    tf, keras = _frameworks()
    spec = spec[len("keras:"):] if spec.startswith("keras:") else spec
    looks_like_path = os.sep in spec or spec.endswith((".keras", ".h5", ".hdf5")) or os.path.exists(spec)
    if not looks_like_path:
        name, constructor = _application(spec)
        w = str(weights)
        if w.upper() in _IMAGENET:
            model, label = _build_application(constructor, name, "imagenet", input_size, seed), "imagenet"
        elif w.lower() == "none":
            model, label = _build_application(constructor, name, None, input_size, seed), f"random (seed {seed})"
        else:
            model = _build_application(constructor, name, None, input_size, seed)
            label = _load_weights_into(model, w, trust_model)
        size, channels = _model_input(model, f"keras:{name}")
        return KerasModel(model=model, source=f"keras:{name}", weights=label, kind="application",
                          preset=application_preset(constructor), input_size=size, channels=channels)

    path = spec
    source = f"keras:{os.path.basename(os.path.normpath(path))}"
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ExportError(f"{path}: a directory without saved_model.pb is not a TensorFlow SavedModel")
        if not trust_model:
            raise ExportError(f"{path}: a TensorFlow SavedModel runs the graph functions it contains when it is "
                              f"loaded and called (they may read and write files); {_TRUST_HINT}")
        kind, model = "savedmodel", _load_saved_model(path)
    elif path.endswith((".h5", ".hdf5")):
        if not trust_model:
            raise ExportError(f"{path}: a legacy HDF5 Keras model can run code when it is loaded (Lambda layers are "
                              f"stored as Python bytecode, and Keras' safe mode does not cover this format); "
                              f"{_TRUST_HINT}, or save it as .keras")
        kind = "h5"
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as e:
            raise ExportError(f"{path}: Keras cannot load it: {str(e).strip()[:400]}") from e
    elif path.endswith(".keras"):
        kind, model = "keras", _load_saved_keras(path, trust_model)
    else:
        raise ExportError(f"{path}: not a Keras model (give a .keras file, a legacy .h5 model or a SavedModel "
                          "directory)")
    label = f"from {os.path.basename(os.path.normpath(path))}"
    if str(weights).upper() not in _IMAGENET:
        if kind == "savedmodel":
            raise ExportError(f"--weights {weights}: a SavedModel brings its own weights")
        label = _load_weights_into(model, str(weights), trust_model)
    if kind == "savedmodel":
        size, channels = _signature_input(model, path, input_size)
    else:
        size, channels = _model_input(model, source, input_size)
    return KerasModel(model=model, source=source, weights=label, kind=kind, preset=None, input_size=size,
                      channels=channels)


def _load_saved_model(path: str):
    tf, _ = _frameworks()
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:
        raise ExportError(f"{path}: TensorFlow cannot load this SavedModel: {str(e).strip()[:400]}") from e
    signatures = getattr(loaded, "signatures", {}) or {}
    if "serving_default" not in signatures:
        raise ExportError(f"{path}: the SavedModel has no 'serving_default' signature (it has: "
                          f"{', '.join(signatures) or 'none'})")
    function = signatures["serving_default"]
    function._gradmap_keep = loaded  # the function needs its object alive
    return function


def _model_input(model, source: str, input_size: tuple[int, int] | None = None) -> tuple[tuple[int, int], int]:
    shapes = model.input_shape if hasattr(model, "input_shape") else None
    if isinstance(shapes, list):
        if len(shapes) != 1:
            raise ExportError(f"{source}: the model has {len(shapes)} inputs; gradmap needs one image input")
        shapes = shapes[0]
    if shapes is None or len(shapes) != 4:
        raise ExportError(f"{source}: the model's input has shape {shapes}; gradmap needs an image "
                          "[batch, height, width, channels]")
    _, height, width, channels = shapes
    if channels not in (1, 3):
        raise ExportError(f"{source}: the model's input has {channels} channels (shape {shapes}); gradmap needs "
                          "1 or 3, channels last")
    if height is None or width is None:
        if input_size is None:
            raise ExportError(f"{source}: the model's input height and width are not fixed (shape {shapes}): "
                              "give them with --input-size H,W")
        height, width = input_size
    elif input_size is not None and tuple(input_size) != (height, width):
        raise ExportError(f"{source}: the model takes {height}x{width} pictures, not the --input-size "
                          f"{input_size[0]}x{input_size[1]}")
    return (int(height), int(width)), int(channels)


def _signature_input(function, path: str, input_size) -> tuple[tuple[int, int], int]:
    tf, _ = _frameworks()
    specs = [s for s in tf.nest.flatten(function.structured_input_signature) if isinstance(s, tf.TensorSpec)]
    if len(specs) != 1 or specs[0].shape.rank != 4:
        raise ExportError(f"{path}: the serving signature takes {[str(s.shape) for s in specs]}; gradmap needs one "
                          "image [batch, height, width, channels]")
    _, height, width, channels = specs[0].shape.as_list()
    if channels not in (1, 3):
        raise ExportError(f"{path}: the serving signature's input has {channels} channels; gradmap needs 1 or 3, "
                          "channels last")
    if height is None or width is None:
        if input_size is None:
            raise ExportError(f"{path}: the input's height and width are not fixed: give them with --input-size H,W")
        height, width = input_size
    return (int(height), int(width)), int(channels)


# -- preprocessing --------------------------------------------------------------------------------

#: black, and each channel alone at full scale: enough to tell every preset apart
_PROBE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [64, 128, 192]], np.float32).reshape(1, 5, 1, 3)


def _apply_preset(name: str, pixels: np.ndarray) -> np.ndarray:
    """What preset ``name``'s normalization makes of RGB 0-255 ``pixels`` [..., 3] (the channels
    in the tensor's order)."""
    from .presets import preset

    p = preset(name, (1, 1))
    x = pixels.astype(np.float64)
    if p.value_range == "0-1":
        x = x / 255.0
    if p.channel_order == "bgr":
        x = x[..., ::-1]
    return (x - np.asarray(p.mean)) / np.asarray(p.std)


def application_preset(constructor) -> str | None:
    """The preset that equals the ``preprocess_input`` of ``constructor``'s module (probed on a few
    pixels: caffe, tf, torch or a pass-through), or None when none does."""
    module = sys.modules.get(constructor.__module__)
    function = getattr(module, "preprocess_input", None)
    if function is None:
        return None
    expected = np.asarray(function(_PROBE.copy()), np.float64)
    for name in ("keras-caffe", "keras-tf", "keras-torch", "none"):
        if np.allclose(_apply_preset(name, _PROBE), expected, rtol=1e-6, atol=1e-4):
            return name
    return None


# -- conversion -----------------------------------------------------------------------------------

def to_onnx(loaded: KerasModel, opset: int = TF2ONNX_OPSET):
    """The model as an ONNX ModelProto (tf2onnx, NHWC input ``image`` of fixed height and width)."""
    tf, _ = _frameworks()
    try:
        import tf2onnx
    except ImportError as e:
        raise ImportError(f"gradmap export keras:... needs tf2onnx ({e.name or e}): pip install 'gradmap[keras]'",
                          name=e.name) from e
    height, width = loaded.input_size
    spec = (tf.TensorSpec((None, height, width, loaded.channels), tf.float32, name="image"),)
    model = loaded.model
    if loaded.kind != "savedmodel":
        model, rewritten = depthwise_rewrite(model, loaded.source)
        if rewritten:
            note = (f"{len(rewritten)} grouped Conv2D layer{'s' if len(rewritten) != 1 else ''} with one group per input "
                    f"channel (first: {rewritten[0]}) rebuilt as DepthwiseConv2D with the same weights before "
                    "conversion (Keras runs a grouped Conv2D as an XLA-compiled function tf2onnx cannot convert)")
            if note not in loaded.notes:
                loaded.notes.append(note)
    quiet = logging.getLogger("tf2onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if loaded.kind == "savedmodel":
            with _keeping_transposes():  # from_function takes no optimizers argument
                proto, _ = tf2onnx.convert.from_function(_serving_function(loaded), input_signature=spec, opset=opset)
        else:
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, optimizers=_optimizers())
    except Exception as e:
        raise ExportError(f"{loaded.source}: tf2onnx cannot convert it: {type(e).__name__}: "
                          f"{str(e).strip()[:400]}") from e
    finally:
        quiet.setLevel(level)
    gc.collect()  # the TensorFlow graphs and tf2onnx's copies of the constants
    _rewrite_tensorflow_ops(proto, loaded.source)
    return proto


def _optimizers():
    """tf2onnx's own graph optimizers, except that its transpose optimizer leaves Transposes as Transposes.

    After moving Transposes through the graph, tf2onnx's transpose optimizer replaces each Transpose
    that only moves axes of size 1 (NHWC <-> NCHW of a 1x1 feature map, or of one channel) with a
    Reshape whose shape it computes from the shape it has recorded for the Transpose's input. A node
    the optimizer has just moved a Transpose across can keep its old layout's recorded shape, and the
    Reshape then scrambles the tensor: ConvNeXt's LayerNormalization after a depthwise convolution on
    a 1x1 map (a 32x32 input's last stage) read a [N, 1, 1, C] tensor as [N, 1, C, 1] and normalized
    each channel over itself. Keeping the Transpose (which needs no shape) is exact; on a map with
    axes of size 1 it moves as little data as the Reshape would."""
    from collections import OrderedDict

    from tf2onnx import optimizer
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    class KeepTransposes(TransposeOptimizer):
        def post_optimize_action(self):
            pass

    def collecting(factory):
        # tf2onnx deep-copies the whole graph, constants included, before each optimizer and drops the copy
        # in reference cycles; collecting them before the next copy keeps memory at a few copies (ConvNeXtTiny
        # at 32x32: a 5.8 GB peak without, far more on the larger models)
        def make():
            gc.collect()
            return factory()

        return make

    return OrderedDict((name, collecting(KeepTransposes if factory is TransposeOptimizer else factory))
                       for name, factory in optimizer._get_optimizers().items())


@contextlib.contextmanager
def _keeping_transposes():
    """tf2onnx's default optimizers are :func:`_optimizers` while converting (for its conversions that
    take no ``optimizers`` argument)."""
    from tf2onnx import optimizer

    saved = optimizer._optimizers
    optimizer._optimizers = _optimizers()
    try:
        yield
    finally:
        optimizer._optimizers = saved


def depthwise_rewrite(model, source: str = "keras"):
    """``model`` with each grouped ``Conv2D`` whose groups equal its input channels (a depthwise
    convolution written as a grouped one, as ConvNeXt's blocks are) rebuilt as the equivalent
    ``DepthwiseConv2D`` with the same weights, and the rewritten layers' names; ``(model, [])`` when
    there is none.

    Why: Keras' TensorFlow backend runs any convolution whose kernel does not span all input channels
    inside ``tf.function(jit_compile=True)`` (grouped convolutions are broken on TensorFlow's CPU
    kernels); grappler does not inline a function that must be XLA-compiled, so tf2onnx is left with a
    ``StatefulPartitionedCall`` it cannot convert. A depthwise layer is TensorFlow's
    ``DepthwiseConv2dNative``, which tf2onnx converts to a grouped ONNX ``Conv``.

    The kernels are the same numbers: a grouped kernel ``[kh, kw, 1, C * M]`` (output channel
    ``c * M + m`` reads input channel ``c``) is the depthwise kernel ``[kh, kw, C, M]`` in the same
    memory order. The layers without groups are shared with ``model`` (the same weights), nested
    Functional and Sequential models are rewritten inside. Other grouped convolutions (several
    input channels per group) are an ExportError naming the layer.
    """
    _, keras = _frameworks()
    conv2d = keras.layers.Conv2D

    def layers_of(m):
        for layer in getattr(m, "layers", []):
            yield layer
            if isinstance(layer, keras.Model):
                yield from layers_of(layer)

    grouped = [layer for layer in layers_of(model) if type(layer) is conv2d and int(getattr(layer, "groups", 1)) > 1]
    if not grouped:
        return model, []
    general = [layer for layer in grouped if int(layer.kernel.shape[-2]) != 1]
    if general:
        layer = general[0]
        raise ExportError(
            f"{source}: layer '{layer.name}' is a Conv2D with groups={layer.groups} over "
            f"{int(layer.kernel.shape[-2]) * int(layer.groups)} input channels; Keras runs a grouped convolution as "
            "an XLA-compiled TensorFlow function, which tf2onnx cannot convert, and gradmap rebuilds only the "
            "depthwise case (groups equal to the input channels) as a DepthwiseConv2D")
    ids = {id(layer) for layer in grouped}
    def clone(layer):
        if id(layer) not in ids:
            return layer  # shared: the same layer, the same weights
        kernel, *rest = layer.get_weights()
        height, width, _, filters = kernel.shape
        channels = int(layer.groups)
        depthwise = keras.layers.DepthwiseConv2D(
            layer.kernel_size, strides=layer.strides, padding=layer.padding, depth_multiplier=filters // channels,
            data_format=layer.data_format, dilation_rate=layer.dilation_rate, activation=layer.activation,
            use_bias=layer.use_bias, name=layer.name, dtype=layer.dtype_policy)
        shape = (None, None, None, channels) if layer.data_format == "channels_last" else (None, channels, None, None)
        depthwise.build(shape)
        depthwise.set_weights([kernel.reshape(height, width, channels, filters // channels), *rest])
        return depthwise

    try:
        rebuilt = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as e:
        raise ExportError(f"{source}: layer '{grouped[0].name}' is a grouped Conv2D, which tf2onnx cannot convert, and "
                          f"Keras cannot rebuild the model with a DepthwiseConv2D: {str(e).strip()[:300]}") from e
    return rebuilt, [layer.name for layer in grouped]


def _rewrite_tensorflow_ops(proto, source: str) -> None:
    """TensorFlow ops tf2onnx leaves as they are (no ONNX op of that name), written in ONNX ops; any
    other such op is an ExportError naming it.

        Erfc(x) = 1 - Erf(x)   (Keras' exact GELU, as in ConvNeXt; the difference from erfc in float32
                                is below 1e-7 absolute, where GELU multiplies it by x)
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    unknown: dict[str, str] = {}
    for n in graph.node:
        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type) and n.op_type != "Erfc":
            unknown.setdefault(n.op_type, n.name)
    if unknown:
        why = ""
        if "StatefulPartitionedCall" in unknown:
            why = (" (a TensorFlow function call tf2onnx cannot inline, such as the XLA-compiled function Keras runs "
                   "a grouped Conv2D in; gradmap rebuilds a Keras model's depthwise ones before conversion, not a "
                   "SavedModel's)")
        raise ExportError(f"{source}: tf2onnx left TensorFlow ops it cannot convert: "
                          + ", ".join(f"{op} (first: {name})" for op, name in sorted(unknown.items())) + why)
    nodes = []
    one = None
    for node in graph.node:
        if node.op_type != "Erfc" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        if one is None:
            one = f"{node.name}__gradmap_one"
            graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
        erf = f"{node.output[0]}__gradmap_erf"
        nodes.append(helper.make_node("Erf", [node.input[0]], [erf], name=f"{node.name}__erf"))
        nodes.append(helper.make_node("Sub", [one, erf], list(node.output), name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)


def _serving_function(loaded: KerasModel):
    """A SavedModel's serving signature as a tf.function of one image tensor and one output."""
    tf, _ = _frameworks()
    signature = loaded.model
    args, kwargs = signature.structured_input_signature
    (key,) = kwargs.keys() if kwargs else (None,)
    outputs = signature.structured_outputs
    if isinstance(outputs, dict) and len(outputs) != 1:
        raise ExportError(f"{loaded.source}: the serving signature has {len(outputs)} outputs "
                          f"({', '.join(outputs)}); gradmap needs the one score output")

    @tf.function
    def serve(image):
        result = signature(**{key: image}) if key is not None else signature(image)
        return next(iter(result.values())) if isinstance(result, dict) else result

    return serve


# -- the float64 reference ------------------------------------------------------------------------

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "mixed_float16", "mixed_bfloat16")


def _retyped(config: Any) -> Any:
    """``config`` (a serialized Keras model) with every float dtype and dtype policy made float64."""
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and isinstance(value, str) and value in _FLOAT_NAMES:
                out[key] = "float64"
            elif key == "dtype" and isinstance(value, dict) and "Policy" in str(value.get("class_name", "")):
                out[key] = {**value, "class_name": "DTypePolicy", "config": {**value.get("config", {}),
                                                                             "name": "float64"}}
            else:
                out[key] = _retyped(value)
        return out
    if isinstance(config, list):
        return [_retyped(v) for v in config]
    return config


def _linear_head(config: dict, source: str) -> None:
    """Make the layer producing the model's output stop at the logits (in place): a softmax activation
    becomes linear, a Softmax layer an identity."""
    inner = config.get("config", {})
    layers = inner.get("layers", [])
    if config.get("class_name") == "Sequential":
        candidates = [layers[-1]] if layers else []
    else:
        outputs = inner.get("output_layers")
        names = []

        def collect(o):
            if isinstance(o, list) and o and isinstance(o[0], str):
                names.append(o[0])
            elif isinstance(o, (list, tuple)):
                for x in o:
                    collect(x)
            elif isinstance(o, dict):
                for x in o.values():
                    collect(x)

        collect(outputs)
        candidates = [layer for layer in layers if layer.get("name", layer.get("config", {}).get("name")) in names]
    for layer in candidates:
        layer_config = layer.get("config", {})
        if layer.get("class_name") == "Softmax":
            layer["class_name"], layer["module"] = "Activation", "keras.layers"
            layer["registered_name"] = None
            layer_config.pop("axis", None)
            layer_config["activation"] = "linear"
            return
        if layer_config.get("activation") in ("softmax", "log_softmax"):
            layer_config["activation"] = "linear"
            return
    raise ExportError(f"{source}: the exported graph ends in a softmax, but its Keras layer was not found for the "
                      "float64 reference; export with --no-verify")


@contextlib.contextmanager
def _float64_keras():
    _, keras = _frameworks()
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield keras
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def float64_copy(model, *, linear_head: bool, source: str = "keras", trust_model: bool = False):
    """A float64 copy of the Keras ``model`` with the same weights (cast), optionally stopped before
    its softmax; an ExportError when Keras keeps a float32 layer."""
    _, keras = _frameworks()
    serialized = keras.saving.serialize_keras_object(model)
    config = _retyped(copy.deepcopy(serialized))
    if linear_head:
        _linear_head(config, source)
    with _float64_keras():
        try:
            copy64 = keras.saving.deserialize_keras_object(config, safe_mode=not trust_model)
        except Exception as e:
            raise ExportError(f"{source}: Keras cannot rebuild the model in float64 for the parity reference "
                              f"({str(e).strip()[:300]}); export with --no-verify") from e
    weights = model.get_weights()
    copy64.set_weights([w.astype(np.float64) if np.issubdtype(w.dtype, np.floating) else w for w in weights])
    probe = keras.ops.convert_to_numpy(copy64(np.zeros((1, *copy64.input_shape[1:]), np.float64), training=False))
    if probe.dtype != np.float64:
        raise ExportError(f"{source}: Keras rebuilt the model with {probe.dtype} outputs, not float64, for the parity "
                          "reference; export with --no-verify")
    return copy64


class KerasReference:
    """TensorFlow's own gradient (``tf.GradientTape``) of a float64 copy of a Keras model, the parity
    reference of ``keras:`` exports (the :class:`gradmap.export._onnx_reference.OnnxReference` interface:
    ``run``, ``run_float32``, ``name``, ``notes``).

    Args:
        model: the Keras model as exported (float32).
        cut: ``"Softmax"`` / ``"LogSoftmax"`` when the export cut the model's trailing softmax: the
            reference then stops at the logits too.
        channels: the model's input channels (1: it reads the luma of the RGB ``image``, as the export).
        forward: the exported forward graph, whose float64 evaluation serves guided backpropagation and
            deconvnet (TensorFlow has no such rules; its vanilla gradient checks that graph).
    """

    name = "float64 Keras model (tf.GradientTape)"
    own = "TensorFlow"  # whose float32 run the parity policy measures

    def __init__(self, model, *, cut: str | None = None, channels: int = 3, forward=None, source: str = "keras",
                 trust_model: bool = False):
        self._model32 = model
        self._model64 = float64_copy(model, linear_head=cut is not None, source=source, trust_model=trust_model)
        self._linear32 = None if cut is None else _float32_twin(model, self._model64, trust_model)
        self._channels = channels
        self._forward = forward
        self._onnx = None
        self.notes: list[str] = []

    def _gradients(self, model, images, target_index, score, dtype):
        tf, _ = _frameworks()
        x = tf.constant(np.asarray(images, dtype=dtype))
        rows = np.asarray(target_index, np.int64)
        with tf.GradientTape() as tape:
            tape.watch(x)
            nhwc = tf.transpose(x, (0, 2, 3, 1))
            if self._channels == 1:
                from ._foreign import LUMA

                nhwc = tf.reduce_sum(nhwc * tf.constant(np.asarray(LUMA, dtype)), axis=-1, keepdims=True)
            out = model(nhwc, training=False)
            logits = tf.reshape(out, (tf.shape(out)[0], -1))
            if score == "probability":
                values = tf.nn.softmax(logits, axis=-1)
            elif score == "log_probability":
                values = tf.nn.log_softmax(logits, axis=-1)
            else:
                values = logits
            total = tf.reduce_sum(tf.gather(values, rows[:, None], axis=1, batch_dims=1))
        gradient = tape.gradient(total, x)
        return np.asarray(logits.numpy(), np.float64), np.asarray(gradient.numpy(), np.float64)

    def _runs(self, model, images, target_index, score, backprops, dtype):
        from ._onnx_reference import ReferenceRun

        logits, gradient = self._gradients(model, images, target_index, score, dtype)
        gradients = {"vanilla": gradient}
        others = [b for b in backprops if b != "vanilla"]
        if others:
            if self._forward is None:
                raise ParityError(f"the Keras reference has no {', '.join(others)} rule (TensorFlow's gradient is "
                                  "the vanilla one); export with --no-verify")
            from ._onnx_reference import OnnxReference

            if self._onnx is None:
                self._onnx = OnnxReference(self._forward)
                self.notes.append(f"{', '.join(others)}: compared with the float64 evaluation of the converted graph, "
                                  "whose vanilla gradient TensorFlow's checks")
            run = (self._onnx.run if dtype == np.float64 else self._onnx.run_float32)(
                images, target_index, score=score, backprops=tuple(backprops))
            gradients.update({b: run.gradients[b] for b in others})
        return ReferenceRun(logits=logits, gradients=gradients)

    def logits(self, images: np.ndarray, *, float32: bool = False) -> np.ndarray:
        """float64 logits of ``images``; ``float32``: TensorFlow's own float32 run of the model as exported."""
        dtype = np.float32 if float32 else np.float64
        model = (self._linear32 if self._linear32 is not None else self._model32) if float32 else self._model64
        nhwc = np.transpose(np.asarray(images, dtype), (0, 2, 3, 1))
        if self._channels == 1:
            from ._foreign import LUMA

            nhwc = (nhwc * np.asarray(LUMA, dtype)).sum(axis=-1, keepdims=True)
        return np.asarray(model(nhwc, training=False), np.float64).reshape(len(images), -1)

    def run(self, images: np.ndarray, target_index: np.ndarray, *, score: str, backprops=("vanilla",),
            decisions=None):
        """float64 logits and gradients (NCHW, w.r.t. ``image``) of float32 NCHW ``images`` for the
        classes ``target_index``. ``decisions`` is accepted and not replayed."""
        backprops = tuple(dict.fromkeys(["vanilla", *backprops]))
        return self._runs(self._model64, images, target_index, score, backprops, np.float64)

    def run_float32(self, images: np.ndarray, target_index: np.ndarray, *, score: str, backprops=("vanilla",),
                    decisions=None):
        """TensorFlow's own float32 run of the model as exported: the rounding the tolerance allows for."""
        backprops = tuple(dict.fromkeys(["vanilla", *backprops]))
        model = self._linear32 if self._linear32 is not None else self._model32
        return self._runs(model, images, target_index, score, backprops, np.float32)


def _float32_twin(model, like, trust_model: bool = False):
    """The float32 twin of ``like`` (a float64 copy, maybe stopped before the softmax) with ``model``'s
    weights: TensorFlow's own float32 logits where the export cut a softmax."""
    _, keras = _frameworks()
    config = keras.saving.serialize_keras_object(like)

    def to32(c):
        if isinstance(c, dict):
            out = {}
            for k, v in c.items():
                if k == "dtype" and v == "float64":
                    out[k] = "float32"
                elif k == "dtype" and isinstance(v, dict) and "Policy" in str(v.get("class_name", "")):
                    out[k] = {**v, "config": {**v.get("config", {}), "name": "float32"}}
                else:
                    out[k] = to32(v)
            return out
        if isinstance(c, list):
            return [to32(v) for v in c]
        return c

    twin = keras.saving.deserialize_keras_object(to32(copy.deepcopy(config)), safe_mode=not trust_model)
    twin.set_weights(model.get_weights())
    return twin


# -- the export -----------------------------------------------------------------------------------

def export_keras(
    spec: str,
    output: str | os.PathLike | None,
    *,
    weights: str = "DEFAULT",
    seed: int = 0,
    trust_model: bool = False,
    input_size: tuple[int, int] | None = None,
    labels: str | Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    preprocessing_options: Mapping[str, Any] | None = None,
    score: str = "logit",
    opset: int = 18,
    verify: bool = True,
    backprops: Sequence[str] = ("vanilla",),
    cam_layer: str | None = None,
    target: str = "portable",
    channel_multiple: int | None = None,
    external_data: bool = False,
    input_name: str | None = None,
    output_name: str | None = None,
    layout: str | None = None,
    gradient: bool = True,
) -> ExportReport:
    """Export the Keras model ``spec`` (``NAME`` or ``PATH``, see the module doc; ``gradmap export --help``).

    Args:
        weights, seed, trust_model, input_size: see :func:`load_keras` (``input_size`` builds an
            application at that size, where Keras allows it, or fixes a saved model's free size).
        preprocessing: the whole preprocessing; else the application's own convention with
            ``preprocessing_options`` (``preset_name`` and field overrides) on top; a saved model needs
            ``preset_name``.
        The other arguments are :func:`gradmap.export._onnx_file.export_onnx`'s.

    Example:
        >>> export_keras("MobileNetV2", "mobilenetv2.onnx", weights="none", input_size=(96, 96))
    """
    from ._foreign import export_graph, prepare_classifier
    from ._onnx_file import _labels

    start = time.perf_counter()
    if input_name or output_name or layout:
        raise ExportError("--input-name, --output-name and --layout are for onnx:PATH models; a Keras model has one "
                          "image input and one output")
    options = dict(preprocessing_options or {})
    if input_size is None and options.get("crop") is not None:
        crop = options["crop"]
        input_size = (crop, crop) if isinstance(crop, int) else tuple(crop)
    loaded = load_keras(spec, weights=weights, seed=seed, input_size=input_size, trust_model=trust_model)
    proto = to_onnx(loaded)
    graph = prepare_classifier(proto, layout="nhwc", input_size=loaded.input_size, score=score, opset=opset)
    del proto
    graph.notes.insert(0, f"converted from Keras with tf2onnx (opset {TF2ONNX_OPSET})")
    graph.notes[1:1] = loaded.notes
    if preprocessing is None:
        from .presets import preset, resolve

        base = None
        if loaded.preset is not None and options.get("preset_name") is None:
            base = preset(loaded.preset, graph.input_size)
            graph.notes.append(f"preprocessing: the application's own ({loaded.preset} preset)")
        try:
            preprocessing = resolve(base, graph.input_size, **options)
        except ContractError as e:
            raise ExportError(f"{loaded.source}: {e}") from e
    cam_label = cam_layer
    if cam_layer not in (None, "auto"):
        cam_layer = keras_cam_layer(loaded, graph, cam_layer)
    reference = None
    if verify:
        if loaded.kind == "savedmodel":
            graph.notes.append("a SavedModel cannot be rebuilt in float64: the parity reference is the float64 "
                               "evaluation of the converted graph")
        else:
            reference = KerasReference(loaded.model, cut=graph.cut, channels=loaded.channels,
                                       forward=_forward_copy(graph) if any(b != "vanilla" for b in backprops) else None,
                                       source=loaded.source, trust_model=trust_model)
    extra = {"keras_kind": loaded.kind, "keras_weights": str(weights), "keras_seed": int(seed)}
    report = export_graph(graph, output, preprocessing=preprocessing, labels=_labels(labels),
                          source_model=loaded.source, weights=loaded.weights, score=score, backprops=backprops,
                          cam_layer=cam_layer, cam_label=cam_label, target=target, channel_multiple=channel_multiple,
                          external_data=external_data, verify=verify, reference=reference, extra=extra,
                          gradient=gradient)
    report.seconds = time.perf_counter() - start
    return report


def keras_cam_layer(loaded: KerasModel, graph, name: str) -> str:
    """The converted graph's NCHW value for ``--cam-layer NAME``: an ONNX value name as it is, or a Keras
    layer's output.

    tf2onnx's node names do not identify a layer: they carry a scope Keras made unique again when it traced
    the model (layer ``max_pooling2d_1`` is in scope ``max_pooling2d_1_2``, beside ``max_pooling2d``'s
    ``max_pooling2d_1``), and a folded layer (a BatchNormalization merged into its Conv) has none. So the
    layer's output is found by its values: the graph's 4-D values on the path to the logits are evaluated
    on a probe picture with onnxruntime and compared with the Keras layer's NHWC output; the first value
    equal to it in NCHW is taken, else the first equal in NHWC, with an NCHW view spliced in (the maps
    stay NCHW). An NHWC map whose height, width and channels are equal is told apart by its values too.

    Raises:
        ExportError: the layer's output is not a feature map [batch, height, width, channels], or no value
            of the graph equals it (the message lists the layers that can be taken).
    """
    import onnxruntime as ort
    import onnx_ir as ir

    from gradmap.graph.gradient._pass import differentiable_nodes

    from ._foreign import LUMA, _nchw_side

    model_graph = graph.model.graph
    image, logits = model_graph.inputs[0], model_graph.outputs[0]
    nodes, _ = differentiable_nodes(model_graph, image, logits)
    if any(o.name == name for n in nodes for o in n.outputs):
        return name  # an ONNX value name: the bare-ONNX entrance takes it
    keras_model = loaded.model
    layers = {layer.name: layer for layer in getattr(keras_model, "layers", [])}
    nested = None if loaded.kind == "savedmodel" or name in layers else _nested_owner(keras_model, name)
    if nested is not None:  # a layer of a base model that is one layer of the classifier (transfer learning)
        owner = layers[nested]
        inner = {child.name: child for child in owner.layers}.get(name)
        if inner is None:
            raise ExportError(f"--cam-layer {name!r}: the layer is two or more models deep (inside {nested!r}); take "
                              f"--cam-layer auto, a layer of {nested!r}, or an ONNX value name")
        layers = {name: inner}
    if loaded.kind == "savedmodel" or name not in layers:
        maps = [n for n, layer in layers.items() if _output_rank(layer) == 4 and type(layer).__name__ != "InputLayer"] \
            if loaded.kind != "savedmodel" else []
        what = (f"a layer of the Keras model (its feature maps: {', '.join(maps)})" if maps else
                "a layer of the model (a SavedModel's layers are not known: give an ONNX value name)")
        raise ExportError(f"--cam-layer {name!r}: neither {what} nor a value on the converted graph's path to the "
                          "logits")
    layer = layers[name]
    if _output_rank(layer) != 4:
        shape = getattr(layer, "output", None)
        shape = None if shape is None or isinstance(shape, (list, tuple)) else tuple(shape.shape)
        raise ExportError(f"--cam-layer {name!r}: the layer's output has shape {shape}; Grad-CAM needs one feature "
                          "map [batch, height, width, channels]")
    _, keras = _frameworks()
    height, width = loaded.input_size
    probe = np.random.default_rng(0).uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
    nhwc = probe.transpose(0, 2, 3, 1)
    if loaded.channels == 1:
        nhwc = (nhwc * np.asarray(LUMA, np.float32)).sum(axis=-1, keepdims=True)
    if nested is None:
        wanted = _layer_output_model(keras, keras_model, layer, name)(nhwc, training=False)
    else:  # the base model's input in the classifier, then the layer's output in the base model
        base_input = _layer_output_model(keras, keras_model, owner, nested, inputs=True)(nhwc, training=False)
        wanted = keras.Model(owner.input, layer.output)(base_input, training=False)
    wanted = np.asarray(wanted, np.float64)
    scale = float(np.abs(wanted).max())
    if not scale > 0:
        raise ExportError(f"--cam-layer {name!r}: the layer's output is zero on a probe picture, so it cannot be found "
                          "in the converted graph; give its ONNX value name")
    candidates = [o for n in nodes for o in n.outputs if o.shape is not None and len(o.shape) == 4 and
                  o.name and o is not logits]
    proto = ir.serde.serialize_model(graph.model)
    del proto.graph.output[:]
    for value in candidates:
        proto.graph.output.add().name = value.name
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    results = session.run([v.name for v in candidates], {image.name: probe})
    found = {"nchw": None, "nhwc": None}
    for value, result in zip(candidates, results):
        for layout, view in (("nchw", wanted.transpose(0, 3, 1, 2)), ("nhwc", wanted)):
            if found[layout] is None and result.shape == view.shape and \
                    np.abs(result - view).max() <= 1e-4 * scale:
                found[layout] = value
    if found["nchw"] is not None:
        return found["nchw"].name
    if found["nhwc"] is not None:
        return _nchw_side(model_graph, found["nhwc"], nhwc=True)
    raise ExportError(f"--cam-layer {name!r}: no value of the converted graph equals the layer's output (tf2onnx "
                      "merged it into another op, as a Conv2D followed by BatchNormalization is): take the layer after it")


def _layer_output_model(keras, model, layer, name: str, inputs: bool = False):
    """A Keras model from ``model``'s input to ``layer``'s output in it (``inputs``: to its input). A nested
    model's ``output`` is its own graph's, not connected to the outer input: its call in the outer model
    is one of its inbound nodes (Keras 3 keeps them in ``_inbound_nodes``; no public accessor)."""
    outputs = [] if inputs else [layer.output]
    for node in getattr(layer, "_inbound_nodes", []):
        outputs += list(getattr(node, "input_tensors" if inputs else "output_tensors", []))
    for output in outputs:
        try:
            return keras.Model(model.input, output)
        except ValueError:  # not connected to the model's input
            continue
    raise ExportError(f"--cam-layer {name!r}: Keras cannot evaluate the layer's {'input' if inputs else 'output'} from "
                      "the model's input; take --cam-layer auto, another layer, or an ONNX value name")


def _nested_owner(model, name: str) -> str | None:
    """The name of the top-level layer of ``model`` (a nested model) that holds a layer ``name``, if any."""
    def holds(layer) -> bool:
        inner = getattr(layer, "layers", None) or []
        return any(child.name == name or holds(child) for child in inner)

    return next((layer.name for layer in getattr(model, "layers", []) if holds(layer)), None)


def _output_rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, TypeError, ValueError):  # no output yet, or several
        return None


def _forward_copy(graph):
    import onnx_ir as ir

    return ir.serde.serialize_model(graph.model)


def load_reference(spec: str, *, metadata=None, weights: str | None = None, seed: int | None = None,
                   trust_model: bool = False, input_size: tuple[int, int] | None = None, **_ignored):
    """The float64 reference of ``keras:NAME|PATH`` for ``gradmap verify`` (the interface of
    :func:`gradmap.export._onnx_file.load_reference`): the Keras model rebuilt as the export built it
    (the written model's metadata names its weights, seed and input size, and whether a softmax was
    cut), as a :class:`KerasReference`. ``weights`` ``DEFAULT`` and ``seed`` 0 take the recorded ones."""
    extra = dict(metadata.extra) if metadata is not None else {}
    if metadata is not None:
        input_size = input_size or tuple(metadata.preprocessing.crop)
    # the defaults (``gradmap verify`` passes DEFAULT and 0 when not told otherwise) defer to what the
    # export recorded: random weights are rebuilt from their seed, a weights file from its path
    if weights is None or str(weights).upper() == "DEFAULT":
        weights = extra.get("keras_weights", "DEFAULT")
    if seed is None or (seed == 0 and "keras_seed" in extra):
        seed = int(extra.get("keras_seed", 0))
    loaded = load_keras(spec, weights=weights, seed=seed, input_size=input_size, trust_model=trust_model)
    if loaded.kind == "savedmodel":
        from ._foreign import prepare_classifier
        from ._onnx_reference import OnnxReference

        graph = prepare_classifier(to_onnx(loaded), layout="nhwc", input_size=loaded.input_size)
        return OnnxReference(graph.model)
    cut = extra.get("cut") if metadata is not None else None
    if metadata is None:  # the export's own decision: the converted graph tells whether it ends in a softmax
        from ._foreign import prepare_classifier

        cut = prepare_classifier(to_onnx(loaded), layout="nhwc", input_size=loaded.input_size).cut
    return KerasReference(loaded.model, cut=cut, channels=loaded.channels, source=loaded.source,
                          trust_model=trust_model)
