"""The gradient pass's parameters for graphs other than gradmap's own (bench/floor.py's floor): a rule
table with rules replaced, a seed function and cpu lowering passes to skip, none of them changing the
registered rules."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx_ir")
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402

from gradmap.graph.errors import ExportError  # noqa: E402
from gradmap.graph.gradient import RULES, RuleTable, append_gradient, score_seed  # noqa: E402
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
    append_gradient(model, rules=table, target="portable")
    assert "Greater" not in [n.op_type for n in model.graph], "the stand-in, not the Relu rule's mask"
    model = classifier()
    append_gradient(model, target="portable")
    assert "Greater" in [n.op_type for n in model.graph], "gradmap's own Relu rule again"


def test_replacing_a_rule_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="NoSuchOp"):
        RuleTable.default().replaced({"NoSuchOp": lambda ctx, node, dy: []})


def test_seed_function_builds_the_output_gradient():
    def doubled(ctx, logits, target, score):
        seed, index = score_seed(ctx, logits, target, score)
        return ctx.op("Mul", seed, ctx.scalar(2.0)), index

    plain, scaled = classifier(), classifier()
    append_gradient(plain, target="portable")
    append_gradient(scaled, seed=doubled, target="portable")
    assert len(list(scaled.graph)) == len(list(plain.graph)) + 1


def test_skipped_lowering_passes_are_checked_by_name():
    assert plan("cpu", skip=("relu_mask",)).skip == frozenset({"relu_mask"})
    with pytest.raises(ExportError, match="no_such_pass"):
        plan("cpu", skip=("no_such_pass",))


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
    plan("cpu", skip=floor.FLOOR_SKIPPED_LOWERING)  # every name is a cpu lowering pass
