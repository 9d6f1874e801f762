"""Masked language modelling (BERT's pre-training objective), for continued pre-training on domain text.

Devlin et al. 2019: 15% of the real tokens are chosen; of those, 80% become the mask token, 10% a
random token and 10% stay as they are; the loss is cross-entropy on the chosen positions only.
Padding and special tokens ([CLS], [SEP]) are never chosen. The masking takes an explicit generator
(transformers' collator draws from the global RNG), so validation masks are the same every epoch and
the validation loss is comparable across epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mask_id: int, vocab_size: int,
                special_ids: set[int], probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels): labels hold the original id at chosen positions and -100 elsewhere."""
    eligible = attention_mask.bool()
    for special in special_ids:
        eligible &= input_ids != special
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & eligible
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    draw = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (draw < 0.8)] = mask_id
    replace = chosen & (draw >= 0.8) & (draw < 0.9)
    masked[replace] = torch.randint(vocab_size, input_ids.shape, generator=generator)[replace]
    return masked, labels


class MaskedLMObjective:
    """Cross-entropy over the masked positions of a batch whose ``labels`` come from ``mask_tokens``."""

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(**batch["inputs"]).logits
        labels = batch["labels"]
        # Summed, then divided by at least one: a batch of very short texts may have no masked token at all,
        # where the mean would be 0/0 = NaN; its loss is then 0 (with a graph, so backward still runs).
        total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                                reduction="sum")
        return total / (labels != IGNORE).sum().clamp(min=1), logits


def masked_lm_evaluator(objective: MaskedLMObjective):
    """An Engine evaluator: the masked-token loss (and perplexity) over fixed validation masks."""
    import math

    from ..engine.loop import move_batch

    @torch.no_grad()
    def evaluate(engine, batches) -> dict[str, float]:
        engine.model.eval()
        total, count = 0.0, 0
        for batch in batches.iterate():
            batch = move_batch(engine.device, batch)
            loss, _ = objective(engine.eval_model, batch)
            tokens = int((batch["labels"] != IGNORE).sum())
            total += float(loss) * tokens
            count += tokens
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    return evaluate
