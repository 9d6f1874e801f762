"""Server-side aggregation: names mapped to Flower's strategies (flwr.serverapp.strategy).

Flower implements the arithmetic; transferkit only chooses and configures. FedAvg weighs each
client's parameters by its number of training examples (|D_i| / |D|).
"""

from __future__ import annotations

from typing import Any, Callable

AGGREGATORS: dict[str, tuple[str, Callable[[Any, dict], Any]]] = {}


def register(name: str, summary: str):
    def add(factory):
        AGGREGATORS[name] = (summary, factory)
        return factory

    return add


@register("fedavg", "FedAvg: average weighted by training examples (McMahan et al. 2017)")
def _fedavg(config, common: dict):
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**common)


@register("fedprox", "FedProx: FedAvg, clients add mu/2 ||w - w_global||^2 (Li et al. 2020)")
def _fedprox(config, common: dict):
    from flwr.serverapp.strategy import FedProx

    return FedProx(**common, proximal_mu=config.proximal_mu)


@register("fedadam", "FedAdam: Adam on the server over the averaged update (Reddi et al. 2021)")
def _fedadam(config, common: dict):
    from flwr.serverapp.strategy import FedAdam

    return FedAdam(**common, eta=config.server_lr)


@register("fedmedian", "coordinate-wise median of the clients' parameters (Yin et al. 2018); robust")
def _fedmedian(config, common: dict):
    from flwr.serverapp.strategy import FedMedian

    return FedMedian(**common)


@register("fedtrimmedavg", "coordinate-wise mean without the beta largest and smallest values (Yin et al. 2018); robust")
def _fedtrimmedavg(config, common: dict):
    from flwr.serverapp.strategy import FedTrimmedAvg

    return FedTrimmedAvg(**common, beta=config.trimmed_beta)


@register("krum", "Krum: the update closest to its neighbours (Blanchard et al. 2017); robust")
def _krum(config, common: dict):
    from flwr.serverapp.strategy import Krum

    return Krum(**common, num_malicious_nodes=config.krum_malicious)


def create_aggregator(config, num_clients: int):
    minimum = config.min_clients or max(2, int(round(config.fraction_train * num_clients)))
    common = dict(fraction_train=config.fraction_train, fraction_evaluate=1.0, min_train_nodes=minimum,
                  min_evaluate_nodes=minimum, min_available_nodes=minimum)
    return AGGREGATORS[config.aggregator][1](config, common)
