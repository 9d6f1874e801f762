"""H-score with a shrinkage covariance: between-class variance of the features in the metric of their
(well-conditioned) total covariance."""

from __future__ import annotations

import numpy as np
import scipy.linalg

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
    estimator = LedoitWolf(assume_centered=True, store_precision=False).fit(f)
    classes, counts = np.unique(labels, return_counts=True)
    means = np.stack([f[labels == c].mean(0) for c in classes])  # C x d
    # The between-class covariance is sum_c (n_c / n) m_c m_c^T (the features are centred), so the trace takes
    # C solves against the covariance instead of its d x d inverse (2.2 s -> 0.2 s at d = 1280, n = 1000).
    weights = counts / len(f)
    try:
        factor = scipy.linalg.cho_factor(estimator.covariance_, lower=True, check_finite=False)
        solved = scipy.linalg.cho_solve(factor, means.T, check_finite=False)  # d x C
    except np.linalg.LinAlgError:  # no shrinkage and singular features: fall back to the pseudo-inverse
        solved = np.linalg.pinv(estimator.covariance_, hermitian=True) @ means.T
    return float((1 - estimator.shrinkage_) * np.sum(weights * np.einsum("dc,cd->c", solved, means)))
