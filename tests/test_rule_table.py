"""The export's parameters for graphs other than gradmap's own (bench/floor.py's floor): a rule table
with rules replaced, a seed function and cpu lowering passes to skip (gradmap.graph.add_gradient's
``rules``, ``seed`` and ``skip_lowering``), none of them changing the registered rules."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx_ir")
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402

from gradmap.graph import add_gradient  # noqa: E402
from gradmap.graph.errors import ExportError  # noqa: E402
from gradmap.graph.gradient import RULES, RuleTable, score_seed  # noqa: E402
from gradmap.graph.gradient._registry import COMPOSITES  # noqa: E402
from gradmap.graph.lowering import plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

CLASSIFIER = """<ir_version: 8, opset_import: ["" : 18]>
g (float[N,2,4,4] image) => (float[N,3] logits) <float[3,32] W = {%s}> {
  r = Relu(image)
  f = Flatten(r)
  logits = Gemm<transB=1>(f, W)
}""" % ",".join(str(float(v)) for v in np.random.default_rng(0).standard_normal(96))


def classifier():
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(CLASSIFIER))
    return ir.serde.deserialize_model(proto)


def test_replaced_table_leaves_the_registered_rules_alone():
    saved, saved_composites = dict(RULES), {k: list(v) for k, v in COMPOSITES.items()}

    def stand_in(ctx, node, dy):
        return [ctx.op("Mul", dy[0], node.outputs[0])]

    table = RuleTable.default().replaced({"Relu": stand_in}, composite_rule=lambda ctx, node, dy, parts: [None])
    assert table.rules["Relu"] is stand_in and RULES["Relu"] is not stand_in
    assert RULES == saved and {k: list(v) for k, v in COMPOSITES.items()} == saved_composites
    model = classifier()
    add_gradient(model, rules=table, target="portable")
    assert "Greater" not in [n.op_type for n in model.graph], "the stand-in, not the Relu rule's mask"
    model = classifier()
    add_gradient(model, target="portable")
    assert "Greater" in [n.op_type for n in model.graph], "gradmap's own Relu rule again"


def test_replacing_a_rule_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="NoSuchOp"):
        RuleTable.default().replaced({"NoSuchOp": lambda ctx, node, dy: []})


def test_seed_function_builds_the_output_gradient():
    def doubled(ctx, logits, target, score):
        seed, index = score_seed(ctx, logits, target, score)
        return ctx.op("Mul", seed, ctx.scalar(2.0)), index

    plain, scaled = classifier(), classifier()
    add_gradient(plain, target="portable")
    add_gradient(scaled, seed=doubled, target="portable")
    assert len(list(scaled.graph)) == len(list(plain.graph)) + 1


def test_skipped_lowering_passes_are_checked_by_name():
    assert plan("cpu", skip=("relu_mask",)).skip == frozenset({"relu_mask"})
    with pytest.raises(ExportError, match="no_such_pass"):
        plan("cpu", skip=("no_such_pass",))


WIDE = """<ir_version: 8, opset_import: ["" : 18]>
g (float[N,16,4,4] image) => (float[N,3] logits) <float[3,256] W = {%s}> {
  r = Relu(image)
  f = Flatten(r)
  logits = Gemm<transB=1>(f, W)
}""" % ",".join(str(float(v)) for v in np.random.default_rng(1).standard_normal(768))


def wide_classifier():
    """16 channels: a block of onnxruntime's CPU layout, so the cpu target's relu_mask applies."""
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(WIDE)))


def _ops(model):
    return [n.op_type for n in model.graph]


def test_skipped_lowering_pass_is_not_run():
    lowered, skipped = wide_classifier(), wide_classifier()
    add_gradient(lowered, target="cpu", channel_multiple=16)
    add_gradient(skipped, target="cpu", channel_multiple=16, skip_lowering=("relu_mask",))
    assert "HardSigmoid" in _ops(lowered) and "Greater" not in _ops(lowered), "relu_mask's form"
    assert "HardSigmoid" not in _ops(skipped) and "Greater" in _ops(skipped), "the Relu rule's own mask"


def test_floor_builds_through_the_parameters():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import floor
    finally:
        sys.path.remove(str(ROOT / "bench"))
    saved = dict(RULES)
    table = floor.floor_rules()
    assert RULES == saved
    assert table.rules["MaxPool"] is not RULES["MaxPool"] and table.rules["Conv"] is RULES["Conv"]
    model = wide_classifier()
    add_gradient(model, target="cpu", channel_multiple=16, rules=table, seed=floor.floor_seed,
                 skip_lowering=floor.FLOOR_SKIPPED_LOWERING)
    ops = _ops(model)
    assert "Greater" not in ops and "HardSigmoid" not in ops, f"the floor's stand-in, not a mask: {ops}"
    scales = [n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "Mul"
              and n.inputs[1] is not None and n.inputs[1].const_value is not None]
    assert any(s.size == 1 and float(s) == 2.0 ** 100 for s in scales), "the floor's seed"
