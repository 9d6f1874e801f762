"""LogME: the maximised log marginal evidence of a Bayesian linear model from features to labels."""

from __future__ import annotations

import numpy as np

from .registry import register


def _class_evidence(sigma: np.ndarray, projected: np.ndarray, residual: float, n: int, d: int,
                    iterations: int = 100) -> tuple[float, float, float]:
    """(evidence per example, alpha, beta) for one one-vs-rest target, by MacKay's fixed-point updates.

    ``sigma``: the d eigenvalues of F^T F (zeros beyond rank); ``projected``: squared projections of the
    target on the eigenvectors; ``residual``: the part of |y|^2 outside their span.
    """
    alpha, beta = 1.0, 1.0
    for _ in range(iterations):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * projected / (sigma + t) ** 2).sum())  # |m|^2, the posterior mean's norm
        res2 = float((projected * (t / (sigma + t)) ** 2).sum()) + residual  # |y - F m|^2
        alpha, beta = gamma / (m2 + 1e-12), (n - gamma) / (res2 + 1e-12)
        if abs(alpha / beta - t) / t < 1e-6:
            break
    t = alpha / beta
    m2 = float((sigma * projected / (sigma + t) ** 2).sum())
    res2 = float((projected * (t / (sigma + t)) ** 2).sum()) + residual
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * sigma).sum()
                - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
    return float(evidence / n), alpha, beta


@register("logme")
def logme(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
    """LogME, You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
    ICML 2021. The mean over classes of the per-example log evidence of y_c = F w + noise, with the
    prior precision alpha and noise precision beta set to maximise it."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    sigma, squared_projections = _spectrum(f)
    scores = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        projected = squared_projections(y)
        residual = max(float(y @ y - projected.sum()), 0.0)
        scores.append(_class_evidence(sigma, projected, residual, n, d)[0])
    return float(np.mean(scores))


def _spectrum(f: np.ndarray, gram: str | None = None):
    """(the d eigenvalues of F^T F, y -> squared projections of y on F's left singular vectors).

    Both come from the smaller of the two Gram matrices: with fewer examples than features (1,000 examples of
    a 1,280-wide backbone) F F^T is n x n, half the cost of F^T F; its eigenvectors are the left singular
    vectors themselves and the missing d - n eigenvalues are zeros. ``gram`` forces a side where both apply (for tests)."""
    n, d = f.shape
    if (gram or ("examples" if n < d else "features")) == "examples" and n <= d:
        eigenvalues, left = np.linalg.eigh(f @ f.T)
        sigma = np.concatenate([np.clip(eigenvalues, 0.0, None), np.zeros(d - n)])
        kept = sigma[:n] > 1e-10 * sigma.max()

        def squared_projections(y: np.ndarray) -> np.ndarray:
            return np.concatenate([np.where(kept, (left.T @ y) ** 2, 0.0), np.zeros(d - n)])
        return sigma, squared_projections
    eigenvalues, vectors = np.linalg.eigh(f.T @ f)
    sigma = np.clip(eigenvalues, 0.0, None)
    kept = sigma > 1e-10 * sigma.max()

    def squared_projections(y: np.ndarray) -> np.ndarray:
        fy = vectors.T @ (f.T @ y)  # (v^T F^T y)^2 / sigma = (u^T y)^2
        return np.where(kept, fy**2 / np.maximum(sigma, 1e-300), 0.0)
    return sigma, squared_projections
