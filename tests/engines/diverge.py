"""Find where an engine's computation leaves onnxruntime CPU's: expose node outputs as graph outputs,
run both engines, and list the nodes in graph order whose outputs differ.

    python -m tests.engines.diverge ENGINE MODEL.onnx [--seed 1] [--batch 2] [--threshold 1e-3] [--chunk 400]

Exposing an output can change what an engine fuses, so outputs are exposed in chunks of graph order
(``--chunk``); a node counts as diverging when max|Δ| / max|ORT| of an output is above the threshold.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx

from gradmap import contract

from . import EngineError, run

__all__ = ["divergences"]


def _float_outputs(proto: onnx.ModelProto) -> list[tuple[int, onnx.NodeProto, str]]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    outputs = {o.name for o in proto.graph.output}
    return [(i, n, o) for i, n in enumerate(proto.graph.node) for o in n.output
            if o and o not in outputs and types.get(o) == onnx.TensorProto.FLOAT]


def divergences(engine: str, model_path, feeds: dict[str, np.ndarray], *, threshold: float = 1e-3,
                chunk: int = 400, first_only: bool = True) -> list[dict]:
    """Nodes whose float outputs differ between ``engine`` and onnxruntime CPU, in graph order."""
    proto = onnx.load(str(model_path))
    candidates = _float_outputs(proto)
    found = []
    with tempfile.TemporaryDirectory(prefix="gradmap-diverge-") as tmp:
        for start in range(0, len(candidates), chunk):
            part = candidates[start:start + chunk]
            exposed = copy.deepcopy(proto)
            for _, _, name in part:
                exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            path = Path(tmp) / "exposed.onnx"
            onnx.save(exposed, str(path))
            names = [name for _, _, name in part]
            try:
                mine = run(engine, path, feeds, names)
            except EngineError as e:
                found.append({"chunk": start, "error": e.reason})
                continue
            theirs = run("ort_cpu", path, feeds, names)
            for index, node, name in part:
                a, b = mine[name].astype(np.float64), theirs[name].astype(np.float64)
                if a.shape != b.shape:
                    found.append({"index": index, "op": node.op_type, "node": node.name, "output": name,
                                  "shape": f"{a.shape} vs {b.shape}"})
                    continue
                scale = np.abs(b).max() if b.size else 0.0
                err = float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max(initial=0.0))
                if not np.isfinite(a).all() or err > threshold:
                    found.append({"index": index, "op": node.op_type, "node": node.name, "output": name,
                                  "error": err, "inputs": list(node.input),
                                  "attributes": {a_.name: onnx.helper.get_attribute_value(a_) for a_ in node.attribute
                                                 if a_.type != onnx.AttributeProto.TENSOR}})
            if found and first_only:
                break
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine")
    parser.add_argument("model")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=1e-3)
    parser.add_argument("--chunk", type=int, default=400)
    parser.add_argument("--all", action="store_true", help="every diverging node, not only the first chunk's")
    args = parser.parse_args()
    proto = onnx.load(args.model, load_external_data=False)
    dims = [d.dim_value or args.batch for d in proto.graph.input[0].type.tensor_type.shape.dim]
    dims[0] = args.batch
    rng = np.random.default_rng(args.seed)
    feeds = {contract.INPUT_IMAGE: rng.standard_normal(dims, dtype=np.float32),
             contract.INPUT_TARGET: np.full(args.batch, -1, dtype=np.int64)}
    for record in divergences(args.engine, args.model, feeds, threshold=args.threshold, chunk=args.chunk,
                              first_only=not args.all)[:20]:
        print(record)


if __name__ == "__main__":
    main()
