"""Continued pre-training: keep training a text encoder's masked-language-model objective on unlabelled
text from the target domain before fine-tuning it on few labels.

Gururangan et al. 2020, "Don't Stop Pretraining: Adapt Language Models to Domains and Tasks". The
checkpoint is loaded with a masked-LM head (a new one, tied to the token embeddings, when it was saved
without one, as sentence encoders are); training runs in the same engine as fine-tuning (schedule,
checkpoints, ``resume``, progress); the encoder alone is saved as a transformers checkpoint that
``transferkit fit --model OUT`` takes like any other.

A new head is first trained alone with the encoder frozen (``head_warmup_epochs``, on by default when the
head is new), then everything trains: the random head's large early gradients would otherwise push the
encoder away from its pretrained weights before the head means anything (the LP-FT argument of Kumar et
al. 2022, applied to the masked-LM head; ULMFiT's gradual unfreezing starts the same way).

Images: the entry point is text-only for now. A self-supervised image objective (e.g. masked image
modelling or SimCLR-style contrastive learning) would be another objective class beside
``MaskedLMObjective`` with the image backbone's collate, and the same engine call.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones.hf_text import pad_token_ids
from .backbones.registry import text_model_source
from .engine.batches import Batches
from .engine.checkpoint import CheckpointDir, atomic_write_text
from .engine.log import JsonlLog
from .engine.loop import Engine, EngineSettings
from .errors import UserError
from .objectives.masked_lm import MaskedLMObjective, mask_tokens, masked_lm_evaluator
from .strategies.base import decay_groups


def read_texts(path: str | Path, text_column: str | None = None) -> tuple[list[str], int]:
    """Texts from a .txt file (one per line) or a table's text column; returns (texts, empty lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text data {path} does not exist: check the path")
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise UserError(f"{path} is not UTF-8 text (byte {error.start}): re-save it as UTF-8") from None
        texts = [line.strip() for line in lines if line.strip()]
        return texts, len(lines) - len(texts)
    from .data.readers import read_examples

    examples = read_examples(path, text_column=text_column, label_column=None, require_labels=False)
    if examples.modality != "text":
        raise UserError(f"{path} holds images: continued pre-training takes text (a .txt file or a table's text column)")
    return list(examples.inputs), 0


def _load_masked_lm(source: str, allow_pickle: bool):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model, info = AutoModelForMaskedLM.from_pretrained(source, dtype=torch.float32, use_safetensors=not allow_pickle,
                                                           output_loading_info=True)
    except ValueError as error:  # a config with no masked-LM class (e.g. a decoder-only or vision model)
        raise UserError(f"model '{source}' cannot do masked language modelling ({str(error).splitlines()[0][:120]}): "
                        f"choose an encoder such as BERT, RoBERTa or MiniLM") from None
    if tokenizer.mask_token_id is None:
        raise UserError(f"model '{source}' has no mask token in its tokenizer: masked language modelling needs one")
    new_head = any(key.startswith(("cls.", "lm_head", "vocab_", "predictions")) for key in info["missing_keys"])
    return model, tokenizer, new_head


