"""What serving calls to predict: a run's PyTorch model or its ONNX export, behind one small interface.

Both take raw inputs (a list of texts, or a list of decoded RGB images as uint8 arrays) and return
class probabilities. The ONNX predictor never imports PyTorch: it preprocesses with the run's saved fast
tokenizer or image settings in NumPy (``preprocess``), so a server needs only onnxruntime, tokenizers and
NumPy beside the web stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ..errors import UserError
from ..run_directory import model_directory
from .preprocess import TextEncoder, images_to_array


class Predictor(Protocol):
    classes: list[str]
    modality: str
    runtime: str
    backbone_spec: dict

    def predict_proba(self, inputs) -> np.ndarray: ...

    def truncated(self, texts: Sequence[str]) -> list[bool]: ...


class TorchPredictor:
    """A run's PyTorch model (LoRA adapters kept as trained)."""

    runtime = "torch"

    def __init__(self, model):
        self.model = model  # a FineTunedModel or an EnsembleModel: both predict and flag truncation
        self.classes = model.classes
        self.modality = model.modality
        self.backbone_spec = model.backbone_spec
        self.task = getattr(model, "task", None)

    @classmethod
    def load(cls, run: str | Path, task: str | None = None) -> "TorchPredictor":
        from ..saved_model import FineTunedModel

        return cls(FineTunedModel.load(run, task))

    def predict_proba(self, inputs) -> np.ndarray:
        return self.model.predict_proba(inputs)

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        return self.model.truncated(texts)


class OnnxPredictor:
    """A run's ONNX export run by onnxruntime, with the run's saved preprocessing."""

    runtime = "onnx"

    def __init__(self, run: str | Path, onnx_path: str | Path | None = None, batch_size: int = 64, threads: int = 0):
        try:
            import onnxruntime
        except ImportError:
            raise UserError("the ONNX runtime needs onnxruntime: pip install 'transferkit[deploy]'") from None
        directory = model_directory(run)
        meta = json.loads((directory / "transferkit.json").read_text())
        path = Path(onnx_path) if onnx_path else Path(run) / "model.onnx"
        if not path.is_file():
            raise UserError(f"{path} does not exist: run 'transferkit export {run} --format onnx' first, or pass --onnx PATH")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.classes = list(meta["classes"])
        self.backbone_spec = dict(meta["backbone"])
        self.backbone_spec.pop("adapter", None)  # adapters are merged into the exported weights
        family = self.backbone_spec.get("family")
        self.modality = "text" if family in ("hf-text", "static-embedding") else "image"
        self.batch_size = batch_size
        self.path = path
        if self.modality == "text":
            self.encoder = TextEncoder(directory / "backbone", int(self.backbone_spec["max_length"]),
                                       add_special_tokens=family == "hf-text")

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {name: feeds[name] for name in self.input_names})[0]

    def predict_proba(self, inputs) -> np.ndarray:
        if self.modality == "text":
            ids, _ = self.encoder.encode(inputs)
            # Texts of similar length batched together, as in training: less padding, same results.
            order = np.argsort([len(row) for row in ids], kind="stable")
            chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            logits = np.empty((len(ids), len(self.classes)), dtype=np.float32)
            for chunk in chunks:
                logits[chunk] = self._run(self.encoder.pad([ids[i] for i in chunk]))
        else:
            spec = self.backbone_spec
            images = np.asarray(inputs.pixels) if hasattr(inputs, "pixels") else list(inputs)
            logits = np.concatenate([self._run({"pixel_values": images_to_array(
                images[i : i + self.batch_size], int(spec["image_size"]), spec["mean"], spec["std"])})
                for i in range(0, len(images), self.batch_size)])
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        return self.encoder.encode(texts)[1]


def load_predictor(run: str | Path, runtime: str = "torch", onnx_path: str | Path | None = None,
                   task: str | None = None) -> Predictor:
    if runtime == "torch":
        return TorchPredictor.load(run, task)
    if task is not None:
        raise UserError("--task (one task of a multi-task run) is served with --runtime torch")
    if runtime == "onnx":
        return OnnxPredictor(run, onnx_path)
    raise UserError(f"unknown runtime '{runtime}': choose torch or onnx")
