"""Unsupervised domain adaptation objectives: labelled source batches, unlabelled target batches.

``loss = CE(source) + lambda_p * transfer(features_source, features_target)``; each method is a small
class in ``ADAPTATION_METHODS`` that computes its transfer term (and owns any extra trainable module,
such as a domain discriminator). ``lambda_p`` ramps from 0 to ``weight`` with training progress p as
``2 / (1 + exp(-10 p)) - 1`` (Ganin et al. 2016), which keeps the early, still-random discriminator from
wrecking the pretrained features. Methods follow TLlib's reference implementations:

- ``source-only``: no transfer term (the baseline);
- ``target-bn``: no transfer term either, but every target batch goes through the network as the others'
  do, so BatchNorm's statistics are a mix of both domains (the AdaBN effect, Li et al. 2016): the control
  that tells what a transfer term adds beyond what every method gets from the target's statistics;
- ``dan``: multi-kernel MMD between the batches' features (Long et al. 2015);
- ``dann``: a domain discriminator trained through a gradient-reversal layer (Ganin et al. 2016);
- ``coral``: distance between the feature covariances (Sun & Saenko 2016, Deep CORAL);
- ``cdan``: a discriminator on features conditioned on the classifier's predictions (multilinear map),
  with entropy conditioning that trusts confident examples more (Long et al. 2018);
- ``mcc``: minimum class confusion on the target predictions (Jin et al. 2020): no discriminator and no
  feature distance, it lowers how often the classifier confuses classes on target batches, which suits
  tasks where the features shift but the decision rule holds (TLlib's strongest single method on Office);
- ``im``: information maximisation on the target predictions (Shi & Sha 2012; the IM loss of SHOT, Liang et
  al. 2020): each target prediction confident (low entropy) while the batch's mean prediction stays diverse
  (high entropy), so the decision boundary moves into the target's low-density regions without collapsing
  every target example onto one class.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .supervised import cross_entropy

ADAPTATION_METHODS: dict[str, type["AdaptationMethod"]] = {}


def register(cls):
    ADAPTATION_METHODS[cls.name] = cls
    return cls


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient flowing back is multiplied by ``-coefficient``."""
    return _ReverseGradient.apply(x, coefficient)


def ramp(progress: float) -> float:
    """DANN's schedule: 0 at the start of training, close to 1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


def multi_kernel_mmd(source: torch.Tensor, target: torch.Tensor, scales=(0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Squared MMD with a sum of Gaussian kernels whose bandwidths are ``scales`` times the mean pairwise
    squared distance (DAN's multi-kernel MMD, biased estimator)."""
    joint = torch.cat([source, target]).float()
    distances = torch.cdist(joint, joint).pow(2)
    bandwidth = distances.detach().sum() / (len(joint) ** 2 - len(joint))
    kernels = sum(torch.exp(-distances / (bandwidth * s).clamp_min(1e-8)) for s in scales)
    n = len(source)
    return kernels[:n, :n].mean() + kernels[n:, n:].mean() - 2 * kernels[:n, n:].mean()


def coral_distance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||C_s - C_t||_F^2 / (4 d^2), C the features' covariance matrices."""
    d = source.shape[1]

    def covariance(x):
        x = x.float() - x.float().mean(0, keepdim=True)
        return x.T @ x / max(len(x) - 1, 1)

    return (covariance(source) - covariance(target)).pow(2).sum() / (4 * d * d)


def domain_labels(source: int, target: int, device: torch.device) -> torch.Tensor:
    """1 for each source example, 0 for each target example (the discriminator's truth)."""
    return torch.cat([torch.ones(source, device=device), torch.zeros(target, device=device)])


