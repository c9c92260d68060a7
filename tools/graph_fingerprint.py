"""Fingerprints of gradmap's exported gradient graphs: does a refactoring change what gradmap writes?

    python tools/graph_fingerprint.py                      # record bench/results/graph_fingerprints.json
                                                           # (and the run index of docs/benchmarks.md)
    python tools/graph_fingerprint.py --check              # export again, compare with the record, write nothing
    python tools/graph_fingerprint.py --models resnet50 --targets cpu --dump /tmp/fp   # canonical node lists too

Each speed-table model (bench/bench_speed.py's list) is exported as ``gradmap export --weights none``
does (torchvision, seeded random weights, the model's own input size), once per target (``portable``
and ``cpu``), and its graph is reduced to a fingerprint that ignores what the exporter and the passes
name freely:

- a node is its domain, op type, attributes (tensor attributes by content) and its inputs, each input
  named by what it is: a graph input by its name, an initializer by a hash of its dtype, shape and
  bytes, a node's output by that node's fingerprint and the output's position (a Merkle hash, so value
  and node names never count, and neither does the order of independent nodes);
- the graph is the sorted multiset of its node fingerprints plus its outputs (name and fingerprint).

Recorded per graph: ``graph`` (that hash), ``sequence`` (the node fingerprints in graph order: a
reordering alone changes this and not ``graph``), node and initializer counts, and per op type the count
and a hash of its nodes' fingerprints, which points a difference to the op types it touches. ``--dump
DIR`` also writes each graph's nodes in a readable canonical form (diff two dumps to see a change).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _report  # noqa: E402

RESULTS = _report.RESULTS / "graph_fingerprints.json"
TARGETS = ("portable", "cpu")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Fingerprinter:
    """Name-free hashes of one graph's values and nodes (see the module doc)."""

    def __init__(self, graph):
        self.graph = graph
        self.initializers = {id(v) for v in graph.initializers.values()}
        self.inputs = {id(v): v.name for v in graph.inputs}
        self.node_keys: dict[int, str] = {}
        self.tensor_keys: dict[int, str] = {}
        self.readable: dict[int, str] = {}

    def tensor(self, tensor) -> str:
        key = self.tensor_keys.get(id(tensor))
        if key is None:
            array = tensor.numpy()
            digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
            key = f"{tensor.dtype.name}{list(array.shape)}:{digest}"
            self.tensor_keys[id(tensor)] = key
        return key

    def value(self, value) -> str:
        if value is None:
            return "-"
        if id(value) in self.inputs:
            return f"input:{self.inputs[id(value)]}"
        producer = value.producer()
        if producer is None:
            if value.const_value is not None:
                return f"init:{self.tensor(value.const_value)}"
            return f"outer:{value.name}"  # a subgraph reading its parent's value
        return f"{self.node(producer)}.{list(producer.outputs).index(value)}"

    def attribute(self, attr) -> str:
        import onnx_ir as ir

        kind, value = attr.type, attr.value
        if kind == ir.AttributeType.TENSOR:
            return self.tensor(value)
        if kind == ir.AttributeType.TENSORS:
            return "[" + ",".join(self.tensor(t) for t in value) + "]"
        if kind == ir.AttributeType.GRAPH:
            return graph_fingerprint(value)["graph"]
        if kind == ir.AttributeType.GRAPHS:
            return "[" + ",".join(graph_fingerprint(g)["graph"] for g in value) + "]"
        if kind in (ir.AttributeType.FLOATS, ir.AttributeType.INTS, ir.AttributeType.STRINGS):
            return repr(list(value))
        return repr(value)

    def node(self, node) -> str:
        key = self.node_keys.get(id(node))
        if key is not None:
            return key
        # iterative: a deep chain of producers would exceed Python's recursion limit
        stack = [node]
        while stack:
            top = stack[-1]
            if id(top) in self.node_keys:
                stack.pop()
                continue
            pending = [v.producer() for v in top.inputs
                       if v is not None and v.producer() is not None and id(v.producer()) not in self.node_keys
                       and id(v) not in self.inputs]
            if pending:
                stack.extend(pending)
                continue
            attrs = ";".join(f"{name}={self.attribute(a)}" for name, a in sorted(top.attributes.items()))
            inputs = ",".join(self.value(v) for v in top.inputs)
            text = f"{top.domain or 'ai.onnx'}::{top.op_type}({inputs}){{{attrs}}}->{len(top.outputs)}"
            self.node_keys[id(top)] = _sha(text)
            self.readable[id(top)] = text
            stack.pop()
        return self.node_keys[id(node)]


