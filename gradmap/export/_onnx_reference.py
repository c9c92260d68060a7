"""The float64 reference of a bare ONNX classifier: the graph itself, evaluated in float64 by numpy.

A bare ONNX file has no framework behind it whose autograd could serve as the reference, and
onnxruntime's CPU provider has no double Conv (onnxruntime#7546), so "cast to double and run" fails.
The reference is therefore built from the file's own graph, in two independent parts:

    logits      the forward graph in float64 (a double copy: weights, constants and Casts),
                evaluated by ``onnx.reference`` (numpy)
    gradients   gradmap's portable gradient graph of it, in float64 the same way: what the written
                model computes, without float32 rounding and without the engine's lowering
    the rules   checked independently of gradmap's rules by central differences of the float64
                forward graph along the gradient's own direction and a random one: a wrong rule
                changes the gradient, not the forward graph, so it shows as a directional
                derivative that differs from the finite difference (refused, naming both)

The float64 evaluation is numpy's: fine for the small inputs of fixtures and tests (a resnet18 at
64x64 in about a second), slow for 224x224 ImageNet models (``--no-verify`` skips it).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, numpy_helper

from gradmap import contract
from gradmap.graph import ParityError, add_gradient

__all__ = ["OnnxReference", "ReferenceRun", "to_double"]

logger = logging.getLogger(__name__)

# inputs that ONNX types as float whatever the data's type: they stay float32 in the double copy
_FLOAT_ONLY_INPUTS = {"Resize": (2,), "Upsample": (1,)}


from gradmap.graph.parity import ReferenceRun


def _double_tensor(tensor: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name)


def to_double(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` computing in float64: float initializers, Constant and ConstantOfShape
    values, Casts to float, and the graph's float inputs and outputs become double (scales of
    Resize stay float, as ONNX types them). Value annotations are dropped (they would say float)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    float_only = {node.input[i] for node in graph.node for i in _FLOAT_ONLY_INPUTS.get(node.op_type, ())
                  if i < len(node.input)}
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in float_only:
            graph.initializer[i].CopyFrom(_double_tensor(tensor))
    for node in graph.node:
        if node.op_type in ("Cast", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                            "RandomUniformLike"):
            for attr in node.attribute:
                if attr.name in ("to", "dtype") and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.DOUBLE
        elif node.op_type in ("Constant", "ConstantOfShape") and not any(o in float_only for o in node.output):
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(_double_tensor(attr.t))
                elif attr.name in ("value_float", "value_floats"):
                    values = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), np.float64)
                    attr.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(values)))
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    return model


def _conv_transpose(x, w, b, *, strides, dilations, pads, output_padding, group):
    """ConvTranspose in numpy, one kernel offset at a time: each input pixel adds its weighted
    kernel into the output at stride s (onnx.reference's own fails on grouped kernels and loops in
    Python over pixels)."""
    n, c_in = x.shape[:2]
    spatial = x.ndim - 2
    kernel = w.shape[2:]
    c_out_g = w.shape[1]
    c_in_g = c_in // group
    full = [(x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + output_padding[i]
            for i in range(spatial)]
    y = np.zeros((n, c_out_g * group, *full), dtype=np.result_type(x, w))
    xg = x.reshape(n, group, c_in_g, *x.shape[2:])
    wg = w.reshape(group, c_in_g, c_out_g, *kernel)
    for offset in itertools.product(*(range(k) for k in kernel)):
        # [n, g, ci, *S] x [g, ci, co] -> [n, g, co, *S]
        part = np.einsum("ngi...,gio->ngo...", xg, wg[(slice(None), slice(None), slice(None), *offset)])
        part = part.reshape(n, group * c_out_g, *x.shape[2:])
        index = tuple(slice(o * d, o * d + (size - 1) * s + 1, s)
                      for o, d, s, size in zip(offset, dilations, strides, x.shape[2:]))
        y[(slice(None), slice(None), *index)] += part
    crop = tuple(slice(pads[i], full[i] - pads[spatial + i]) for i in range(spatial))
    y = y[(slice(None), slice(None), *crop)]
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * spatial))
    return y


def _conv(x, w, b, *, strides, dilations, pads, group):
    """Conv in numpy as a sum over kernel offsets of channel products (one BLAS product each),
    instead of onnx.reference's im2col, which copies every window."""
    n, c_in = x.shape[:2]
    spatial = x.ndim - 2
    kernel = w.shape[2:]
    c_out = w.shape[0]
    c_in_g = c_in // group
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[spatial + i]) for i in range(spatial)])
    out = [(padded.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(spatial)]
    xg = padded.reshape(n, group, c_in_g, *padded.shape[2:])
    wg = w.reshape(group, c_out // group, c_in_g, *kernel)
    y = np.zeros((n, group, c_out // group, *out), dtype=np.result_type(x, w))
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (size - 1) * s + 1, s)
                      for o, d, s, size in zip(offset, dilations, strides, out))
        window = xg[(slice(None), slice(None), slice(None), *index)]
        tap = wg[(slice(None), slice(None), slice(None), *offset)]  # [g, co, ci]
        if c_in_g == 1 and c_out // group == 1:  # depthwise: a product per channel
            y += window * tap.reshape(1, group, 1, *([1] * spatial))
        else:  # [g, co, ci] @ [n, g, ci, P] -> [n, g, co, P], one BLAS product per sample and group
            columns = np.ascontiguousarray(window).reshape(n, group, c_in_g, -1)
            y += np.matmul(tap[None], columns).reshape(y.shape)
    y = y.reshape(n, c_out, *out)
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * spatial))
    return y


