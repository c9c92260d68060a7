"""gradmap's graph code: everything between a forward ONNX classifier and a written gradmap model.

Imports no deep-learning framework (onnx, onnx-ir and numpy only), so every export source uses it:
torch, timm and Hugging Face models traced by ``torch.onnx``, Keras models converted by tf2onnx, and
bare ONNX files.

- :mod:`.gradient`: the gradient pass, one vector-Jacobian rule per ONNX op type;
- :mod:`.lowering`: engine-specific rewrites of the portable gradient graph (onnxruntime's CPU provider);
- :func:`add_gradient` (:func:`add_forward_outputs` for a forward-only model), :func:`finish`,
  :func:`write_atomic`: append the gradient, write the metadata
  and check the model, write it so that no reader sees half a file.
"""

from ._model import ExportReport, add_forward_outputs, add_gradient, check_forward_only, finish, op_histogram, write_atomic
from .errors import ExportError, ParityError, UnsupportedOpsError

__all__ = ["ExportError", "ExportReport", "ParityError", "UnsupportedOpsError", "add_forward_outputs", "add_gradient",
           "check_forward_only", "finish", "op_histogram", "write_atomic"]
