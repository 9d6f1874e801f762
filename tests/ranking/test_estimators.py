"""Each transferability estimator against a hand-checked case or a plain reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from transferkit.ranking import ESTIMATORS, NotApplicable


def _evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of Bayesian linear regression, written out with matrices (Bishop 3.86)."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    return (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - beta / 2 * np.sum((y - f @ m) ** 2) - alpha / 2 * m @ m
            - 0.5 * np.linalg.slogdet(a)[1] - n / 2 * np.log(2 * np.pi))


def test_logme_is_the_maximised_evidence_per_example():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    f = rng.normal(size=(60, 5)) + labels[:, None] * np.array([1.0, 0.5, 0, 0, 0])
    expected = []
    for c in range(3):
        y = (labels == c).astype(float)
        best = minimize(lambda p: -_evidence(f, y, np.exp(p[0]), np.exp(p[1])), x0=[0.0, 0.0], method="Nelder-Mead",
                        options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 5000})
        expected.append(-best.fun / 60)
    assert ESTIMATORS["logme"](f, labels, None) == pytest.approx(np.mean(expected), abs=1e-5)


def test_logme_prefers_features_that_carry_the_labels():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    noise = rng.normal(size=(200, 16))
    informative = noise.copy()
    informative[:, 0] += 3 * labels
    assert ESTIMATORS["logme"](informative, labels, None) > ESTIMATORS["logme"](noise, labels, None)


def _leep_reference(probs: np.ndarray, labels: np.ndarray) -> float:
    n, z = probs.shape
    classes = sorted(set(labels.tolist()))
    joint = {(k, y): sum(probs[i, k] for i in range(n) if labels[i] == y) / n for k in range(z) for y in classes}
    marginal = {k: sum(joint[(k, y)] for y in classes) for k in range(z)}
    total = 0.0
    for i in range(n):
        total += np.log(sum(joint[(k, labels[i])] / marginal[k] * probs[i, k] for k in range(z)))
    return total / n


def test_leep_matches_a_loop_reference():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(40, 6))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 3, 40)
    assert ESTIMATORS["leep"](None, labels, probs) == pytest.approx(_leep_reference(probs, labels), abs=1e-10)


def test_nce_hand_checked_cases():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    same = np.eye(2)[labels]  # the source classifier predicts exactly the target labels
    assert ESTIMATORS["nce"](None, labels, same) == pytest.approx(0.0, abs=1e-12)
    independent = np.eye(2)[np.array([0, 0, 1, 1, 0, 0, 1, 1])]  # each source class holds both labels equally
    assert ESTIMATORS["nce"](None, labels, independent) == pytest.approx(-np.log(2), abs=1e-12)


def test_source_based_estimators_say_when_there_is_no_source_head():
    for name in ("leep", "nce"):
        with pytest.raises(NotApplicable, match="source head"):
            ESTIMATORS[name](np.zeros((4, 2)), np.array([0, 1, 0, 1]), None)


def test_hscore_matches_a_reference_and_ranks_informative_features_higher():
    from sklearn.covariance import ledoit_wolf

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 90)
    f = rng.normal(size=(90, 8))
    f[:, :2] += np.eye(3)[labels][:, :2] * 2
    centred = f - f.mean(0)
    covariance, shrinkage = ledoit_wolf(centred, assume_centered=True)
    means = np.stack([centred[labels == label].mean(0) for label in labels])
    between = means.T @ means / len(f)
    reference = np.trace(np.linalg.inv(covariance) @ ((1 - shrinkage) * between))
    assert ESTIMATORS["hscore"](f, labels, None) == pytest.approx(reference, rel=1e-8)
    assert ESTIMATORS["hscore"](f, labels, None) > ESTIMATORS["hscore"](rng.normal(size=(90, 8)), labels, None)


def test_hscore_from_the_examples_gram_equals_the_covariance_path():
    from sklearn.covariance import ledoit_wolf

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 60)
    f = rng.normal(size=(60, 150))
    f[:, :4] += np.eye(4)[labels] * 1.5
    centred = f - f.mean(0)
    covariance, shrinkage = ledoit_wolf(centred, assume_centered=True)
    means = np.stack([centred[labels == label].mean(0) for label in labels])
    reference = np.trace(np.linalg.solve(covariance, (1 - shrinkage) * means.T @ means / len(f)))
    assert 0 < shrinkage < 1
    assert ESTIMATORS["hscore"](f, labels, None) == pytest.approx(reference, rel=1e-8)  # 60 examples < 150 features


def test_nleep_scores_clustered_features_above_noise_and_is_deterministic():
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2], 40)
    clustered = rng.normal(size=(120, 6)) * 0.3 + np.eye(3, 6)[labels] * 4
    noise = rng.normal(size=(120, 6))
    score = ESTIMATORS["nleep"](clustered, labels, None)
    assert score == ESTIMATORS["nleep"](clustered, labels, None)
    assert score > ESTIMATORS["nleep"](noise, labels, None)
    assert score <= 0.0  # a mean log-probability


def test_knn_accuracy_matches_a_loop_reference_and_ranks_clustered_features_higher():
    from transferkit.ranking.knn import knn_leave_one_out_accuracy

    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1, 2], 30)
    clustered = rng.normal(size=(90, 5)) * 0.5 + np.eye(3, 5)[labels] * 2
    noise = rng.normal(size=(90, 5))

    def reference(f, y, k=5, t=0.07):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        right = 0
        for i in range(len(f)):
            others = [j for j in range(len(f)) if j != i]
            nearest = sorted(others, key=lambda j: -f[i] @ f[j])[:k]
            votes = {}
            for j in nearest:
                votes[y[j]] = votes.get(y[j], 0.0) + np.exp(f[i] @ f[j] / t)
            right += max(votes, key=votes.get) == y[i]
        return right / len(f)

    for f in (clustered, noise):
        assert knn_leave_one_out_accuracy(f, labels, k=5) == pytest.approx(reference(f, labels))
    assert ESTIMATORS["knn"](clustered, labels, None) > 0.9 > 0.6 > ESTIMATORS["knn"](noise, labels, None)
    # Two points per class, each the other's nearest: leave-one-out gets every one right with k = 1.
    pairs = np.array([[1, 0.01], [1, -0.01], [0.01, 1], [-0.01, 1]])
    assert knn_leave_one_out_accuracy(pairs, np.array([0, 0, 1, 1]), k=1) == 1.0


def test_logme_from_the_examples_gram_equals_the_features_gram():
    """With fewer examples than features LogME decomposes F F^T instead of F^T F; both give one evidence."""
    from transferkit.ranking.logme import _class_evidence, _spectrum

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, 40)
    f = rng.normal(size=(40, 64)) + labels[:, None] * 0.3
    for c in range(3):
        y = (labels == c).astype(float)
        evidences = []
        for side in ("examples", "features"):
            sigma, squared_projections = _spectrum(f, side)
            projected = squared_projections(y)
            evidences.append(_class_evidence(sigma, projected, max(float(y @ y - projected.sum()), 0.0), 40, 64)[0])
        assert evidences[0] == pytest.approx(evidences[1], rel=1e-7)


def test_nleep_principal_components_equal_sklearns_pca_when_examples_are_fewer_than_features():
    from sklearn.decomposition import PCA

    from transferkit.ranking.leep import principal_components

    rng = np.random.default_rng(8)
    f = rng.normal(size=(30, 90)) @ rng.normal(size=(90, 90))
    for variance in (0.5, 0.8):
        expected = PCA(n_components=variance, svd_solver="full").fit_transform(f)
        assert principal_components(f, variance) == pytest.approx(expected, abs=1e-8)