def graph_fingerprint(graph, dump: Path | None = None) -> dict:
    """The fingerprint record of ``graph`` (an ``onnx_ir.Graph``); ``dump``: write its canonical nodes there."""
    fp = Fingerprinter(graph)
    nodes = list(graph)
    keys = [fp.node(n) for n in nodes]
    outputs = [f"{v.name}={fp.value(v)}" for v in graph.outputs]
    by_op: dict[str, list[str]] = defaultdict(list)
    for node, key in zip(nodes, keys):
        by_op[f"{node.domain + '::' if node.domain else ''}{node.op_type}"].append(key)
    record = {
        "graph": _sha("\n".join(sorted(keys)) + "\n" + "\n".join(outputs)),
        "sequence": _sha("\n".join(keys)),
        "nodes": len(nodes),
        "initializers": len(graph.initializers),
        "inputs": [v.name for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "ops": {op: {"count": len(k), "hash": _sha("\n".join(sorted(k)))} for op, k in sorted(by_op.items())},
    }
    if dump is not None:
        dump.parent.mkdir(parents=True, exist_ok=True)
        lines = sorted(f"{fp.node_keys[id(n)]} {fp.readable[id(n)]}" for n in nodes)
        dump.write_text("\n".join(lines + [f"output {o}" for o in outputs]) + "\n")
    return record


def export(name: str, target: str):
    """``name``'s gradient model for ``target``: seeded random weights, its own input size."""
    from gradmap.export._api import build_gradient_model
    from gradmap.export._torchvision import input_size_of, load_torchvision

    module, _ = load_torchvision(name, "none")
    for p in module.parameters():
        p.requires_grad_(False)
    model, _ = build_gradient_model(module, input_size_of(name), target=target)
    return model


def compare(recorded: dict, current: dict) -> list[str]:
    """Where ``current`` differs from ``recorded``: one line per difference (none: the same graph)."""
    lines = []
    if recorded["graph"] != current["graph"]:
        lines.append(f"graph differs: {recorded['nodes']} -> {current['nodes']} nodes")
        for op in sorted(set(recorded["ops"]) | set(current["ops"])):
            a, b = recorded["ops"].get(op), current["ops"].get(op)
            if a != b:
                lines.append(f"  {op}: {a['count'] if a else 0} -> {b['count'] if b else 0} nodes"
                             + ("" if (a and b and a['count'] != b['count']) or not (a and b) else " (same count, other nodes)"))
        for key in ("inputs", "outputs", "initializers"):
            if recorded[key] != current[key]:
                lines.append(f"  {key}: {recorded[key]} -> {current[key]}")
    elif recorded["sequence"] != current["sequence"]:
        lines.append("same nodes, in another order")
    return lines


def main() -> int:
    from bench_speed import DEFAULT_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--check", action="store_true",
                        help="compare with the recorded fingerprints and write nothing; exit status 1 on a difference")
    parser.add_argument("--dump", type=Path, help="also write each graph's canonical nodes to DIR/MODEL.TARGET.txt")
    _report.add_flags(parser, RESULTS, tables=False)
    args = parser.parse_args()
    recorded = {}
    if args.out.is_file():
        recorded = {(r["model"], r["target"]): r for r in _report.read_results(args.out)["rows"]}
    elif args.check:
        parser.error(f"--check needs a recorded {args.out}")
    meta = _report.start_run("engines.md", (), versions=("onnxruntime", "torch", "torchvision", "onnx-ir"))
    rows, differences = [], 0
    for name in args.models:
        for target in args.targets:
            model = export(name, target)
            dump = args.dump / f"{name}.{target}.txt" if args.dump else None
            row = {"model": name, "target": target, **graph_fingerprint(model.graph, dump)}
            del model
            gc.collect()
            rows.append(row)
            before = recorded.get((name, target))
            if before is None:
                status = ["not recorded before"]
            else:
                status = compare(before, row)
            differences += bool(status) and before is not None
            print(f"{name} {target}: {row['nodes']} nodes, {row['graph']}: "
                  + ("\n  ".join(status) if status else "identical to the record"), flush=True)
    if args.check:
        print(f"{differences} of {len(rows)} graphs differ from {args.out.name}")
        return 1 if differences else 0
    kept = [r for key, r in recorded.items() if key not in {(r2["model"], r2["target"]) for r2 in rows}]
    _report.write_results(args.out, meta, kept + rows)
    if not args.no_docs:
        _report.publish("engines.md", {})  # cited in the page's prose; refreshes the run index
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
