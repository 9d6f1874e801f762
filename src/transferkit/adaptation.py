"""Domain adaptation around a fine-tuning run: the unlabelled target data, and how far apart the domains are.

The model is selected on the source validation split (labelled source data held out from training);
target labels, when a target test file has them, are used only to report. The proxy A-distance
(Ben-David et al. 2007; Ganin et al. 2016) measures how well a linear classifier tells source from
target features: d_A = 2 (1 - 2 err), 0 when the domains are indistinguishable, 2 when they separate
perfectly.

Choosing among adaptation runs (methods, weights) without target labels: Deep Embedded Validation
(``deep_embedded_validation``) estimates each run's target risk from its labelled source validation split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.dataset import Examples
from .data.readers import read_examples
from .engine.batches import Batches, map_in_order
from .errors import UserError

SAMPLE = 1000  # examples per domain for the A-distance and the embedding plot


def load_target(path: str, *, classes: list[str], modality: str, text_column: str | None, image_column: str | None,
                label_column: str, role: str) -> Examples:
    """The target data (``role`` 'target' may be unlabelled; 'target test' must be labelled)."""
    examples = read_examples(path, text_column=text_column, image_column=image_column, label_column=label_column,
                             require_labels=role == "target test")
    if len(examples.inputs) == 0:
        raise UserError(f"{path}: the {role} data is empty: adaptation needs target examples")
    if examples.modality != modality:
        raise UserError(f"{path} holds {examples.modality}s but the source holds {modality}s: use the same kind of data")
    if examples.labels is not None:
        only_target = sorted(set(examples.labels) - set(classes))
        if only_target:
            raise UserError(f"{path}: the {role} has labels the source never has: {only_target[:10]} (source labels: "
                            f"{classes[:10]}); unsupervised adaptation needs the source's label set")
    return examples


def sample_indices(n: int, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n)[:SAMPLE])


@torch.no_grad()
def backbone_features(model, prepared, indices: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    backbone = model.backbone
    subset = [prepared[i] for i in indices] if isinstance(prepared, list) else prepared.subset(indices)
    lengths = backbone.lengths(subset)
    batches = Batches(subset, None, backbone.collate, batch_size, lengths=lengths)
    model.eval()
    return map_in_order(batches, lambda inputs: backbone(**inputs), device).numpy()


def proxy_a_distance(source: np.ndarray, target: np.ndarray, seed: int = 0) -> float:
    """2 (1 - 2 err) of a logistic-regression domain classifier, err from 2-fold cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = min(len(source), len(target))
    features = np.concatenate([source[:n], target[:n]])
    domains = np.concatenate([np.ones(n), np.zeros(n)])
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    accuracy = cross_val_score(classifier, features, domains, cv=2).mean()
    return float(2 * (1 - 2 * (1 - accuracy)))


def plot_domains(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray], path: Path,
                 title: str) -> Path:
    """t-SNE of source vs target features, before and after adaptation, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for axis, (source, target), name in zip(axes, (before, after), ("pretrained features", "after fine-tuning")):
        joint = np.concatenate([source, target])
        points = TSNE(n_components=2, init="pca", perplexity=min(30, max(5, len(joint) // 4)), random_state=0).fit_transform(joint)
        axis.scatter(*points[: len(source)].T, s=4, alpha=0.6, label="source", color="tab:blue")
        axis.scatter(*points[len(source):].T, s=4, alpha=0.6, label="target", color="tab:orange")
        axis.set_title(name)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0].legend(loc="best", markerscale=3)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def deep_embedded_validation(train_features: np.ndarray, target_features: np.ndarray, val_features: np.ndarray,
                             val_losses: np.ndarray) -> dict[str, float]:
    """Deep Embedded Validation (You et al. 2019, "Towards Accurate Model Selection in Deep Unsupervised Domain
    Adaptation", ICML): the target risk of a model, estimated on the labelled source validation split.

    A domain classifier on the model's features (source training vs target) gives each validation example's
    density ratio w = p_target(x) / p_source(x); the mean of w * loss is an unbiased estimate of the target
    loss, and the control variate eta (E[w] = 1) lowers its variance. Lower is better. Only runs on the same
    source and target data compare: it ranks methods or weights for one pair, it does not predict accuracy.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.concatenate([train_features, target_features])
    domains = np.concatenate([np.zeros(len(train_features)), np.ones(len(target_features))])
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(features, domains)
    p_target = np.clip(classifier.predict_proba(val_features)[:, 1], 1e-6, 1 - 1e-6)
    weights = len(train_features) / len(target_features) * p_target / (1 - p_target)
    weighted = weights * np.asarray(val_losses, dtype=np.float64)
    covariance = np.cov(np.stack([weighted, weights]))
    eta = -covariance[0, 1] / covariance[1, 1] if covariance[1, 1] > 0 else 0.0
    return {"risk": float(weighted.mean() + eta * weights.mean() - eta), "source_val_loss": float(np.mean(val_losses)),
            "mean_weight": float(weights.mean()),
            # Kish's effective sample size: how many validation examples the weighted estimate rests on.
            "effective_examples": float(weights.sum() ** 2 / (weights ** 2).sum())}


def dev_warning(dev_risks: list[float]) -> str | None:
    """Why DEV's choice of epoch should not be trusted on this pair, or None. DEV estimates a cross-entropy
    risk, which is never negative; a negative estimate means the domain classifier tells the domains almost
    perfectly apart, so a few validation examples carry enormous density ratios and the control variate
    overshoots (on Fashion-MNIST -> Fashion-M estimates reached -243 while target accuracy barely moved,
    docs/benchmarks.md). The estimate then ranks epochs by noise."""
    negative = [(epoch, risk) for epoch, risk in enumerate(dev_risks, start=1) if risk < 0]
    if not negative:
        return None
    epoch, risk = min(negative, key=lambda pair: pair[1])
    return (f"DEV's estimate of the target risk went negative ({risk:.3g} at epoch {epoch}, {len(negative)} of "
            f"{len(dev_risks)} epochs): the domains are almost separable in the model's features, so it cannot "
            f"rank epochs here; --adapt-selection source-val keeps the best source validation accuracy instead")

