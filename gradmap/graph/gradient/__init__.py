"""gradmap's gradient pass: append an explicit backward graph in standard ONNX ops.

    request = prepare(model, score=..., backprops=..., cam_layer=..., rules=..., seed=...)
    appended = append_gradient(model, request)      # the rules and the engine passes, in place

:mod:`.formulas` holds the math the rules share with the lowering passes
(:mod:`gradmap.graph.lowering`), which rewrite the regions ``appended`` lists.
:func:`append_forward_outputs` gives a forward-only model its outputs, without a gradient.
"""

from ._pass import (ATTENTION_KEY, AppendedGradient, GradientRequest, append_forward_outputs, append_gradient,
                    append_vjp, differentiable_nodes, prepare, score_seed)
from ._registry import NON_DIFFERENTIABLE, RULES, RuleTable, is_supported

__all__ = ["ATTENTION_KEY", "AppendedGradient", "GradientRequest", "append_forward_outputs", "append_gradient",
           "append_vjp", "differentiable_nodes", "prepare", "score_seed", "RULES", "RuleTable", "NON_DIFFERENTIABLE",
           "is_supported"]
