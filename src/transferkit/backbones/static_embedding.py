"""Static token embeddings (Model2Vec-style): a text's vector is the weighted mean of its tokens' vectors.

No attention and no layers: a lookup and an average, hundreds of times cheaper than a transformer, and
a strong baseline (Tulkens & van Dongen 2024, Model2Vec; the packaged weights were trained with
tokenlearn). The packaged model stores 10,000 int8 vectors of 64 dimensions, a table mapping each of
the tokenizer's ids to one of them, and a per-token weight. Fine-tuning trains the vectors; the
mapping and the weights stay as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import Backbone
from .hf_text import pad_token_ids

DEFAULT_MAX_LENGTH = 512  # tokens per text, as the package's own encoder takes them


def _package_directory() -> Path:
    try:
        import static_model
    except ImportError:
        raise UserError("model 'static-64' needs its package: pip install tokenlearn-static-model") from None
    return Path(static_model.__file__).resolve().parent / "model"


class StaticEmbeddingBackbone(Backbone):
    modality = "text"

    def __init__(self, tokenizer: Any, vectors: torch.Tensor, mapping: torch.Tensor, token_weights: torch.Tensor,
                 normalize: bool, max_length: int, spec: dict[str, Any]):
        super().__init__()
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.vectors = nn.Embedding.from_pretrained(vectors, freeze=False)
        self.register_buffer("mapping", mapping)
        self.register_buffer("token_weights", token_weights)
        self.normalize = normalize
        self.max_length = max_length
        self.feature_dim = int(vectors.shape[1])
        self.spec = spec

    @classmethod
    def _from_directory(cls, directory: Path, name: str, max_length: int | None) -> "StaticEmbeddingBackbone":
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        config = json.loads((directory / "config.json").read_text())
        tensors = load_file(str(directory / "model.safetensors"))
        # int8 vectors are a quantised direction; their scale is irrelevant once the mean is normalised, and
        # [-1, 1] keeps the usual learning rates meaningful.
        vectors = tensors["embeddings"].float() / 127.0
        spec = {"family": "static-embedding", "name": name, "max_length": int(max_length or DEFAULT_MAX_LENGTH),
                "normalize": bool(config.get("normalize", True)), "vectors": list(vectors.shape),
                "tokens": int(tensors["mapping"].shape[0])}
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), vectors, tensors["mapping"].long(),
                   tensors["weights"].float(), spec["normalize"], spec["max_length"], spec)

    @classmethod
    def from_package(cls, max_length: int | None = None) -> "StaticEmbeddingBackbone":
        return cls._from_directory(_package_directory(), "static-64", max_length)

    @classmethod
    def rebuild(cls, spec: dict[str, Any], directory: Path) -> "StaticEmbeddingBackbone":
        from tokenizers import Tokenizer

        rows, dim = spec["vectors"]
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), torch.zeros(rows, dim),
                   torch.zeros(spec["tokens"], dtype=torch.long), torch.zeros(spec["tokens"]), spec["normalize"],
                   spec["max_length"], dict(spec))

    def save_preprocessing(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))

    def prepare(self, texts: Sequence[str]) -> list[list[int]]:
        # No special tokens: the vectors were trained on the words alone.
        return [encoding.ids[: self.max_length]
                for encoding in self.tokenizer.encode_batch([str(t) for t in texts], add_special_tokens=False)]

    def lengths(self, prepared: list[list[int]]) -> list[int]:
        return [len(ids) for ids in prepared]

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Which texts have more than ``max_length`` tokens (only their first tokens count)."""
        return [len(e.ids) > self.max_length
                for e in self.tokenizer.encode_batch([str(t) for t in texts], add_special_tokens=False)]

    def collate(self, prepared: list[list[int]], indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return pad_token_ids([prepared[i] for i in indices], 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = self.token_weights[input_ids] * attention_mask.to(self.token_weights.dtype)
        summed = (self.vectors(self.mapping[input_ids]) * weights.unsqueeze(-1)).sum(1)
        mean = summed / attention_mask.sum(1, keepdim=True).clamp(min=1).to(summed.dtype)
        return F.normalize(mean, dim=-1) if self.normalize else mean

    def layer_groups(self) -> list[nn.Module]:
        return [self.vectors]
