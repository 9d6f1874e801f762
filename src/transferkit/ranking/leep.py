"""LEEP and N-LEEP: how well the source (or a Gaussian mixture's) soft labels predict the target labels."""

from __future__ import annotations

import numpy as np

from .registry import register, require_source


def leep_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """The mean log-likelihood of the target labels under the "expected empirical predictor":
    P(y | x) = sum_z P(y | z) theta_z(x), with P(y | z) estimated from the same examples."""
    n, _ = probs.shape
    classes = np.unique(labels)
    onehot = (labels[:, None] == classes[None, :]).astype(np.float64)  # n x C
    joint = probs.T @ onehot / n  # Z x C: P(z, y)
    conditional = joint / np.maximum(joint.sum(1, keepdims=True), 1e-300)  # P(y | z)
    predicted = probs @ conditional  # n x C
    index = np.searchsorted(classes, labels)
    return float(np.mean(np.log(np.maximum(predicted[np.arange(n), index], 1e-300))))


@register("leep")
def leep(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
    """LEEP, Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned Representations",
    ICML 2020. Needs the backbone's source classifier."""
    return leep_score(np.asarray(require_source(source_probs), dtype=np.float64), np.asarray(labels))


@register("nleep")
def nleep(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
    """N-LEEP, Li et al., "Ranking Neural Checkpoints", CVPR 2021: LEEP with the source classifier replaced
    by a Gaussian mixture fitted on the PCA-reduced features (80% of the variance kept, 5 components per
    target class), so it scores any backbone."""
    from sklearn.mixture import GaussianMixture

    f = np.asarray(features, dtype=np.float64)
    reduced = principal_components(f, 0.8) if f.shape[1] > 1 else f
    components = min(5 * len(np.unique(labels)), len(f))
    mixture = GaussianMixture(components, covariance_type="diag", reg_covar=1e-4, random_state=0, max_iter=200)
    probs = mixture.fit(reduced).predict_proba(reduced)
    return leep_score(probs, np.asarray(labels))


def principal_components(features: np.ndarray, variance: float) -> np.ndarray:
    """The features' scores on the fewest principal axes that keep ``variance`` of their variance (sklearn's
    PCA(n_components=variance)). Fewer examples than features (1,000 examples of a 1,280-wide backbone) take the
    eigenvectors of the n x n Gram matrix of the centred features, where the scores are U * sqrt(lambda): a
    third of the time of the full SVD sklearn runs."""
    from sklearn.decomposition import PCA

    n, d = features.shape
    if n >= d:
        return PCA(n_components=variance, svd_solver="full", random_state=0).fit_transform(features)
    centred = features - features.mean(0, keepdims=True)
    eigenvalues, vectors = np.linalg.eigh(centred @ centred.T)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = np.clip(eigenvalues[order], 0.0, None), vectors[:, order]
    ratio = np.cumsum(eigenvalues) / max(eigenvalues.sum(), 1e-300)
    kept = int(np.searchsorted(ratio, variance, side="right")) + 1  # sklearn's rule for a fractional n_components
    kept = min(kept, n)
    scores = vectors[:, :kept] * np.sqrt(eigenvalues[:kept])
    # sklearn's sign convention (svd_flip on the components): each principal axis's largest |entry| positive.
    axes = centred.T @ vectors[:, :kept]  # d x kept, the axes up to positive scales
    signs = np.sign(axes[np.abs(axes).argmax(0), np.arange(kept)])
    return scores * np.where(signs == 0, 1.0, signs)
