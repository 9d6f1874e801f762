"""Parameter-efficient strategies through PEFT: the backbone is frozen and small adapters train.

The task head sits outside the PEFT model, so it always trains and is always saved (with PEFT's own
task heads this is a known pitfall: ``modules_to_save`` must name them).
"""

from __future__ import annotations

from ..backbones.adapters import adapter_spec, is_adapter_parameter
from ..config import RunConfig
from ..errors import UserError
from ..model import Classifier
from .base import Strategy
from .registry import register


class AdapterStrategy(Strategy):
    method: str
    default_lr = 5e-4  # adapters start at zero (LoRA) or one (IA3) and need a larger LR than full fine-tuning

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.1, targets: list[str] | None = None):
        self.rank, self.alpha, self.dropout, self.targets = rank, alpha, dropout, targets

    @classmethod
    def from_config(cls, config: RunConfig) -> "AdapterStrategy":
        targets = [t.strip() for t in config.adapter_targets.split(",") if t.strip()] if config.adapter_targets else None
        return cls(config.lora_rank or 8, config.lora_alpha or 16.0,
                   0.1 if config.lora_dropout is None else config.lora_dropout, targets)

    def prepare(self, model: Classifier) -> None:
        host = model.backbone.adapter_host()
        if host is None:
            model.backbone.add_adapters({"method": self.method})  # raises: this backbone takes no adapters
        model.backbone.add_adapters(adapter_spec(host, self.method, self.rank, self.alpha, self.dropout, self.targets))

    def apply(self, model: Classifier) -> None:
        if not model.backbone.spec.get("adapter"):
            raise UserError(f"strategy '{self.name}' needs its adapters added first (Strategy.prepare)")
        for name, parameter in model.backbone.named_parameters():
            parameter.requires_grad_(is_adapter_parameter(name))
        for parameter in model.head.parameters():
            parameter.requires_grad_(True)


@register
class LoRA(AdapterStrategy):
    """Low-rank adapters on the attention projections: W + (alpha / r) * B A, with A, B of rank r.

    Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models". Options: --lora-rank (r, default
    8), --lora-alpha (default 16), --lora-dropout (default 0.1), --adapter-targets (default: PEFT's
    choice for the architecture, e.g. query,value for BERT).
    """

    name = "lora"
    summary = "low-rank adapters on attention (PEFT); backbone frozen, <1% of parameters train"
    method = "lora"


@register
class IA3(AdapterStrategy):
    """Learned rescaling vectors on keys, values and feed-forward activations.

    Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
    Learning" (IA3). Even fewer parameters than LoRA. It also stands in for bottleneck adapters
    (Houlsby et al. 2019), which PEFT does not provide.
    """

    name = "ia3"
    summary = "learned rescaling of keys, values and feed-forward activations (PEFT); ~0.1% of parameters train"
    method = "ia3"
