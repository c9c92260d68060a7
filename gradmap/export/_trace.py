"""torch.nn.Module -> ONNX forward graph (onnx-ir) with gradmap's input and output names."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx_ir as ir
import torch

from gradmap import contract
from gradmap.graph.errors import ExportError

__all__ = ["trace_to_onnx"]

logger = logging.getLogger(__name__)


def trace_to_onnx(module: torch.nn.Module, input_size: tuple[int, int], *, opset: int = 18) -> ir.Model:
    """Export ``module`` (in eval mode) with ``torch.onnx.export(dynamo=True)`` and a dynamic batch.

    The single input is renamed ``image`` and the single output ``logits``.
    """
    height, width = input_size
    example = torch.randn(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1, max=4096)
    module = module.eval()
    # torch.onnx prints progress lines and warns about things gradmap checks itself (parity below).
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            traced = module
            if any(isinstance(m, torch.nn.RNNBase) for m in module.modules()):
                traced = _recurrences_unrolled(module, example, batch)
            program = torch.onnx.export(
                traced, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                opset_version=opset, optimize=True, verbose=False, external_data=False,
            )
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: {type(e).__name__}: {e}") from e
    model = program.model
    graph = model.graph
    _register_loose_constants(graph)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ExportError(
            f"expected a classifier with one input and one output, got {len(graph.inputs)} inputs and "
            f"{len(graph.outputs)} outputs"
        )
    graph.inputs[0].name = contract.INPUT_IMAGE
    out = graph.outputs[0]
    if out.shape is None or len(out.shape) != 2:
        raise ExportError(f"the model's output should be logits [N, K], got shape {out.shape}")
    if out.producer() is None or out in graph.inputs:
        raise ExportError("the model's output is not computed from its input")
    out.name = contract.OUTPUT_LOGITS
    return model


def _register_loose_constants(graph: ir.Graph) -> None:
    """Make constant node inputs that belong to no graph initializers again.

    torch.onnx's optimizer (onnxscript 0.7.2, torch 2.14) can hand a Clip new min/max values that carry
    a constant but are registered nowhere: timm's Gemma 4 ViT clamps every linear layer's input and
    output to buffers of -inf/inf, and the exported graph fails ONNX's checker ("input 'mul_2_min_1'
    ... is not output of any previous nodes").
    """
    for node in graph:
        for value in node.inputs:
            if (value is not None and value.producer() is None and value.const_value is not None
                    and not value.is_graph_input() and not value.is_initializer()):
                graph.register_initializer(value)


def _recurrences_unrolled(module: torch.nn.Module, example: torch.Tensor, batch) -> torch.export.ExportedProgram:
    """The module as an exported program whose LSTM, GRU and RNN layers are unrolled over time.

    torch.onnx would emit ONNX's LSTM/GRU/RNN operators, whose backward needs every step's gates and
    cell states, which those operators do not output. torch's own decompositions unroll them into
    MatMul, Sigmoid, Tanh and Mul over the (static) sequence length, ops with small gradient rules.
    Sequencer2D's bidirectional LSTMs run along image rows and columns, so the length is a spatial size.
    """
    from torch._decomp import decomposition_table

    aten = torch.ops.aten
    recurrent = (aten.lstm.input, aten.lstm.data, aten.gru.input, aten.gru.data, aten.rnn_tanh.input,
                 aten.rnn_tanh.data, aten.rnn_relu.input, aten.rnn_relu.data)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    return program.run_decompositions({op: decomposition_table[op] for op in recurrent if op in decomposition_table})
