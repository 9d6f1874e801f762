"""Export a run's model to ONNX, checked against PyTorch before it is kept.

LoRA/IA3 adapters are merged first, so the exported graph is the plain architecture. The graph takes
what the backbone's ``collate`` produces (``input_ids`` + ``attention_mask`` for text, ``pixel_values``
for images) with a dynamic batch (and sequence) axis and returns the logits. The check runs the export
in onnxruntime on inputs of other shapes than the one traced and compares logits with PyTorch; above
the tolerance the file is not kept.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..saved_model import FineTunedModel
from .model_card import write_model_card

DEFAULT_TOLERANCE = 1e-4
DEFAULT_OPSET = 18


class LogitsOnly(nn.Module):
    """The classifier with named tensor inputs, as ONNX wants them."""

    def __init__(self, classifier: nn.Module, input_names: list[str]):
        super().__init__()
        self.classifier = classifier
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(**dict(zip(self.input_names, inputs)))


def _example_batches(model: FineTunedModel, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of several shapes: the first is traced, the others check that the dynamic axes hold."""
    backbone = model.model.backbone
    generator = np.random.default_rng(seed)
    if backbone.modality == "text":
        tokenizer = backbone.tokenizer  # a transformers tokenizer, or a plain `tokenizers` one (static embeddings)
        vocab = tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size") else len(tokenizer)
        longest = min(int(backbone.max_length), 64)

        def texts_batch(lengths):
            rows = [generator.integers(0, vocab, size=n).tolist() for n in lengths]
            return backbone.collate(rows, list(range(len(rows))))

        return [texts_batch([longest // 2, 7, 3]), texts_batch([5]), texts_batch(list(range(2, longest + 1, 4)))]
    size = int(backbone.spec.get("image_size", 224))
    images = [generator.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(8)]
    return [backbone.collate(images, list(range(n))) for n in (2, 1, 8)]


def _export(wrapper: nn.Module, example: dict[str, torch.Tensor], path: Path, opset: int) -> str:
    """Write the graph with the dynamo exporter (torch's supported path); fall back to the TorchScript
    exporter for models it cannot trace. Returns the exporter used."""
    names = list(example)
    args = tuple(example[n].contiguous() for n in names)
    # DYNAMIC lets torch.export derive the axes' ranges from the model (e.g. its position embeddings).
    dynamic = {0: torch.export.Dim.DYNAMIC}
    if "input_ids" in example:
        dynamic = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    try:
        torch.onnx.export(wrapper, args, str(path), dynamo=True, input_names=names, output_names=["logits"],
                          # one entry per forward() argument; *inputs is a single (tuple) argument
                          dynamic_shapes=(tuple(dynamic for _ in names),), opset_version=opset,
                          external_data=False, verbose=False)
        return "dynamo"
    except Exception as dynamo_error:  # noqa: BLE001  (any tracing failure: try the other exporter)
        axes = {n: {k: ("batch" if k == 0 else "sequence") for k in dynamic} for n in names}
        axes["logits"] = {0: "batch"}
        try:
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=opset)
        except Exception as error:  # noqa: BLE001
            raise UserError(f"ONNX export of this model failed with both exporters (dynamo: "
                            f"{type(dynamo_error).__name__}: {str(dynamo_error)[:200]}; torchscript: "
                            f"{type(error).__name__}: {str(error)[:200]})") from None
        return "torchscript"


def _annotate(path: Path, metadata: dict[str, str]) -> None:
    """Store classes and preprocessing in the ONNX file itself, so the file describes its own outputs."""
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(graph, str(tmp))
    os.replace(tmp, path)


def export_onnx(run: str | Path, out: str | Path | None = None, *, tolerance: float = DEFAULT_TOLERANCE,
                opset: int = DEFAULT_OPSET, task: str | None = None) -> dict:
    """Export ``run``'s model to ONNX (default ``RUN/model.onnx``) and check it in onnxruntime.

    Returns what was done: path, exporter, bytes, the largest absolute logit difference from PyTorch
    over the check batches and its tolerance. Raises ``UserError`` (and keeps no file) when the export
    differs by more than ``tolerance``. ``task``: the task of a multi-task run to export (its head over
    the shared backbone; default file ``RUN/model-TASK.onnx``).
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime: pip install 'transferkit[deploy]'") from None
    if tolerance <= 0:
        raise UserError(f"--tolerance must be positive, got {tolerance}")
    run = Path(run)
    model = FineTunedModel.load(run, task)
    if not isinstance(model, FineTunedModel):
        raise UserError(f"{run} is an ensemble of several models: export its members one by one, or build a "
                        f"'soup' ensemble, which is a single model")
    merged = bool(model.model.backbone.spec.get("adapter"))
    model.merge_adapters()
    classifier = model.model.cpu().eval()
    path = Path(out) if out else run / (f"model-{task}.onnx" if task else "model.onnx")
    if path.suffix != ".onnx":
        raise UserError(f"--out {path}: the ONNX file name must end in .onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = _example_batches(model)
    wrapper = LogitsOnly(classifier, list(batches[0])).eval()
    tmp = path.with_name(path.name + ".partial.onnx")
    started = time.time()
    with torch.no_grad():
        exporter = _export(wrapper, batches[0], tmp, opset)
    export_seconds = time.time() - started

    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    max_diff, shapes = 0.0, []
    with torch.no_grad():
        for batch in batches:
            reference = wrapper(*(batch[n] for n in batch)).numpy()
            got = session.run(None, {n: batch[n].contiguous().numpy() for n in batch})[0]
            max_diff = max(max_diff, float(np.abs(got - reference).max()))
            shapes.append(list(next(iter(batch.values())).shape))
    if not max_diff <= tolerance:
        tmp.unlink(missing_ok=True)
        raise UserError(f"the ONNX export of {run} differs from PyTorch by {max_diff:.3g} on the logits, above the "
                        f"tolerance {tolerance:g}: nothing was written; try another --opset or raise --tolerance")
    _annotate(tmp, {"transferkit.classes": json.dumps(model.classes),
                    "transferkit.modality": model.modality,
                    "transferkit.backbone": json.dumps(model.model.backbone.spec)})
    os.replace(tmp, path)
    result = {"path": str(path), "format": "onnx", "exporter": exporter, "opset": opset, "bytes": path.stat().st_size,
              "adapters_merged": merged, "max_abs_diff": max_diff, "tolerance": tolerance, "checked_shapes": shapes,
              "inputs": list(batches[0]), "export_seconds": round(export_seconds, 1),
              "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    if (run / "config.yaml").is_file():
        (run / "export.json").write_text(json.dumps(result, indent=1))
        write_model_card(run)
    return result
