"""Transferability estimators by name: each is ``score(features, labels, source_probs) -> float``.

``features``: (n, d) frozen backbone features of the target examples; ``labels``: (n,) class ids;
``source_probs``: (n, z) the backbone's own pre-training classifier's probabilities, or None when the
backbone has no such head. Higher scores predict better fine-tuned accuracy. An estimator that needs
what a candidate lacks raises ``NotApplicable`` with the reason, shown in the table.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Estimator = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], float]
ESTIMATORS: dict[str, Estimator] = {}


class NotApplicable(Exception):
    """This estimator cannot score this candidate (the message says why)."""


def register(name: str) -> Callable[[Estimator], Estimator]:
    def add(function: Estimator) -> Estimator:
        ESTIMATORS[name] = function
        return function

    return add


def require_source(source_probs: np.ndarray | None) -> np.ndarray:
    if source_probs is None:
        raise NotApplicable("needs the pre-training classifier's predictions; this backbone has no source head")
    return source_probs