def _max_pool(x, *, kernel, strides, dilations, pads, ceil_mode):
    """MaxPool in numpy: the maximum over kernel offsets of strided slices of the input padded with
    -inf (onnx.reference's own loops in Python over windows)."""
    spatial = x.ndim - 2
    out = []
    for i in range(spatial):
        span = x.shape[2 + i] + pads[i] + pads[spatial + i] - (kernel[i] - 1) * dilations[i] - 1
        size = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (size - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
            size -= 1  # a last window that would start in the end padding is dropped
        out.append(size)
    extra = [max(0, (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                 - (x.shape[2 + i] + pads[i] + pads[spatial + i])) for i in range(spatial)]
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[spatial + i] + extra[i]) for i in range(spatial)],
                    constant_values=-np.inf)
    y = None
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (size - 1) * s + 1, s)
                      for o, d, s, size in zip(offset, dilations, strides, out))
        window = padded[(slice(None), slice(None), *index)]
        y = window.copy() if y is None else np.maximum(y, window)
    return y


def _same_pads(auto_pad, x_shape, kernel, strides, dilations):
    """Explicit pads of auto_pad SAME_UPPER / SAME_LOWER (the output is ceil(size / stride))."""
    begin, end = [], []
    for size, k, s, d in zip(x_shape, kernel, strides, dilations):
        total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(large if auto_pad == "SAME_LOWER" else small)
        end.append(small if auto_pad == "SAME_LOWER" else large)
    return begin + end


def _reference_ops():
    from onnx.reference.op_run import OpRun

    class Conv(OpRun):
        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            spatial = X.ndim - 2
            strides = list(strides or [1] * spatial)
            dilations = list(dilations or [1] * spatial)
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                pads = _same_pads(auto_pad, X.shape[2:], W.shape[2:], strides, dilations)
            elif auto_pad == "VALID" or pads is None:
                pads = [0] * (2 * spatial)
            return (_conv(X, W, B, strides=strides, dilations=dilations, pads=list(pads),
                          group=int(group or 1)).astype(X.dtype),)

    class ConvTranspose(OpRun):
        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 output_padding=None, output_shape=None, pads=None, strides=None):
            spatial = X.ndim - 2
            if output_shape is not None or auto_pad not in (None, "NOTSET", "VALID"):
                raise ValueError("the float64 reference's ConvTranspose takes explicit pads only")
            return (_conv_transpose(X, W, B, strides=list(strides or [1] * spatial),
                                    dilations=list(dilations or [1] * spatial),
                                    pads=list(pads or [0] * (2 * spatial)),
                                    output_padding=list(output_padding or [0] * spatial),
                                    group=int(group or 1)).astype(X.dtype),)

    class MaxPool(OpRun):
        def _run(self, X, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
                 storage_order=None, strides=None):
            spatial = X.ndim - 2
            if len(self.onnx_node.output) > 1 and self.onnx_node.output[1]:
                raise ValueError("the float64 reference's MaxPool has no Indices output")
            strides = list(strides or [1] * spatial)
            dilations = list(dilations or [1] * spatial)
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                pads = _same_pads(auto_pad, X.shape[2:], kernel_shape, strides, dilations)
            elif auto_pad == "VALID" or pads is None:
                pads = [0] * (2 * spatial)
            return (_max_pool(X, kernel=list(kernel_shape), strides=strides, dilations=dilations, pads=list(pads),
                              ceil_mode=bool(ceil_mode)).astype(X.dtype),)

    class LRN(OpRun):
        # onnx.reference's LRN (onnx 1.23) differs from the specification's formula, which
        # onnxruntime and torch's local_response_norm follow
        def _run(self, X, alpha=None, beta=None, bias=None, size=None):
            alpha = 1e-4 if alpha is None else alpha
            beta = 0.75 if beta is None else beta
            bias = 1.0 if bias is None else bias
            before = (size - 1) // 2
            after = size - 1 - before
            squares = np.pad(X * X, [(0, 0), (before, after)] + [(0, 0)] * (X.ndim - 2))
            window = sum(squares[:, i:i + X.shape[1]] for i in range(size))
            return ((X / (bias + alpha / size * window) ** beta).astype(X.dtype),)

    return [Conv, ConvTranspose, LRN, MaxPool]


