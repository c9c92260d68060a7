"""gradmap's gradient pass: append an explicit backward graph in standard ONNX ops."""

from ._pass import ATTENTION_KEY, append_forward_outputs, append_gradient, append_vjp, differentiable_nodes, score_seed
from ._registry import NON_DIFFERENTIABLE, RULES, RuleTable, is_supported

__all__ = ["ATTENTION_KEY", "append_forward_outputs", "append_gradient", "append_vjp", "differentiable_nodes", "score_seed", "RULES",
           "RuleTable", "NON_DIFFERENTIABLE", "is_supported"]
