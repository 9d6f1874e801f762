"""Deployment: ONNX export checked against PyTorch, a model card, and an HTTP server with dynamic batching.

The server and the exporter need the ``deploy`` extra (``pip install 'transferkit[deploy]'``); their
modules import it only when used, so the rest of transferkit works without it. Names are resolved on
first use, so a server on the ONNX runtime never imports PyTorch.
"""

from importlib import import_module

_EXPORTS = {"OnnxPredictor": "predictors", "TorchPredictor": "predictors", "load_predictor": "predictors",
            "export_onnx": "export", "write_model_card": "model_card"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