class DomainDiscriminator(nn.Module):
    """Predicts whether features come from the source (1) or the target (0)."""

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class AdaptationMethod(nn.Module):
    """The transfer term. ``forward(fs, ft, logits_s, logits_t, coefficient)`` returns a scalar loss."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_target: ClassVar[bool] = True  # whether target batches go through the network each step

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()


@register
class SourceOnly(AdaptationMethod):
    name = "source-only"
    summary = "train on the labelled source only (the baseline every method is compared with)"
    needs_target = False

    def forward(self, fs, ft, logits_s, logits_t, coefficient):
        return fs.new_zeros(())


@register
class TargetBatchNorm(SourceOnly):
    name = "target-bn"
    summary = ("source loss only, target batches through the network: BatchNorm statistics see both domains "
               "(AdaBN, Li et al. 2016); the control for what a transfer loss adds")
    needs_target = True


@register
class DAN(AdaptationMethod):
    name = "dan"
    summary = "multi-kernel MMD between source and target features (Long et al. 2015)"

    def forward(self, fs, ft, logits_s, logits_t, coefficient):
        # Features only. Adding the MMD of the classifier outputs (the paper's fc8) was measured on amazon ->
        # imdb and pulled the target accuracy far below source-only (docs/benchmarks.md).
        return coefficient * multi_kernel_mmd(fs, ft)


@register
class CORAL(AdaptationMethod):
    name = "coral"
    summary = "align the source and target feature covariances (Deep CORAL, Sun & Saenko 2016)"

    def forward(self, fs, ft, logits_s, logits_t, coefficient):
        return coefficient * coral_distance(fs, ft)


@register
class DANN(AdaptationMethod):
    name = "dann"
    summary = "domain discriminator through a gradient-reversal layer (Ganin et al. 2016)"

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__(feature_dim, num_classes)
        self.discriminator = DomainDiscriminator(feature_dim)

    def forward(self, fs, ft, logits_s, logits_t, coefficient):
        # The discriminator learns to tell the domains apart at full strength; the reversed, scheduled
        # gradient teaches the backbone to make them indistinguishable.
        scores = self.discriminator(reverse_gradient(torch.cat([fs, ft]).float(), coefficient))
        return F.binary_cross_entropy_with_logits(scores, domain_labels(len(fs), len(ft), scores.device))


@register
class CDAN(AdaptationMethod):
    name = "cdan"
    summary = "discriminator on features x predictions, entropy-conditioned (CDAN+E, Long et al. 2018)"
    exact_limit: ClassVar[int] = 4096  # above this many multilinear features, a random projection (as in the paper)

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__(feature_dim, num_classes)
        self.exact = feature_dim * num_classes <= self.exact_limit
        width = feature_dim * num_classes if self.exact else 1024
        if not self.exact:
            generator = torch.Generator().manual_seed(0)
            self.register_buffer("project_features", torch.randn(feature_dim, width, generator=generator))
            self.register_buffer("project_predictions", torch.randn(num_classes, width, generator=generator))
        self.discriminator = DomainDiscriminator(width)

    def _multilinear(self, features: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return torch.bmm(predictions.unsqueeze(2), features.unsqueeze(1)).flatten(1)
        return (features @ self.project_features) * (predictions @ self.project_predictions) / math.sqrt(
            self.project_features.shape[1])

    def forward(self, fs, ft, logits_s, logits_t, coefficient):
        features = torch.cat([fs, ft]).float()
        predictions = torch.softmax(torch.cat([logits_s, logits_t]).float(), dim=1).detach()
        scores = self.discriminator(reverse_gradient(self._multilinear(features, predictions), coefficient))
        truth = domain_labels(len(fs), len(ft), scores.device)
        # Entropy conditioning: examples the classifier is sure about weigh more (1 + e^-H).
        entropy = -(predictions * torch.log(predictions.clamp_min(1e-8))).sum(1)
        weight = 1.0 + torch.exp(-entropy)
        weight = torch.cat([weight[: len(fs)] / weight[: len(fs)].sum(), weight[len(fs):] / weight[len(fs):].sum()])
        return (F.binary_cross_entropy_with_logits(scores, truth, reduction="none") * weight).sum() / 2


def class_confusion(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """MCC's loss: the off-diagonal mass of the batch's class-correlation matrix, rows normalised, over C.

    Predictions are softened by ``temperature``; each example weighs ``1 + e^-H`` (confident ones more),
    normalised to the batch size, so uncertain examples do not dominate the estimate."""
    batch, classes = logits.shape
    p = torch.softmax(logits.float() / temperature, dim=1)
    entropy = -(p * torch.log(p.clamp_min(1e-8))).sum(1).detach()
    weight = 1.0 + torch.exp(-entropy)
    weight = batch * weight / weight.sum()
    confusion = (p * weight.unsqueeze(1)).T @ p
    confusion = confusion / confusion.sum(dim=1, keepdim=True).clamp_min(1e-8)
    return (confusion.sum() - confusion.trace()) / classes


@register
class MCC(AdaptationMethod):
    name = "mcc"
    summary = "minimum class confusion on target predictions (Jin et al. 2020; no discriminator)"
    temperature: ClassVar[float] = 2.5  # the paper's and TLlib's default

    def forward(self, fs, ft, logits_s, logits_t, coefficient):
        return coefficient * class_confusion(logits_t, self.temperature)


def information_maximisation(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the predictions minus the entropy of their mean (nats; in [-log C, log C]).

    Low when each example is predicted confidently and the batch covers the classes evenly."""
    p = torch.softmax(logits.float(), dim=1)
    conditional = -(p * torch.log(p.clamp_min(1e-8))).sum(1).mean()
    marginal = p.mean(0)
    diversity = -(marginal * torch.log(marginal.clamp_min(1e-8))).sum()
    return conditional - diversity


@register
class InformationMaximisation(AdaptationMethod):
    name = "im"
    summary = "confident, diverse target predictions: information maximisation (SHOT's IM loss, Liang et al. 2020)"

    def forward(self, fs, ft, logits_s, logits_t, coefficient):
        return coefficient * information_maximisation(logits_t)


class TargetStream:
    """Endless shuffled batches of the unlabelled target data, one per source batch (streamed, so a
    target larger than memory allows for a batch costs one batch of memory at a time)."""

    def __init__(self, batches, device: torch.device):
        self.batches = batches
        self.device = device
        self.epoch = 0
        self._iterator = iter(())

    def next(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.batches.iterate(self.epoch))
            self.epoch += 1
            batch = next(self._iterator)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch["inputs"].items()}


class DomainAdaptationObjective:
    """Cross-entropy on the source batch plus the method's transfer term against one target batch."""

    def __init__(self, method: AdaptationMethod, target: TargetStream, total_steps: int, weight: float = 1.0,
                 label_smoothing: float = 0.0, class_weight: torch.Tensor | None = None):
        self.method = method
        self.target = target
        self.total_steps = max(total_steps, 1)
        self.weight = weight
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.step = 0

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        fs = model.backbone(**batch["inputs"])
        logits_s = model.head(fs)
        loss = cross_entropy(logits_s, batch["labels"], self.class_weight, self.label_smoothing)
        if self.method.needs_target and torch.is_grad_enabled():
            coefficient = self.weight * ramp(self.step / self.total_steps)
            ft = model.backbone(**self.target.next())
            logits_t = model.head(ft)
            loss = loss + self.method(fs, ft, logits_s, logits_t, coefficient)
            self.step += 1
        return loss, logits_s
