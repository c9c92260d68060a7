"""Export sources: turn a classifier into a gradmap ONNX model with an explicit input-gradient graph.

Each source adapts one framework (torchvision, timm and Hugging Face through torch; bare ONNX files
and other frameworks' converted graphs through :mod:`._foreign`) and hands a forward ONNX graph to the framework-free graph code (:mod:`gradmap.graph`). Importing this package
imports no framework: the names below load their source's modules on first use, so an export that
needs no torch runs without it. The torch sources need the ``[export]`` extra.
"""

from __future__ import annotations

import importlib

__all__ = [
    "ClassifierGraph", "ExportError", "ExportReport", "ParityError", "UnsupportedOpsError", "build_gradient_model",
    "classifier_names", "export_graph", "export_module", "export_named_model", "export_torchvision",
    "load_torchvision", "prepare_classifier", "verify_parity",
]

#: Where each lazily loaded name lives. Even the graph code's names load on first use: the CLI reads
#: gradmap.export.presets (plain data) in the slim runtime, where onnx and onnx-ir are not installed.
_LAZY = {
    "ExportError": "gradmap.graph", "ExportReport": "gradmap.graph", "ParityError": "gradmap.graph",
    "UnsupportedOpsError": "gradmap.graph",
    "build_gradient_model": "._api", "export_module": "._api", "export_torchvision": "._api", "verify_parity": "._api",
    "export_named_model": "._sources", "classifier_names": "._torchvision", "load_torchvision": "._torchvision",
    # foreign graphs (bare ONNX files, Keras through tf2onnx): no torch
    "ClassifierGraph": "._foreign", "prepare_classifier": "._foreign", "export_graph": "._foreign",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