def pretrain(model: str, text_data: str, out: str, *, text_column: str | None = None, epochs: int = 1,
             batch_size: int = 32, lr: float = 5e-5, mask_probability: float = 0.15, max_length: int | None = None,
             max_examples: int | None = None, val_fraction: float = 0.05, seed: int = 0, precision: str = "fp32",
             head_warmup_epochs: int | None = None, head_warmup_lr: float = 1e-3,
             allow_pickle: bool = False, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Continue masked-LM pre-training of ``model`` on the texts in ``text_data``; save the encoder to ``out``.

    ``head_warmup_epochs`` (default: 1 when the checkpoint has no masked-LM head, else 0) first trains the
    head alone at ``head_warmup_lr`` with the encoder frozen."""
    if not 0 < mask_probability < 1:
        raise UserError(f"--mask-probability is {mask_probability}: it must be in (0, 1) (0.15 is BERT's)")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction is {val_fraction}: it must be in (0, 1)")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise UserError("--epochs and --batch-size must be >= 1 and --lr positive")
    if (head_warmup_epochs is not None and head_warmup_epochs < 0) or not head_warmup_lr > 0:
        raise UserError("--head-warmup-epochs must be >= 0 (0: no warm-up) and --head-warmup-lr positive")
    out_dir = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other")
    if out_dir.exists() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise UserError(f"{out_dir} already exists: choose another --out, --resume it, or --overwrite it")
    if resume and not (out_dir / "checkpoints").is_dir():
        raise UserError(f"{out_dir} has no checkpoints to resume from: drop --resume")
    texts, skipped = read_texts(text_data, text_column)
    if max_examples:
        texts = texts[:max_examples]
    if len(texts) < 2:
        raise UserError(f"{text_data} has {len(texts)} non-empty texts: continued pre-training needs many (thousands)")
    source = text_model_source(model)
    network, tokenizer, new_head = _load_masked_lm(source, allow_pickle)
    limit = int(getattr(network.config, "max_position_embeddings", 512) or 512)
    max_length = max_length or min(256, limit, int(getattr(tokenizer, "model_max_length", limit) or limit))

    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ids: list[list[int]] = []
    for start in range(0, len(texts), 4096):  # in chunks: only the ids stay alive, not the tokenizer's encodings
        ids += tokenizer(texts[start:start + 4096], truncation=True, max_length=max_length, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = max(1, min(2000, int(round(val_fraction * len(ids)))))
    val_ids, train_ids = [ids[i] for i in order[:n_val]], [ids[i] for i in order[n_val:]]
    special = set(tokenizer.all_special_ids)
    pad_id = tokenizer.pad_token_id or 0
    train_generator = torch.Generator().manual_seed(seed)

    def collate(rows, indices, generator=None):
        batch = pad_token_ids([rows[i] for i in indices], pad_id)
        # Validation: masks seeded by the examples themselves, identical every epoch.
        generator = generator or torch.Generator().manual_seed(int(indices[0]) * 7919 + len(indices))
        masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], mask_id=tokenizer.mask_token_id,
                                     vocab_size=len(tokenizer), special_ids=special, probability=mask_probability,
                                     generator=generator)
        return {"input_ids": masked, "attention_mask": batch["attention_mask"], "mlm_labels": labels}

    def split_labels(batch: dict) -> dict:
        batch["labels"] = batch["inputs"].pop("mlm_labels")
        return batch

    train = Batches(train_ids, None, lambda rows, idx: collate(rows, idx, train_generator), batch_size, shuffle=True,
                    seed=seed, lengths=[len(r) for r in train_ids], transform=split_labels)
    val = Batches(val_ids, None, collate, batch_size * 2, lengths=[len(r) for r in val_ids], transform=split_labels)
    objective = MaskedLMObjective()
    log = JsonlLog(out_dir / "log.jsonl")

    def engine_for(parameters: list, phase_epochs: int, phase_lr: float, checkpoints: str, description: str) -> Engine:
        settings = EngineSettings(epochs=phase_epochs, schedule="linear", warmup_ratio=0.06, grad_clip=1.0,
                                  precision=precision, monitor="val_loss", patience=None, checkpoint_every=None,
                                  on_divergence="stop", optimizer="adamw", momentum=0.9, accumulate=1, compile=False,
                                  data_parallel=False)
        return Engine(network, decay_groups(parameters, phase_lr, 0.01), objective, train, val, settings,
                      checkpoints=CheckpointDir(out_dir / checkpoints), log=log, description=description,
                      evaluator=masked_lm_evaluator(objective))

    warmup_epochs = (1 if new_head else 0) if head_warmup_epochs is None else head_warmup_epochs
    # The head is what the encoder (base_model) does not hold; a decoder tied to the token embeddings stays frozen
    # with them, so the warm-up trains the head's transform and output bias.
    encoder_ids = {id(p) for p in network.base_model.parameters()}
    head_parameters = [p for p in network.parameters() if id(p) not in encoder_ids]
    if warmup_epochs and not head_parameters:
        raise UserError(f"model '{model}': its masked-LM head has no parameters of its own to warm up: "
                        f"pass --head-warmup-epochs 0")
    before = None
    warmup = None
    if warmup_epochs:
        for parameter in network.parameters():
            parameter.requires_grad_(id(parameter) not in encoder_ids)
        head_engine = engine_for(head_parameters, warmup_epochs, head_warmup_lr, "checkpoints/head-warmup",
                                 "masked-LM head warm-up (encoder frozen)")
        before = head_engine.evaluate(val)
        # On --resume a finished warm-up only reloads its best weights; the main phase's checkpoint then wins.
        head_engine.fit(resume=resume and head_engine.checkpoints.find_resumable() is not None)
        # The best epoch's weights are loaded back, so its validation loss is the warm-up's result.
        warmup = {"epochs": warmup_epochs, "lr": head_warmup_lr, "val_loss_after": head_engine.best_value,
                  "history": head_engine.history}
        for parameter in network.parameters():
            parameter.requires_grad_(True)
    engine = engine_for([p for p in network.parameters() if p.requires_grad], epochs, lr, "checkpoints/main",
                        "masked-LM pre-training")
    before = before or engine.evaluate(val)
    engine.fit(resume=resume and engine.checkpoints.find_resumable() is not None)
    after = engine.evaluate(val)

    # The encoder alone, as a transformers checkpoint (safetensors) that `fit --model OUT` loads.
    encoder_dir = out_dir
    network.base_model.save_pretrained(encoder_dir, safe_serialization=True)
    tokenizer.save_pretrained(encoder_dir)
    for name in ("sentence_bert_config.json", "modules.json", "1_Pooling"):
        if (Path(source) / name).exists() and not (encoder_dir / name).exists():
            copy = shutil.copytree if (Path(source) / name).is_dir() else shutil.copy
            copy(Path(source) / name, encoder_dir / name)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    result = {"model": model, "text_data": str(text_data), "texts": len(texts), "empty_lines_skipped": skipped,
              "train": len(train_ids), "val": len(val_ids), "max_length": max_length, "epochs": epochs, "lr": lr,
              "mask_probability": mask_probability, "new_mlm_head": new_head, "head_warmup": warmup,
              "val_loss_before": before["loss"], "val_loss_after": after["loss"],
              "val_perplexity_before": before["perplexity"], "val_perplexity_after": after["perplexity"],
              "history": engine.history, "seconds": time.time() - started}
    atomic_write_text(out_dir / "pretrain.json", json.dumps(result, indent=1))
    return result
