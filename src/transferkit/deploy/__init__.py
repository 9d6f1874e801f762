"""Deployment: ONNX export checked against PyTorch, a model card, and an HTTP server with dynamic batching.

The server and the exporter need the ``deploy`` extra (``pip install 'transferkit[deploy]'``); their
modules import it only when used, so the rest of transferkit works without it.
"""

from .export import export_onnx
from .model_card import write_model_card
from .predictors import OnnxPredictor, TorchPredictor, load_predictor

__all__ = ["OnnxPredictor", "TorchPredictor", "export_onnx", "load_predictor", "write_model_card"]