def _evaluator(proto: onnx.ModelProto):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(proto, new_ops=_reference_ops())


def selected_score(logits: np.ndarray, target_index: np.ndarray, score: str) -> np.ndarray:
    """Per sample, the score the gradient differentiates: logit, softmax probability or its log."""
    rows = np.arange(len(target_index))
    if score == "logit":
        return logits[rows, target_index]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probability = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    chosen = log_probability[rows, target_index]
    return chosen if score == "log_probability" else np.exp(chosen)


class OnnxReference:
    """float64 evaluation of a gradmap forward graph (``image`` -> ``logits``) and of its
    portable gradient graph, with the gradient rules checked by central differences.

    Args:
        forward: the forward classifier (an ``ir.Model`` or ``ModelProto`` with ``image`` and
            ``logits``, e.g. ``prepare_classifier(...).model``); copied, so later changes to it
            do not reach the reference.
        directions: random directions of the central-difference check (besides the gradient's own).
        rtol: largest accepted |finite difference - directional derivative| relative to the
            directional derivative's scale.
    """

    name = "float64 evaluation of the ONNX graph"
    own = "the ONNX graph"  # whose float32 run the parity policy measures

    def __init__(self, forward: ir.Model | onnx.ModelProto, *, directions: int = 1, rtol: float = 1e-3, seed: int = 0):
        proto = ir.serde.serialize_model(forward) if isinstance(forward, ir.Model) else forward
        self._forward32 = onnx.ModelProto()
        self._forward32.CopyFrom(proto)
        self._forward64 = _evaluator(to_double(self._forward32))
        self._gradients: dict[tuple, tuple] = {}
        self._directions = directions
        self._rtol = rtol
        self._seed = seed
        self.checked: list[dict] = []  # the central-difference checks made: direction, step, values
        self.notes: list[str] = []  # what the export report should say about this reference

    # -- the evaluations --------------------------------------------------------------------------
    def _models(self, score: str, backprops: tuple[str, ...]):
        key = (score, tuple(backprops))
        if key not in self._gradients:
            model = ir.serde.deserialize_model(self._forward32)
            add_gradient(model, score=score, backprops=tuple(backprops), target="portable")
            proto = ir.serde.serialize_model(model)
            self._gradients[key] = (_evaluator(to_double(proto)), proto)
        return self._gradients[key]

    def logits(self, images: np.ndarray, *, float32: bool = False) -> np.ndarray:
        """float64 logits of ``images`` (as float64), or with ``float32`` the same evaluation in float32
        (numpy's): the forward-only parity check's reference and own rounding."""
        if float32:
            if "forward32" not in self._gradients:
                self._gradients["forward32"] = _evaluator(self._forward32)
            (logits,) = self._gradients["forward32"].run([contract.OUTPUT_LOGITS],
                                                         {contract.INPUT_IMAGE: images.astype(np.float32)})
            return np.asarray(logits, dtype=np.float64)
        (logits,) = self._forward64.run([contract.OUTPUT_LOGITS], {contract.INPUT_IMAGE: images.astype(np.float64)})
        return np.asarray(logits, dtype=np.float64)

    def _run(self, evaluator, images, target_index, backprops, dtype) -> ReferenceRun:
        names = [contract.OUTPUT_LOGITS, *(contract.BACKPROP_OUTPUTS[b] for b in backprops)]
        values = evaluator.run(names, {contract.INPUT_IMAGE: np.asarray(images, dtype=dtype),
                                       contract.INPUT_TARGET: np.asarray(target_index, dtype=np.int64)})
        return ReferenceRun(logits=np.asarray(values[0], np.float64),
                            gradients={b: np.asarray(v, np.float64) for b, v in zip(backprops, values[1:])})

    def _replay_model(self, score: str, names: tuple[str, ...]):
        """The vanilla gradient model with each forward Relu of ``names`` written as Mul(X, M) with M an
        input: the float32 run's pass mask, values staying the graph's own (float64)."""
        key = ("replay", score, names)
        if key not in self._gradients:
            model = ir.serde.deserialize_model(self._forward32)
            graph = model.graph
            masks = {}
            for node in list(graph):
                y = node.outputs[0] if node.outputs else None
                if node.op_type != "Relu" or y is None or y.name not in names:
                    continue
                mask = ir.Value(name=f"gradmap_replay_{len(masks)}", shape=y.shape, type=y.type)
                graph.inputs.append(mask)
                product = ir.node("Mul", [node.inputs[0], mask])
                graph.insert_before(node, product)
                y.replace_all_uses_with(product.outputs[0])
                graph.remove(node, safe=True)
                product.outputs[0].name, product.outputs[0].shape, product.outputs[0].type = y.name, y.shape, y.type
                channels = y.shape[1] if y.shape is not None and len(y.shape) > 1 else None
                masks[y.name] = (mask.name, channels if isinstance(channels, int) else None)
            add_gradient(model, score=score, backprops=("vanilla",), target="portable")
            proto = ir.serde.serialize_model(model)
            self._gradients[key] = (_evaluator(to_double(proto)), _evaluator(proto), masks)
        return self._gradients[key]

    def _replayed(self, images, target_index, score, decisions, dtype) -> tuple[ReferenceRun, str] | None:
        """The vanilla logits and gradient with the float32 run's ReLU decisions, where they name
        Relu nodes of this graph (a lowered model's channel padding cut off); else None."""
        names = tuple(getattr(decisions, "relu_names", None) or ())
        outputs = getattr(decisions, "relu_outputs", None)
        if not names or outputs is None:
            return None
        double, single, masks = self._replay_model(score, names)
        if not masks:
            return None
        feeds = {}
        for name, values in zip(names, outputs):
            if name in masks:
                mask_name, channels = masks[name]
                passed = np.asarray(values) > 0
                if channels is not None and passed.ndim > 1 and passed.shape[1] > channels:
                    passed = passed[:, :channels]  # zero channels a lowered model padded its maps with
                feeds[mask_name] = passed.astype(dtype)
        evaluator = double if dtype == np.float64 else single
        values = evaluator.run([contract.OUTPUT_LOGITS, contract.BACKPROP_OUTPUTS["vanilla"]], {
            contract.INPUT_IMAGE: np.asarray(images, dtype=dtype),
            contract.INPUT_TARGET: np.asarray(target_index, np.int64), **feeds})
        run = ReferenceRun(logits=np.asarray(values[0], np.float64),
                           gradients={"vanilla": np.asarray(values[1], np.float64)})
        return run, "relus"

    def run(self, images: np.ndarray, target_index: np.ndarray, *, score: str, backprops=("vanilla",),
            decisions=None) -> ReferenceRun:
        """float64 logits and gradients of ``images`` (float32 NCHW, as fed to ``image``) for the
        classes ``target_index``. The first call also checks the gradient rules against central
        differences (raises :class:`ParityError` when they disagree).

        ``decisions`` (:class:`gradmap.graph.parity.Decisions`): the vanilla gradient takes the float32
        run's ReLU decisions where they name Relu nodes of this graph (``replayed`` is ``relus``); max
        pooling near-ties and the guided and deconvnet rules are not replayed: such a batch is drawn
        again by the parity check."""
        backprops = tuple(dict.fromkeys(["vanilla", *backprops]))
        evaluator, _ = self._models(score, backprops)
        result = self._run(evaluator, images, target_index, backprops, np.float64)
        if not self.checked:
            # the rules are checked on the logit, whatever the score: a probability near 0 or 1 has a
            # gradient below float64's resolution of the probability itself, the logit has not
            gradient = result.gradients["vanilla"] if score == "logit" else self._run(
                self._models("logit", ("vanilla",))[0], images, target_index, ("vanilla",), np.float64
            ).gradients["vanilla"]
            self.check_directions(images, target_index, gradient)
        replayed = self._replayed(images, target_index, score, decisions, np.float64) if decisions else None
        if replayed is not None:
            run, kind = replayed
            result.logits, result.gradients["vanilla"], result.replayed = run.logits, run.gradients["vanilla"], kind
        return result

    def run_float32(self, images: np.ndarray, target_index: np.ndarray, *, score: str,
                    backprops=("vanilla",), decisions=None) -> ReferenceRun:
        """The same evaluation in float32 (numpy's, not the engine's): how far float32 rounding alone
        moves this graph's logits and gradients, for the parity tolerance."""
        backprops = tuple(dict.fromkeys(["vanilla", *backprops]))
        _, proto = self._models(score, backprops)
        key = ("float32", score, backprops)
        if key not in self._gradients:
            self._gradients[key] = (_evaluator(proto), proto)
        result = self._run(self._gradients[key][0], images, target_index, backprops, np.float32)
        replayed = self._replayed(images, target_index, score, decisions, np.float32) if decisions else None
        if replayed is not None:
            run, kind = replayed
            result.logits, result.gradients["vanilla"], result.replayed = run.logits, run.gradients["vanilla"], kind
        return result

    # -- the independent check --------------------------------------------------------------------
    def check_directions(self, images: np.ndarray, target_index: np.ndarray, gradient: np.ndarray) -> None:
        """Compare <gradient, v> with the central difference of the summed target logits of the
        float64 forward graph along v, for v the gradient's own direction and ``directions`` random ones.

        The logits are piecewise smooth in the input (ReLU and max pooling switch branches): a step
        that crosses a switch shows as two step sizes that disagree, and the step shrinks until they
        agree, but never below the step at which float64 rounding of the logits would exceed a tenth
        of the tolerance. Raises :class:`ParityError` when a direction disagrees beyond ``rtol``, or
        when no direction could be checked."""
        x = np.asarray(images, dtype=np.float64)
        target_index = np.asarray(target_index, dtype=np.int64)
        g = np.asarray(gradient, dtype=np.float64)
        norm = float(np.linalg.norm(g))
        if not np.isfinite(norm):
            raise ParityError("the float64 gradient of the graph is not finite")
        if norm == 0.0:
            logger.info("central-difference check skipped: the gradient is zero on this batch")
            return
        rng = np.random.default_rng(self._seed)
        n = g.size
        directions = [("gradient", g / norm * np.sqrt(n))]
        directions += [(f"random {i + 1}", rng.standard_normal(g.shape)) for i in range(self._directions)]

        def total(point: np.ndarray) -> float:
            return float(selected_score(self.logits(point), target_index, "logit").sum())

        size = max(1.0, float(np.abs(x).max()))
        level = abs(total(x)) + float(np.abs(self.logits(x)).max())  # the logits' magnitude, for rounding
        for label, v in directions:
            expected = float(np.sum(g * v))
            scale = max(abs(expected), norm * float(np.linalg.norm(v)) / np.sqrt(n))
            # float64 rounding of the logits adds about eps * level / step to a central difference
            floor = 40 * np.finfo(np.float64).eps * level / (self._rtol * scale)
            step = max(1e-6 * size, floor)
            estimate = None
            record = {"direction": label, "derivative": expected}
            while step <= 1e-2 * size:
                coarse = (total(x + step * v) - total(x - step * v)) / (2 * step)
                fine = (total(x + step / 4 * v) - total(x - step / 4 * v)) / (step / 2)
                if abs(coarse - fine) <= self._rtol / 10 * scale:
                    estimate = fine
                    break
                if step / 10 < floor:  # a branch switch inside every step float64 can resolve
                    break
                step /= 10
            record.update(step=step, finite_difference=estimate)
            self.checked.append(record)
            if estimate is None:
                logger.info("central differences along the %s direction did not settle; skipped", label)
                continue
            error = abs(estimate - expected) / scale
            record["error"] = error
            if error > self._rtol:
                raise ParityError(
                    f"the gradient graph disagrees with central differences of the float64 forward graph along "
                    f"the {label} direction: derivative {expected:.6g}, finite difference {estimate:.6g} "
                    f"(relative {error:.2g}, tolerance {self._rtol:g}): a gradient rule is wrong for an op of this "
                    "graph. The model was not written.")
        if all(r["finite_difference"] is None for r in self.checked):
            # not a wrong rule: a gradient below float64's resolution of the logits (a random network whose
            # logits hardly depend on the picture), or switches within every step float64 can resolve
            self.notes.append(f"central differences could not check the gradient rules on this batch (derivative "
                              f"{abs(self.checked[0]['derivative']):.2g} against logits of {level:.2g}): "
                              "the float32 model was compared with the float64 graph only")
            logger.info(self.notes[-1])
