"""Parameter-efficient adapters (LoRA, IA3) on transformers backbones, through the PEFT library.

PEFT owns the adapter layers, their initialisation, merging and its own save format; this module only
resolves which modules to target for a given architecture and checks the user's choices, because
PEFT accepts some invalid ones silently or with an opaque error.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..errors import UserError

# Fallbacks by layer names, for architectures PEFT's own tables do not list. EfficientNet-Lite: its 1x1
# expansion and projection convolutions hold most weights; depthwise convolutions are left alone.
CONV_NET_TARGETS = {"target": ["_expand_conv.conv", "_project_conv.conv"], "feedforward": ["_project_conv.conv"]}
LORA_NAME_PATTERNS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("qkv",), ("query_key_value",))
IA3_FALLBACK = {"target": ["key", "value", "output.dense"], "feedforward": ["output.dense"]}


def _adaptable(module: nn.Module) -> bool:
    """Layers PEFT can adapt here: Linear, and ungrouped convolutions (not depthwise ones)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct name endings of the model's adaptable layers (what target modules can name)."""
    return sorted({".".join(name.split(".")[-2:]) if isinstance(m, nn.Conv2d) else name.rsplit(".", 1)[-1]
                   for name, m in model.named_modules() if _adaptable(m)})


def _matches(model: nn.Module, target: str) -> bool:
    return any(name == target or name.endswith("." + target) for name, m in model.named_modules() if _adaptable(m))


def default_targets(model: nn.Module, method: str) -> dict[str, list[str]]:
    """Target modules for ``method`` on ``model``: PEFT's table for its model type, else by projection names."""
    from peft.utils import constants

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if all(_matches(model, n) for n in CONV_NET_TARGETS["target"]):
        return {"target": list(CONV_NET_TARGETS["target"]),
                **({"feedforward": list(CONV_NET_TARGETS["feedforward"])} if method == "ia3" else {})}
    if method == "lora":
        known = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if known:
            return {"target": list(known)}
        for names in LORA_NAME_PATTERNS:
            if all(_matches(model, n) for n in names):
                return {"target": list(names)}
    else:
        known = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
        feedforward = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
        if known and feedforward:
            return {"target": list(known), "feedforward": list(feedforward)}
        if all(_matches(model, n) for n in IA3_FALLBACK["target"]):
            return {k: list(v) for k, v in IA3_FALLBACK.items()}
    raise UserError(
        f"cannot tell which layers of this {model_type or type(model).__name__} model take {method} adapters: "
        f"pass --adapter-targets with some of its layers: {', '.join(linear_names(model)[:20])}"
    )


def adapter_spec(model: nn.Module, method: str, rank: int, alpha: float, dropout: float,
                 targets: list[str] | None) -> dict[str, Any]:
    """A JSON-able description of the adapters, checked against ``model``."""
    # User-chosen IA3 targets are treated as attention-like (outputs rescaled), none as feed-forward.
    resolved = default_targets(model, method) if not targets else {"target": targets, "feedforward": []}
    missing = [t for t in resolved["target"] if not _matches(model, t)]
    if missing:
        raise UserError(
            f"adapter target modules {missing} match no Linear or convolution layer of the model: choose from "
            f"{', '.join(linear_names(model)[:20])}"
        )
    return {"method": method, "rank": rank, "alpha": alpha, "dropout": dropout, **resolved}


def add_adapters(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """``model`` wrapped by PEFT with the adapters ``spec`` describes; only adapter weights train."""
    from peft import IA3Config, LoraConfig, get_peft_model

    if spec["method"] == "lora":
        config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                            target_modules=spec["target"], bias="none")
    else:
        config = IA3Config(target_modules=spec["target"], feedforward_modules=spec.get("feedforward", []))
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning about PEFT's code,
        # not the user's); nothing else is silenced.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def is_adapter_parameter(name: str) -> bool:
    return "lora_" in name or "ia3_" in name


class PeftAdapterHost:
    """Mixin for backbones that keep their network in one attribute (``adapter_attribute``): add, merge
    and save PEFT adapters on it.

    The adapter description lives in ``self.spec["adapter"]``, so ``rebuild`` re-creates the same
    adapters before the saved weights are loaded.
    """

    adapter_attribute = "encoder"
    spec: dict[str, Any]

    def adapter_host(self) -> nn.Module:
        return getattr(self, self.adapter_attribute)

    def add_adapters(self, adapter: dict[str, Any]) -> None:
        setattr(self, self.adapter_attribute, add_adapters(self.adapter_host(), adapter))
        self.spec["adapter"] = adapter

    def merge_adapters(self) -> None:
        """Fold the adapters into the base weights (no extra latency at inference; needed for export)."""
        if self.spec.get("adapter"):
            setattr(self, self.adapter_attribute, self.adapter_host().merge_and_unload())
            self.spec = {k: v for k, v in self.spec.items() if k != "adapter"}

    def save_adapters(self, directory) -> None:
        """The adapter weights alone, in PEFT's own format (loadable with ``PeftModel.from_pretrained``)."""
        if self.spec.get("adapter"):
            self.adapter_host().save_pretrained(directory)
