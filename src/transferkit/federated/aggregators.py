"""Server-side aggregation: names mapped to Flower's strategies (flwr.serverapp.strategy).

Flower implements the arithmetic; transferkit only chooses and configures. FedAvg weighs each
client's parameters by its number of training examples (|D_i| / |D|). Adding one is one entry:
its summary, the Flower class name, and the options it takes from the FederatedConfig.
"""

from __future__ import annotations

from typing import Any, Callable

AGGREGATORS: dict[str, tuple[str, str, Callable[[Any], dict]]] = {
    "fedavg": ("FedAvg: average weighted by training examples (McMahan et al. 2017)", "FedAvg", lambda c: {}),
    "fedprox": ("FedProx: FedAvg, clients add mu/2 ||w - w_global||^2 (Li et al. 2020)", "FedProx",
                lambda c: {"proximal_mu": c.proximal_mu}),
    "fedadam": ("FedAdam: Adam on the server over the averaged update (Reddi et al. 2021)", "FedAdam",
                lambda c: {"eta": 0.01 if c.server_lr is None else c.server_lr}),
    # A client's round is a few local steps, so the average of IID updates moves the global model about as far
    # as one client's steps: a server learning rate above 1 and momentum make up for it (Reddi et al. 2021).
    "fedavgm": ("FedAvgM: FedAvg with server learning rate and momentum (Hsu et al. 2019)", "FedAvgM",
                lambda c: {"server_learning_rate": 1.0 if c.server_lr is None else c.server_lr,
                           "server_momentum": c.server_momentum}),
    "fedmedian": ("coordinate-wise median of the clients' parameters (Yin et al. 2018); robust", "FedMedian",
                  lambda c: {}),
    "fedtrimmedavg": ("coordinate-wise mean without the beta largest and smallest values (Yin et al. 2018); robust",
                      "FedTrimmedAvg", lambda c: {"beta": c.trimmed_beta}),
    "krum": ("Krum: the update closest to its neighbours (Blanchard et al. 2017); robust", "Krum",
             lambda c: {"num_malicious_nodes": c.krum_malicious}),
}


def minimum_clients(config, num_clients: int) -> int:
    """How many connected clients a round needs. Flower samples fraction_train of the clients connected now, at
    least this many, and waits (without a time limit) until this many are connected: a default of every client
    would stall the whole run for good once one client drops out, so the default is Flower's own, 2."""
    return min(config.min_clients or 2, num_clients)


def create_aggregator(config, num_clients: int):
    from flwr.serverapp import strategy

    _, class_name, options = AGGREGATORS[config.aggregator]
    minimum = minimum_clients(config, num_clients)
    return getattr(strategy, class_name)(fraction_train=config.fraction_train, fraction_evaluate=1.0,
                                         min_train_nodes=minimum, min_evaluate_nodes=minimum,
                                         min_available_nodes=minimum, **options(config))


# Running statistics (BatchNorm) travel with the weights but are not parameters: a server optimiser's
# momentum on a variance can overshoot below zero. They get the example-weighted average, as under FedAvg.
STATISTICS = ("running_mean", "running_var")
SERVER_OPTIMISERS = ("fedavgm", "fedadam")


def average_statistics(aggregated, replies: list):
    """``aggregated`` with its running statistics replaced by the replies' example-weighted average."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    names = [name for name in aggregated.keys() if name.endswith(STATISTICS)]
    if not names or not replies:
        return aggregated
    weights = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])
    weights = weights / weights.sum()
    arrays = dict(aggregated.items())
    for name in names:
        arrays[name] = Array(np.asarray(sum(w * r.content["arrays"][name].numpy() for w, r in zip(weights, replies)),
                                        dtype=aggregated[name].numpy().dtype))
    return ArrayRecord(arrays)


# A server optimiser's state between rounds: Flower keeps it on the strategy object (FedAvgM's momentum, a list
# in the arrays' order; FedAdam's first and second moments, dicts by array name). It is saved with each round's
# checkpoint, so a resumed federation continues with the momentum it had instead of starting a fresh one.
SERVER_STATE = ("momentum_vector", "m_t", "v_t")


def server_state(strategy, names: list[str]) -> dict[str, Any]:
    """The strategy's optimiser state as flat ``attribute/array name -> numpy array`` entries (empty for FedAvg
    and the robust aggregators, which keep none)."""
    import numpy as np

    state = {}
    for attribute in SERVER_STATE:
        value = getattr(strategy, attribute, None)
        if value:
            pairs = zip(names, value, strict=True) if isinstance(value, list) else value.items()
            state.update({f"{attribute}/{name}": np.ascontiguousarray(array) for name, array in pairs})
    return state


def restore_server_state(strategy, state: dict[str, Any], names: list[str]) -> None:
    """Put back what ``server_state`` saved, on a strategy built from the same config."""
    for attribute in SERVER_STATE:
        entries = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith(attribute + "/")}
        if not entries:
            continue
        if not hasattr(strategy, attribute):
            raise ValueError(f"the saved server state has {attribute}, which {type(strategy).__name__} does not keep")
        setattr(strategy, attribute, [entries[name] for name in names] if attribute == "momentum_vector" else entries)
