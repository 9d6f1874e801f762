"""H-score with a shrinkage covariance: between-class variance of the features in the metric of their
(well-conditioned) total covariance."""

from __future__ import annotations

import numpy as np

from .registry import register


@register("hscore")
def regularised_hscore(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
    """Regularised H-score, Ibrahim et al., "Newer is not always better: Rethinking transferability metrics,
    their peculiarities, stability and performance", ECML-PKDD 2022, after Bao et al., "An
    Information-Theoretic Approach to Transferability in Task Transfer Learning", ICIP 2019:
    tr(Cov_shrunk(f)^-1 (1 - s) Cov(E[f | y])), with the Ledoit-Wolf shrinkage s, so that the inverse
    is stable when features outnumber examples."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(0, keepdims=True)
    estimator = LedoitWolf(assume_centered=True).fit(f)
    class_means = np.zeros_like(f)
    for c in np.unique(labels):
        rows = labels == c
        class_means[rows] = f[rows].mean(0)
    between = np.cov(class_means, rowvar=False, bias=True)
    return float(np.trace(np.linalg.pinv(estimator.covariance_, hermitian=True) @ ((1 - estimator.shrinkage_) * between)))
