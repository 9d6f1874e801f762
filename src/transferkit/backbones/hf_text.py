"""Text encoders from Hugging Face transformers (BERT, MiniLM, DistilBERT, RoBERTa, ...) via AutoModel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import UserError
from .adapters import PeftAdapterHost
from .base import Backbone
from .layers import keep_bottom_layers, stack_layer_groups

DEFAULT_MAX_LENGTH = 256
TOKENIZE_CHUNK = 4096


def _sentence_transformers_max_length(source: str) -> int | None:
    """sentence-transformers checkpoints record the sequence length they were trained with."""
    config = Path(source) / "sentence_bert_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_seq_length")
    return None


# These families number positions from padding_idx + 1, so two position embeddings are never used.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text"}


def _position_limit(config: Any) -> int | None:
    """The longest sequence the position embeddings allow (None for relative/rotary positions)."""
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return None
    return int(positions) - (2 if getattr(config, "model_type", "") in _OFFSET_POSITIONS else 0)


class HFTextBackbone(PeftAdapterHost, Backbone):
    """A transformers encoder with mean (or CLS) pooling over the last hidden states."""

    modality = "text"

    def __init__(self, encoder: nn.Module, tokenizer: Any, max_length: int, pooling: str, spec: dict[str, Any]):
        super().__init__()
        self.encoder = encoder
        if getattr(self.encoder, "pooler", None) is not None:
            # The pooler is a pre-training artefact we never use; dropping it avoids dead parameters.
            self.encoder.pooler = None
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pooling = pooling
        self.feature_dim = int(encoder.config.hidden_size)
        self.spec = spec

    @classmethod
    def from_pretrained(cls, source: str, *, max_length: int | None, pooling: str, name: str,
                        allow_pickle: bool = False) -> "HFTextBackbone":
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        # safetensors only, unless the user opts in: pickle weights (.bin) can run code when loaded.
        encoder = AutoModel.from_pretrained(source, dtype=torch.float32, use_safetensors=not allow_pickle)
        positions = _position_limit(encoder.config)
        if max_length is None:
            model_max = getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH
            max_length = _sentence_transformers_max_length(source) or min(int(model_max), DEFAULT_MAX_LENGTH)
            # A tokenizer saved without model_max_length must not let texts outrun the position embeddings.
            max_length = min(max_length, positions or max_length)
        elif positions and max_length > positions:
            raise UserError(f"'max_length' {max_length} is more than model '{name}' can take ({positions} positions): "
                            f"choose at most {positions}")
        spec = {"family": "hf-text", "name": name, "max_length": int(max_length), "pooling": pooling}
        return cls(encoder, tokenizer, int(max_length), pooling, spec)

    @classmethod
    def rebuild(cls, spec: dict[str, Any], directory: Path) -> "HFTextBackbone":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(directory)
        encoder = AutoModel.from_config(config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        backbone = cls(encoder, tokenizer, spec["max_length"], spec["pooling"], dict(spec))
        if spec.get("adapter"):
            backbone.add_adapters(spec["adapter"])
        return backbone

    def save_preprocessing(self, directory: Path) -> None:
        self.encoder.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._pool(hidden, attention_mask)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def depth(self) -> int:
        return int(self.encoder.config.num_hidden_layers)

    def features_by_depth(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          depths: Sequence[int]) -> torch.Tensor:
        """batch x (len(depths) * dim): the features of this encoder cut to each of ``depths`` lowest layers
        (its own depth: its usual features), side by side, from one pass over the layers. A cut copy's output is
        the hidden state after its last layer only where the encoder adds nothing after its layers (BERT does; a
        final norm would not): callers check a few examples against the cut copy itself."""
        output = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        own = self.depth()
        return torch.cat([self._pool(output.last_hidden_state if depth == own else output.hidden_states[depth],
                                     attention_mask) for depth in depths], dim=1)

    def layer_groups(self) -> list[nn.Module]:
        return stack_layer_groups(self.encoder)

    def keep_bottom_layers(self, keep: int) -> None:
        keep_bottom_layers(self.encoder, keep)
        self.spec = {**self.spec, "layers_kept": keep}  # the saved config already rebuilds the shorter model

    def prepare(self, texts: list[str]) -> list[list[int]]:
        # Tokenise once, unpadded: batches are padded to their own longest sequence (dynamic padding).
        # In chunks, keeping only the ids: the tokenizer's per-text encodings (tokens, offsets, masks)
        # would otherwise all be alive at once and make peak memory grow with the data set.
        texts = list(texts)
        ids: list[list[int]] = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            ids += self.tokenizer(texts[start:start + TOKENIZE_CHUNK], truncation=True, max_length=self.max_length,
                                  return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return ids

    def lengths(self, prepared: list[list[int]]) -> list[int]:
        return [len(ids) for ids in prepared]

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Which texts are longer than ``max_length`` tokens (the model sees only their first tokens).

        Only texts that reach the limit after truncation are tokenised again in full, so the common case
        costs one tokenisation.
        """
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
        return [len(row) >= self.max_length and len(self.tokenizer(text, truncation=False, verbose=False,
                                                                   return_attention_mask=False)["input_ids"]) > self.max_length
                for text, row in zip(texts, ids)]

    def collate(self, prepared: list[list[int]], indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return pad_token_ids([prepared[i] for i in indices], self.tokenizer.pad_token_id or 0)


def pad_token_ids(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token id rows padded to the longest one (dynamic padding), with the attention mask; an empty row
    (possible for static embeddings, which add no special tokens) still gets one masked position."""
    width = max(1, max(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
