"""gradmap's gradient pass: append an explicit backward graph in standard ONNX ops."""

from ._pass import Appended, append_gradient, append_vjp, check_rules, check_settings, differentiable_nodes, find_cam_layer
from ._registry import NON_DIFFERENTIABLE, RULES, is_supported

__all__ = ["Appended", "append_gradient", "append_vjp", "check_rules", "check_settings", "differentiable_nodes",
           "find_cam_layer", "RULES", "NON_DIFFERENTIABLE", "is_supported"]

# What a lowering pass (gradmap/graph/lowering) may use of the gradient pass, and nothing else: the
# builder, the regions of the rules' calls, the forward-graph predicates, and the forms the rules
# publish for rewriting (tests/test_lowering.py checks that lowering imports only these).
from ._builder import Builder  # noqa: E402
from ._context import VJP_KEY, Region  # noqa: E402
from ._match import producer, single_use  # noqa: E402
from ._rules.convolution import adjoint_conv, flipped_transposed  # noqa: E402
from ._rules.elementwise import HARD_SWISH_ALPHA  # noqa: E402
from ._rules.normalization import batch_norm_factor  # noqa: E402

LOWERING_INTERFACE = ("Builder", "VJP_KEY", "Region", "producer", "single_use", "adjoint_conv", "flipped_transposed",
                      "HARD_SWISH_ALPHA", "batch_norm_factor")
__all__ += list(LOWERING_INTERFACE)
