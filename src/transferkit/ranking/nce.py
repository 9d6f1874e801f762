"""NCE: negative conditional entropy of the target labels given the source model's hard labels."""

from __future__ import annotations

import numpy as np

from .registry import register, require_source


@register("nce")
def nce(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
    """NCE, Tran et al., "Transferability and Hardness of Supervised Classification Tasks", ICCV 2019:
    -H(Y | Z) with Z the source classifier's argmax. Needs the backbone's source classifier."""
    source = np.asarray(require_source(source_probs)).argmax(1)
    labels = np.asarray(labels)
    n = len(labels)
    _, z = np.unique(source, return_inverse=True)
    _, y = np.unique(labels, return_inverse=True)
    joint = np.zeros((z.max() + 1, y.max() + 1))
    np.add.at(joint, (z, y), 1.0 / n)
    p_z = joint.sum(1, keepdims=True)
    mask = joint > 0
    return float((joint[mask] * np.log((joint / p_z)[mask])).sum())
