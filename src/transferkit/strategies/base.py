"""A Strategy decides which parameters train, at which learning rate, and which modules stay in eval mode."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..errors import UserError
from ..model import Classifier


def decay_groups(parameters: list[nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """Optimiser groups at ``lr``: weight matrices decayed; biases and normalisation scales (all 1-D) not,
    as in BERT and timm, since decay would only shrink them."""
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    return ([{"params": decay, "lr": lr, "weight_decay": weight_decay}] if decay else []) + (
        [{"params": no_decay, "lr": lr, "weight_decay": 0.0}] if no_decay else [])


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_freeze_batchnorm(strategy: "Strategy", model: nn.Module, model_name: str) -> None:
    """--freeze-batchnorm on a model without BatchNorm would silently do nothing: say so instead."""
    if strategy.freeze_batchnorm and not batchnorm_layers(model):
        raise UserError(f"'freeze_batchnorm' is set but model '{model_name}' has no BatchNorm layers "
                        f"(transformers use LayerNorm, which keeps no running statistics): drop --freeze-batchnorm")


class Strategy:
    """Base class. Subclasses set ``name``/``summary`` and override ``frozen_groups``.

    ``uses_feature_cache``: the backbone is entirely frozen, so its features are computed once and
    only the head trains on them.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_feature_cache: ClassVar[bool] = False
    # The frozen groups are the same lowest layers for the whole run, so their output can be computed once.
    fixed_frozen_prefix: ClassVar[bool] = False
    default_lr: ClassVar[float | None] = None  # when set, used instead of the per-modality default
    # Every BatchNorm layer in eval mode while training (its affine scale and shift still train): batch
    # statistics of small batches are noisy and overwrite the pretrained ones (as timm's freeze_batch_norm_2d,
    # and detection fine-tuning's frozen BatchNorm, avoid).
    freeze_batchnorm: bool = False

    def frozen_groups(self, model: Classifier) -> list[nn.Module]:
        """The backbone layer groups that do not train."""
        return []

    def apply(self, model: Classifier) -> None:
        """Set ``requires_grad`` on every parameter of ``model``."""
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        for group in self.frozen_groups(model):
            for parameter in group.parameters():
                parameter.requires_grad_(False)

    def set_train_mode(self, model: Classifier) -> None:
        """``model.train()``, but frozen layers stay in eval mode so BatchNorm statistics and dropout stay pretrained."""
        model.train()
        for group in self.frozen_groups(model):
            group.eval()
        if self.freeze_batchnorm:
            for module in batchnorm_layers(model):
                module.eval()

    def prepare(self, model: Classifier) -> None:
        """Change the architecture before training if the strategy needs to (e.g. insert adapters)."""

    def on_epoch_start(self, model: Classifier, epoch: int) -> None:
        """Called by the engine before each epoch (0-based); phase-based strategies change what trains here."""

    def lr_blocks(self, model: Classifier, lr: float, head_lr: float | None) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, learning rate) pairs covering every parameter the optimiser should hold."""
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        return [(backbone, lr), (list(model.head.parameters()), head_lr or lr)]

    def param_groups(self, model: Classifier, lr: float, head_lr: float | None, weight_decay: float,
                     backbone_weight_decay: float | None = None) -> list[dict]:
        """Optimiser groups: each LR block split into decayed and non-decayed (1-D) parameters.

        ``backbone_weight_decay`` overrides the decay of backbone parameters (L2-SP replaces it).
        """
        head_ids = {id(p) for p in model.head.parameters()}
        groups = []
        for parameters, block_lr in self.lr_blocks(model, lr, head_lr):
            block_decay = weight_decay
            if backbone_weight_decay is not None and parameters and id(parameters[0]) not in head_ids:
                block_decay = backbone_weight_decay
            groups += decay_groups(parameters, block_lr, block_decay)
        return groups

    @staticmethod
    def trainable_parameters(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
