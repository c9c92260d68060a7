"""Torch side of gradmap: export a classifier with an explicit input-gradient graph.

Needs the ``[export]`` extra (torch, torchvision, onnx, onnxscript, onnx-ir).
"""

from ._api import ExportReport, build_gradient_model, export_module, export_torchvision, verify_parity
from ._errors import ExportError, ParityError, UnsupportedOpsError
from ._sources import export_named_model
from ._torchvision import classifier_names, load_torchvision

__all__ = [
    "ExportError", "ExportReport", "ParityError", "UnsupportedOpsError", "build_gradient_model",
    "classifier_names", "export_module", "export_named_model", "export_torchvision", "load_torchvision",
    "verify_parity",
]
