"""Split one labelled dataset across simulated clients: small functions behind a registry.

Each returns, for ``num_clients`` clients, the indices of the examples each client holds; all are
seeded, so every process (the server and each client's) computes the same split.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import UserError

PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {}


def register(name: str):
    def add(function):
        PARTITIONERS[name] = function
        return function

    return add


@register("iid")
def iid(labels: np.ndarray, num_clients: int, seed: int, **_) -> list[np.ndarray]:
    """A uniformly random, equal-sized share per client."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


@register("dirichlet")
def dirichlet(labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5, **_) -> list[np.ndarray]:
    """Label skew: each class is divided among the clients in Dirichlet(alpha) proportions (Hsu et al.
    2019; the niid-bench protocol). Small alpha: each client sees few classes; large alpha: near IID."""
    if not alpha > 0:
        raise UserError(f"the Dirichlet partitioner's alpha is {alpha}: it must be positive (0.5 is usual)")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=int)) for p in parts]


@register("pathological")
def pathological(labels: np.ndarray, num_clients: int, seed: int, classes_per_client: int = 2, **_) -> list[np.ndarray]:
    """Each client holds only ``classes_per_client`` classes (McMahan et al. 2017's pathological non-IID):
    the classes are dealt round-robin to the clients, and each class's examples split among its holders."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    if classes_per_client < 1:
        raise UserError(f"classes_per_client is {classes_per_client}: it must be >= 1")
    holders: dict[int, list[int]] = {}
    slot = 0
    for client in range(num_clients):
        for _ in range(classes_per_client):
            holders.setdefault(int(classes[slot % len(classes)]), []).append(client)
            slot += 1
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label, clients in holders.items():
        members = rng.permutation(np.flatnonzero(labels == label))
        for client, chunk in zip(clients, np.array_split(members, len(clients))):
            parts[client].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=int)) for p in parts]


def partition(name: str, labels: np.ndarray, num_clients: int, seed: int, **options) -> list[np.ndarray]:
    if name not in PARTITIONERS:
        raise UserError(f"unknown partitioner '{name}': choose one of {', '.join(PARTITIONERS)}")
    if num_clients < 2:
        raise UserError(f"num_clients is {num_clients}: a federation needs at least 2 clients")
    parts = PARTITIONERS[name](labels, num_clients, seed, **options)
    too_small = [i for i, p in enumerate(parts) if len(p) < 4]
    if too_small:
        raise UserError(f"the '{name}' partitioner leaves client(s) {too_small[:10]} with fewer than 4 examples "
                        f"({len(labels)} examples over {num_clients} clients): use fewer clients, more data, or a "
                        f"larger alpha")
    return parts
