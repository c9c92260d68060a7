"""The engine workarounds (gradmap/graph/lowering/engines.py): each pass fires on its pattern, leaves
the graph's values equal (onnxruntime CPU, before and after, to float32 rounding), and names a bug of
tests/engines; the gradient rules name no engine."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx_ir")
ort = pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402

from gradmap.graph.gradient import append_vjp  # noqa: E402
from gradmap.graph.lowering import engines  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.engines
from tests.engines import ENGINE_BUGS  # noqa: E402

HEADER = '<ir_version: 8, opset_import: ["" : 18]>\n'
RNG = np.random.default_rng(0)

#: Engine and runtime names that belong in engines.py's registry, never in a rule.
ENGINE_NAMES = re.compile(r"\b(openvino|webgpu|webgl|wasm|webassembly|cuda|tensorrt|directml|coreml|rocm|iree|"
                          r"xnnpack|onnxruntime|ort|ort-web|swiftshader|chromium|safari|firefox)\b", re.IGNORECASE)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def init(name, array):
    a = np.asarray(array)
    kind = {np.float32: "float", np.int64: "int64"}[a.dtype.type]
    dims = f"[{','.join(str(d) for d in a.shape)}]" if a.ndim else ""
    values = ",".join(repr(float(v)) if kind == "float" else str(int(v)) for v in a.reshape(-1))
    return f"{kind}{dims} {name} = {{{values}}}"


def graph(inputs: str, output: str, body: str, inits=()) -> str:
    init_text = f"<{', '.join(inits)}>" if inits else ""
    return HEADER + f"g ({inputs}) => ({output}) {init_text} {{ {body} }}"


def with_and_without(text: str, inputs: dict[str, np.ndarray]):
    """The VJP graph of ``text`` without and with the engine passes, and both graphs' outputs on
    onnxruntime CPU for ``inputs`` and one random output gradient."""
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text), strict_mode=True)
    forward = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = forward.run(None, inputs)
    feeds = {**inputs, "grad_output": np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)}
    models, results = [], []
    for passes in (False, True):
        model = ir.serde.deserialize_model(proto)
        append_vjp(model, model.graph.inputs[0], model.graph.outputs[0], engine_passes=passes)
        serialized = ir.serde.serialize_model(model)
        onnx.checker.check_model(serialized, full_check=True)
        session = ort.InferenceSession(serialized.SerializeToString(), providers=["CPUExecutionProvider"])
        models.append(model)
        results.append(session.run(["grad_input"], feeds)[0])
    return models, results


def backward_ops(model) -> list[str]:
    return [n.op_type for n in model.graph if n.name and n.name.startswith("grad")]


def assert_same_values(results):
    """Equal to float32 rounding: the rewritten forms sum the same products, perhaps in another order."""
    plain, passed = results
    assert plain.shape == passed.shape
    scale = max(float(np.abs(plain).max()), 1e-30)
    assert float(np.abs(plain - passed).max()) <= 32 * np.finfo(np.float32).eps * scale, \
        f"the pass changed the gradient by {np.abs(plain - passed).max():.3g} (max |g| {scale:.3g})"


# -- the registry -----------------------------------------------------------------------------------------------


def test_rules_name_no_engine():
    rules = ROOT / "gradmap" / "graph" / "gradient" / "_rules"
    found = [f"{path.name}:{i}: {line.strip()}" for path in sorted(rules.glob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if ENGINE_NAMES.search(line)]
    assert not found, "engine names in the gradient rules (workarounds go to lowering/engines.py):\n" + "\n".join(found)


def test_the_engine_name_check_catches_a_name():
    assert ENGINE_NAMES.search("# OpenVINO 2026.4.1 needs this") and ENGINE_NAMES.search("onnxruntime's CPU")
    assert not ENGINE_NAMES.search("the portable sort of a shortcut")


def test_every_pass_is_keyed_to_a_known_engine_bug():
    names = [p.name for p in engines.ENGINE_PASSES]
    assert len(set(names)) == len(names)
    unknown = [p.bug for p in engines.ENGINE_PASSES if p.bug not in ENGINE_BUGS]
    assert not unknown, f"passes keyed to bugs tests/engines does not list: {unknown}"
    doc = (ROOT / "docs" / "engines.md").read_text()
    assert all(p.bug in doc and p.name in doc for p in engines.ENGINE_PASSES), "docs/engines.md names every pass"


# -- one test per pass ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,inits", [
    ("Y = Gemm<transB=1>(X, W)", [init("W", randn(6, 6))]),
    ("Y = Gemm(X, W)", [init("W", randn(6, 6))]),
    ("Y = MatMul(X, W)", [init("W", randn(6, 6))]),
], ids=["gemm-transB", "gemm", "matmul"])
def test_own_weight_copy_gives_a_square_weight_its_own_value(body, inits):
    models, results = with_and_without(graph("float[3,6] X", "float[3,6] Y", body, inits), {"X": randn(3, 6)})
    plain, passed = models
    weight = plain.graph.initializers["W"]
    assert any(use.node.name.startswith("grad") for use in weight.uses()), "the plain rule reads W itself"
    readers = [use.node for use in passed.graph.initializers["W"].uses() if use.node.name.startswith("grad")]
    assert readers and all(n.op_type == "Slice" for n in readers), [n.op_type for n in readers]
    assert backward_ops(passed).count("Slice") == backward_ops(plain).count("Slice") + 2
    assert_same_values(results)


def test_own_weight_copy_leaves_a_non_square_weight_alone():
    models, _ = with_and_without(graph("float[3,6] X", "float[3,4] Y", "Y = MatMul(X, W)", [init("W", randn(6, 4))]),
                                 {"X": randn(3, 6)})
    assert backward_ops(models[0]) == backward_ops(models[1])


def test_own_weight_copy_for_a_conv_transpose_kernel():
    text = graph("float[2,4,5,5] X", "float[2,4,11,11] Y", "Y = ConvTranspose<strides=[2,2]>(X, W)",
                 [init("W", randn(4, 4, 3, 3))])
    models, results = with_and_without(text, {"X": randn(2, 4, 5, 5)})
    adjoint = next(n for n in models[1].graph if n.op_type == "Conv")
    assert adjoint.inputs[1].producer() is not None and adjoint.inputs[1].producer().op_type == "Slice"
    assert adjoint.inputs[1] is not models[1].graph.initializers["W"]
    assert_same_values(results)


def test_tiled_pool_depth_to_space_places_2x2_pools():
    text = graph("float[2,3,8,8] X", "float[2,3,4,4] Y", "Y = MaxPool<kernel_shape=[2,2], strides=[2,2]>(X)")
    models, results = with_and_without(text, {"X": randn(2, 3, 8, 8)})
    assert "ConvTranspose" in backward_ops(models[0]) and "DepthToSpace" not in backward_ops(models[0])
    assert "DepthToSpace" in backward_ops(models[1]) and "ConvTranspose" not in backward_ops(models[1])
    assert not any(n.op_type == "Unsqueeze" for n in models[1].graph), "the ConvTranspose's inputs are gone"
    assert len(models[1].graph.initializers) < len(models[0].graph.initializers), "its one-hot kernel is gone"
    assert_same_values(results)


def test_tiled_pool_depth_to_space_leaves_overlapping_windows_alone():
    text = graph("float[2,3,9,9] X", "float[2,3,4,4] Y", "Y = MaxPool<kernel_shape=[3,3], strides=[2,2]>(X)")
    models, _ = with_and_without(text, {"X": randn(2, 3, 9, 9)})
    assert backward_ops(models[0]) == backward_ops(models[1])


def test_drop_empty_concat_pieces_on_a_dynamic_gather():
    text = graph("float[N] X", "float[M] Y", "Y = Gather(X, I)", [init("I", np.int64([0, 2, 2, 1]))])
    proto_inputs = {"X": randn(5)}
    models, results = with_and_without(text, proto_inputs)
    empty = [n for n in models[0].graph if n.op_type == "Gather" and n.inputs[1].const_value is not None
             and n.inputs[1].const_value.numpy().size == 0]
    assert empty, "the plain rule concatenates an empty shape piece"
    assert not any(n.op_type == "Gather" and n.inputs[1].const_value is not None
                   and n.inputs[1].const_value.numpy().size == 0 for n in models[1].graph)
    assert backward_ops(models[1]).count("Concat") == backward_ops(models[0]).count("Concat") - 2
    assert_same_values(results)


def test_repeated_scatter_as_matmul_on_repeated_indices():
    index = np.int64([[0], [2], [2], [1], [0], [0]])
    text = graph("float[4,5] X", "float[6,5] Y", "Y = GatherND(X, I)", [init("I", index)])
    models, results = with_and_without(text, {"X": randn(4, 5)})
    assert "ScatterND" in backward_ops(models[0])
    assert "ScatterND" not in backward_ops(models[1]) and "MatMul" in backward_ops(models[1])
    assert_same_values(results)


def test_repeated_scatter_as_matmul_leaves_distinct_indices_alone():
    text = graph("float[4,5] X", "float[3,5] Y", "Y = GatherND(X, I)", [init("I", np.int64([[3], [0], [1]]))])
    models, _ = with_and_without(text, {"X": randn(4, 5)})
    assert backward_ops(models[0]) == backward_ops(models[1]) and "ScatterND" in backward_ops(models[1])


# -- the bugs themselves, where the engine is installed ---------------------------------------------------------


def test_own_weight_copy_works_around_openvino_on_a_shared_square_gemm_weight(tmp_path):
    """openvino-shared-square-constant on its minimal graph: with W shared by the forward Gemm(X, W^T)
    and the gradient's Gemm(dY, W), OpenVINO's f32 CPU plugin gives dY W^T for the plain rule and
    the right dY W after own_weight_copy. If the plain form comes out right, OpenVINO fixed the bug
    and the pass can go."""
    from tests.engines import available, run

    ok, why = available("openvino")
    if not ok:
        pytest.skip(why)
    w = randn(16, 16)
    text = graph("float[3,16] X", "float[3,16] Y", "Y = Gemm<transB=1>(X, W)", [init("W", w)])
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text), strict_mode=True)
    x, dy = randn(3, 16), randn(3, 16)
    errors = {}
    for passes in (False, True):
        model = ir.serde.deserialize_model(proto)
        append_vjp(model, model.graph.inputs[0], model.graph.outputs[0], engine_passes=passes)
        path = tmp_path / f"passes_{passes}.onnx"
        onnx.save(ir.serde.serialize_model(model), str(path))
        (dx,) = run("openvino", path, {"X": x, "grad_output": dy}, ["grad_input"]).values()
        errors[passes] = float(np.abs(dx - dy @ w).max())
    scale = float(np.abs(dy @ w).max())
    assert errors[True] <= 1e-5 * scale, f"OpenVINO with own_weight_copy: error {errors[True]:.3g}"
    assert errors[False] > 1e-2 * scale, f"OpenVINO computes the plain form right now (error {errors[False]:.3g})"


def test_drop_empty_concat_pieces_lets_openvino_load_a_dynamic_gather_gradient(tmp_path):
    """openvino-empty-concat on the Gather rule's shapes for a 1-D input of dynamic size: the plain
    graph does not load in OpenVINO; with the pass it loads and gives the scattered sums. If the plain
    graph loads, OpenVINO fixed the bug and the pass can go."""
    from tests.engines import EngineError, available, run

    ok, why = available("openvino")
    if not ok:
        pytest.skip(why)
    text = graph("float[N] X", "float[M] Y", "Y = Gather(X, I)", [init("I", np.int64([0, 2, 2, 1]))])
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text), strict_mode=True)
    feeds = {"X": np.arange(5, dtype=np.float32), "grad_output": np.float32([1, 2, 3, 4])}
    paths = {}
    for passes in (False, True):
        model = ir.serde.deserialize_model(proto)
        append_vjp(model, model.graph.inputs[0], model.graph.outputs[0], engine_passes=passes)
        paths[passes] = tmp_path / f"passes_{passes}.onnx"
        onnx.save(ir.serde.serialize_model(model), str(paths[passes]))
    (dx,) = run("openvino", paths[True], feeds, ["grad_input"]).values()
    np.testing.assert_array_equal(dx, np.float32([1, 4, 5, 0, 0]))
    with pytest.raises(EngineError, match="Concat"):
        run("openvino", paths[False], feeds, ["grad_input"])
