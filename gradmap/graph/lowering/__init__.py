"""Lowering: engine-specific rewrites of gradmap's portable gradient graph.

The gradient pass (:mod:`gradmap.graph.gradient`) writes each rule as its plain vector-Jacobian
product in standard ONNX ops, a graph every engine computes alike (``--target portable``). A
lowering rewrites that graph for one engine, exactly: the same logits and gradients, computed in
forms that engine runs faster. ``cpu`` is onnxruntime's CPU provider, written into the file by ``--target cpu`` or applied by
the runtime when it loads a portable file (:mod:`.at_load`, for the block of the CPU that runs it):

- before the gradient pass, on the forward graph (:mod:`.cpu_forward`): ``split_hard_swish``,
  ``pad_channels`` (zero channels up to a multiple of the block), ``spread_channel_scales``
  (squeeze-and-excitation scales spread by a nearest Resize);
- after it, on the regions of the backward graph (:mod:`.cpu_backward`): ``fold_batch_norm``,
  ``conv_adjoint``, ``relu_pool_mask``, ``max_pool_indices``, ``relu_mask``, ``hard_swish_steps``, ``silu_affine``,
  ``resize_sum_scale``, ``spread_per_channel``, ``concat_split``.

Before either target's output, the engine passes (:mod:`.engines`) rewrite the forms of the
portable graph that an engine is known to compute wrongly, one pass per engine bug.

One setting, the block (``channel_multiple``: 16 for AVX-512, 8 for AVX2), reaches every pass.
An export (:func:`gradmap.graph.add_gradient`) runs the steps in this order:

    lowering = plan(target, channel_multiple)
    request = gradient.prepare(model, ...)                       # checks; finds the values to keep
    lowering.lower_forward(model.graph, request.needs_grad, request.keep)
    appended = gradient.append_gradient(model, request)           # the rules and the engine passes
    lowering.lower_backward(model.graph, appended)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir

from gradmap import contract

from ..errors import ExportError
from . import cpu_backward, cpu_forward
from ._rewrite import Rewriter, prune
from .cpu_forward import BLOCK

__all__ = ["BLOCK", "Plan", "plan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """The lowering of one export: its target and block size (0: no channel padding)."""

    target: str
    block: int
    skip: frozenset[str] = frozenset()  # cpu backward passes not to run (bench/floor.py)

    def lower_forward(self, graph: ir.Graph, needs_grad: set[ir.Value], keep: set[ir.Value]) -> int:
        """The forward rewrites, in place; returns how many nodes or channel groups changed."""
        if self.target != "cpu":
            return 0
        rewritten = cpu_forward.split_hard_swish(graph, needs_grad, keep=keep)
        if self.block:
            rewritten += cpu_forward.pad_channels(graph, keep=keep, block=self.block)
            rewritten += cpu_forward.spread_channel_scales(graph, block=self.block)
        return rewritten

    def lower_backward(self, graph: ir.Graph, appended) -> dict[str, int]:
        """The backward passes over the regions of the finished graph, in place; ``appended`` is
        what the gradient pass returned (:class:`gradmap.graph.gradient.AppendedGradient`: the
        regions, the forward nodes, the values whose gradients are outputs). Returns each pass's
        count of rewritten regions."""
        if self.target != "cpu":
            return {}
        rewriter = Rewriter(graph, self.block or BLOCK, appended.forward_nodes, appended.keep)
        counts = {}
        for lowering_pass in cpu_backward.PASSES:
            if lowering_pass.__name__ in self.skip:
                continue
            counts[lowering_pass.__name__] = lowering_pass(rewriter, appended.regions)
        prune(graph)
        logger.debug("cpu lowering: %s", counts)
        return counts


def plan(target: str, channel_multiple: int | None = None, skip=()) -> Plan:
    """The lowering for ``target`` (``cpu`` or ``portable``); ``channel_multiple`` defaults to the
    block for ``cpu`` and must be 0 or unset for ``portable`` (padding is a CPU-layout rewrite);
    ``skip`` names backward passes (of ``cpu_backward.PASSES``) not to run."""
    known = {p.__name__ for p in cpu_backward.PASSES}
    if set(skip) - known:
        raise ExportError(f"unknown lowering passes {sorted(set(skip) - known)}; the cpu target's are {sorted(known)}")
    if target not in contract.TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(contract.TARGETS)}")
    if channel_multiple is not None and channel_multiple < 0:
        raise ExportError(f"channel_multiple must be 0 (no padding) or positive, not {channel_multiple}")
    if target == "portable":
        if channel_multiple:
            raise ExportError("channel padding (--channel-multiple) is part of the cpu target's lowering; "
                              "a portable export has none: leave it unset or 0")
        return Plan("portable", 0, frozenset(skip))
    return Plan("cpu", BLOCK if channel_multiple is None else channel_multiple, frozenset(skip))
