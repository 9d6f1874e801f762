"""A federated run's configuration: the shared fine-tuning recipe (RunConfig fields but the data), the
clients' data, the aggregation and the stopping rule.

YAML, one dataset split across simulated clients::

    model: minilm-l6
    strategy: lora
    data: {train: sst2.tsv, text_column: sentence}
    partitioner: dirichlet     # iid | dirichlet (alpha) | pathological (classes_per_client)
    alpha: 0.5
    num_clients: 5

or one dataset per client (each client a different domain)::

    clients:
      - {name: amazon, train: amazon.tsv, text_column: sentence}
      - {name: imdb, train: imdb.tsv, text_column: sentence}

and for both: ``aggregator`` (fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg, krum), ``max_rounds``,
``local_epochs``, ``patience``/``min_delta`` over rounds, ``personal`` (none, head: FedPer, batchnorm: FedBN),
``personalise_epochs`` and ``personalise_lr_factors`` (the report's personalisation, each factor tried and the
best on each client's validation kept), ``client_optimizer_state`` (reset: a fresh AdamW each round; keep: each client keeps its
AdamW moments between rounds), ``round_schedule`` (how the clients' LR decays across rounds: linear, cosine,
exponential or constant).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, read_yaml
from ..engine.schedules import schedule_factor
from ..errors import UserError
from .aggregators import AGGREGATORS
from .partition import PARTITIONERS
from .optimizer_state import CHOICES as OPTIMIZER_STATE_CHOICES
from .personal import PERSONAL_PARTS

ROUND_SCHEDULES = ("linear", "cosine", "exponential", "constant")
DATA_FIELDS = ("train", "test", "text_column", "image_column", "label_column", "max_train_examples")
UNSUPPORTED = {"teacher": "distil the federated model afterwards", "target": "adapt separately",
               "distill_data": "distil the federated model afterwards", "val": "each client holds out val_fraction",
               "mixup": "drop mixup", "baseline": "the federated report compares local-only, global and personalised",
               "l1": "drop l1", "l2_sp": "use aggregator: fedprox (its proximal_mu pulls each client towards the "
                                         "global model)"}


@dataclass
class FederatedConfig:
    recipe: dict[str, Any]
    data: dict[str, Any] | None = None  # one dataset, split by the partitioner
    clients: list[dict[str, Any]] | None = None  # or one dataset per client
    partitioner: str = "iid"
    num_clients: int = 3
    alpha: float = 0.5
    classes_per_client: int = 2
    aggregator: str = "fedavg"
    proximal_mu: float = 0.01
    trimmed_beta: float = 0.2
    krum_malicious: int = 1
    server_lr: float | None = None  # fedadam: 0.01, fedavgm: 1.0
    server_momentum: float = 0.9  # fedavgm
    max_rounds: int = 10
    local_epochs: float = 1  # whole epochs per round, or 1/k: each round trains on the next k-th of a client's data
    min_delta: float = 0.001
    round_patience: int | None = 3
    fraction_train: float = 1.0
    min_clients: int | None = None
    personal: str = "none"  # what each client keeps to itself between rounds (federated/personal.py)
    personalise_epochs: int = 1
    # Multiples of the recipe's LR the report's personalisation tries, each from the global model; each client keeps
    # the one its own validation split scores best (or the global model, if every one drops its validation accuracy).
    personalise_lr_factors: list[float] = field(default_factory=lambda: [1.0])
    client_optimizer_state: str = "reset"  # reset each round, or keep the moments on the client (optimizer_state.py)
    round_schedule: str = "constant"  # how the clients' LR decays across rounds (``round_lr_factor``)
    local_only: bool = True
    client_cpus: float = 1.0
    poisoned_clients: list[int] = field(default_factory=list)  # attack simulation (benchmarks, tests)
    poison_scale: float = -10.0
    round_timeout_s: float = 3600.0  # how long a round waits for replies before it goes on without the silent clients
    dp_clipping_norm: float | None = None  # client-side (local) differential privacy, Flower's LocalDpMod
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_sensitivity: float | None = None  # default: the clipping norm (a clipped update moves at most that far)
    source: str = "config"
    run_config: RunConfig | None = field(default=None, repr=False)

    OPTIONS = ("partitioner", "num_clients", "alpha", "classes_per_client", "aggregator", "proximal_mu", "trimmed_beta",
               "krum_malicious", "server_lr", "server_momentum", "max_rounds", "local_epochs", "min_delta", "round_patience",
               "fraction_train", "min_clients", "personal", "personalise_epochs", "personalise_lr_factors", "client_optimizer_state", "round_schedule", "local_only", "client_cpus", "poisoned_clients",
               "poison_scale", "round_timeout_s", "dp_clipping_norm", "dp_epsilon", "dp_delta", "dp_sensitivity")

    def __post_init__(self) -> None:
        # Each round's local training is a short run of its own: a warm-up and decay inside it would
        # restart every round, so clients train at a constant learning rate unless told otherwise.
        self.recipe.setdefault("schedule", "constant")
        self.recipe.setdefault("warmup_ratio", 0.0)
        self.validate()

    @property
    def round_parts(self) -> int:
        """Into how many shares a client's training data is cut, one share per round (1: all of it every round)."""
        return 1 if self.local_epochs >= 1 else round(1 / self.local_epochs)

    @property
    def epochs_per_round(self) -> int:
        """Epochs each round runs over its share."""
        return max(1, int(self.local_epochs))

    def local_only_epochs(self, rounds_done: int) -> int:
        """Epochs of the local-only baseline a client trains in its final report: as many passes over its data
        as the federation made (0 without ``local_only``)."""
        return math.ceil(self.local_epochs * rounds_done) if self.local_only else 0

    def round_lr_factor(self, round_number: int) -> float:
        """The multiple of the recipe's LR that the clients train at in round ``round_number`` (1-based): the
        whole federation follows one decay over ``max_rounds``, as a centralised run's LR decays over its epochs,
        and each round takes the value at its middle. Inside a round the recipe's own ``schedule`` applies
        (constant by default): a decay inside every round would restart with each round."""
        rounds = max(1, int(self.max_rounds))
        step = 2 * min(max(int(round_number), 1), rounds) - 1  # the middle of round r, in half-rounds
        return schedule_factor(self.round_schedule, step, 2 * rounds, 0)

    def report_timeout_s(self, rounds_done: int) -> float:
        """How long the server waits for the clients' final reports. A report trains ``personalise_epochs`` and
        the local-only baseline's epochs besides evaluating, several rounds' work, so it gets the round timeout
        once for the evaluation plus once per round's worth of that training."""
        training = self.personalise_epochs * len(self.personalise_lr_factors) + self.local_only_epochs(rounds_done)
        return self.round_timeout_s * (1 + training / self.local_epochs)

    def validate(self) -> None:
        source = self.source
        if (self.data is None) == (self.clients is None):
            raise UserError(f"{source}: give either 'data' (one dataset the partitioner splits) or 'clients' (one dataset "
                            f"per client), not both or neither")
        for key, fix in UNSUPPORTED.items():
            if self.recipe.get(key) not in (None, False):
                raise UserError(f"{source}: '{key}' is not supported in a federated run: {fix}")
        if self.recipe.get("head_init", "random") != "random":
            raise UserError(f"{source}: 'head_init' is '{self.recipe['head_init']}': a federated run's head starts "
                            f"from the server's seeded weights; drop head_init")
        if self.aggregator not in AGGREGATORS:
            raise UserError(f"{source}: 'aggregator' is '{self.aggregator}': choose one of {', '.join(AGGREGATORS)}")
        if self.server_lr is not None and not self.server_lr > 0:
            raise UserError(f"{source}: 'server_lr' is {self.server_lr}: it must be > 0")
        if not 0 <= self.server_momentum < 1:
            raise UserError(f"{source}: 'server_momentum' is {self.server_momentum}: it must be in [0, 1)")
        if self.partitioner not in PARTITIONERS:
            raise UserError(f"{source}: 'partitioner' is '{self.partitioner}': choose one of {', '.join(PARTITIONERS)}")
        for name in ("max_rounds", "num_clients"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{source}: '{name}' is {getattr(self, name)}: it must be a positive integer")
        epochs = self.local_epochs
        if not epochs > 0 or (epochs >= 1 and epochs != int(epochs)) or (epochs < 1 and abs(1 / epochs - round(1 / epochs)) > 1e-6):
            raise UserError(f"{source}: 'local_epochs' is {epochs}: give a whole number of epochs per round, or 1/k "
                            f"(0.5, 0.25, ...) to train each round on the next k-th of a client's data")
        if self.personal not in PERSONAL_PARTS:
            raise UserError(f"{source}: 'personal' is '{self.personal}': choose one of {', '.join(PERSONAL_PARTS)}")
        if self.client_optimizer_state not in OPTIMIZER_STATE_CHOICES:
            raise UserError(f"{source}: 'client_optimizer_state' is '{self.client_optimizer_state}': choose one of "
                            f"{', '.join(OPTIMIZER_STATE_CHOICES)}")
        if self.round_schedule not in ROUND_SCHEDULES:
            raise UserError(f"{source}: 'round_schedule' is '{self.round_schedule}': choose one of {', '.join(ROUND_SCHEDULES)}")
        if self.personalise_epochs < 0:
            raise UserError(f"{source}: 'personalise_epochs' is {self.personalise_epochs}: it must be >= 0")
        if not self.personalise_lr_factors or not all(f > 0 for f in self.personalise_lr_factors):
            raise UserError(f"{source}: 'personalise_lr_factors' is {self.personalise_lr_factors}: give one or more "
                            f"positive multiples of the LR, e.g. 1,0.1")
        if not 0 < self.fraction_train <= 1:
            raise UserError(f"{source}: 'fraction_train' is {self.fraction_train}: it must be in (0, 1]")
        if self.round_patience is not None and self.round_patience < 1:
            raise UserError(f"{source}: 'round_patience' is {self.round_patience}: it must be >= 1, or none")
        if not self.round_timeout_s > 0:
            raise UserError(f"{source}: 'round_timeout_s' is {self.round_timeout_s}: it must be a positive number of seconds")
        if self.dp_clipping_norm is not None or self.dp_epsilon is not None:
            if self.dp_clipping_norm is None or not self.dp_clipping_norm > 0:
                raise UserError(f"{source}: local differential privacy needs 'dp_clipping_norm' > 0 (the largest L2 "
                                f"norm of a client's update), e.g. 1.0")
            if self.dp_epsilon is None or not self.dp_epsilon > 0:
                raise UserError(f"{source}: local differential privacy needs 'dp_epsilon' > 0 (the privacy budget per "
                                f"round; smaller is more private and noisier), e.g. 5")
            if not 0 < self.dp_delta < 1:
                raise UserError(f"{source}: 'dp_delta' is {self.dp_delta}: it must be in (0, 1), e.g. 1e-5")
            if self.dp_sensitivity is not None and self.dp_sensitivity < 0:
                raise UserError(f"{source}: 'dp_sensitivity' is {self.dp_sensitivity}: it must be >= 0")
        if self.recipe.get("strategy") == "linear-probe":
            raise UserError(f"{source}: linear-probe is not supported in a federated run yet: use lora, bitfit or "
                            f"freeze-bottom (they also send few parameters)")
        if self.clients is not None:
            if len(self.clients) < 2:
                raise UserError(f"{source}: 'clients' lists {len(self.clients)} client(s): a federation needs at least 2")
            names = [str(c.get("name", i)) for i, c in enumerate(self.clients)]
            if len(set(names)) != len(names):
                raise UserError(f"{source}: client names repeat ({', '.join(names)}): name each client once")
            for i, client in enumerate(self.clients):
                self._check_data(client, f"client '{names[i]}'", allow={"name"})
            self.num_clients = len(self.clients)
        else:
            self._check_data(self.data, "'data'", allow=set())
        bad = [c for c in self.poisoned_clients if not 0 <= int(c) < self.num_clients]
        if bad:
            raise UserError(f"{source}: poisoned_clients {bad} are not client indices (0..{self.num_clients - 1})")
        self.run_config = self.client_run_config(0)

    def _check_data(self, data: dict, what: str, allow: set[str]) -> None:
        if not isinstance(data, dict) or not data.get("train"):
            raise UserError(f"{self.source}: {what} needs 'train' (its data file or folder)")
        unknown = sorted(set(data) - set(DATA_FIELDS) - allow)
        if unknown:
            raise UserError(f"{self.source}: {what} sets {', '.join(unknown)}: a client's data takes "
                            f"{', '.join(DATA_FIELDS)}; set the rest once for all clients")

    @property
    def client_names(self) -> list[str]:
        if self.clients is not None:
            return [str(c.get("name", i)) for i, c in enumerate(self.clients)]
        return [f"client-{i}" for i in range(self.num_clients)]

    @property
    def fingerprint(self) -> str:
        """Equal for equal configs in any process (what per-process caches are keyed by)."""
        import json

        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    @property
    def out(self) -> str:
        return self.run_config.out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "FederatedConfig":
        values = dict(values)
        data, clients = values.pop("data", None), values.pop("clients", None)
        options = {k: values.pop(k) for k in cls.OPTIONS if k in values}
        typed = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in list(options.items()):
            kind = str(typed[key].type)
            try:
                if value is None or (isinstance(value, str) and value.lower() == "none" and "None" in kind):
                    # 'none' means no value only where the field takes none; no value at all means the default.
                    if "None" in kind:
                        options[key] = None
                    else:
                        del options[key]
                elif kind.startswith("int"):
                    options[key] = int(value)
                elif kind.startswith("float"):
                    options[key] = float(value)
                elif kind.startswith("bool"):
                    options[key] = value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")
                elif kind.startswith("list"):
                    items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
                    options[key] = [float(v) if "float" in kind else int(v) for v in items]
            except (TypeError, ValueError):
                raise UserError(f"{source}: '{key}' is {value!r}, which is not a valid {kind.split('[')[0].split(' ')[0]}") from None
        for key in ("train", "test", "text_column", "image_column", "label_column"):
            if key in values and data is None and clients is None:
                data = {}
            if key in values and data is not None:
                data[key] = values.pop(key)
        return cls(values, data, clients, source=source, **options)

    @classmethod
    def load(cls, path: str | Path) -> "FederatedConfig":
        return cls.from_dict(read_yaml(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        recipe = {k: v for k, v in self.run_config.to_dict().items() if k not in DATA_FIELDS + ("baseline", "val")}
        recipe["test_fraction"] = self.recipe.get("test_fraction")
        values = {**recipe, **{k: getattr(self, k) for k in self.OPTIONS}}
        if self.data is not None:
            values["data"] = self.data
        else:
            values["clients"] = self.clients
        return values

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def client_run_config(self, index: int) -> RunConfig:
        """The recipe with client ``index``'s data fields (its own file, or the shared dataset)."""
        data = self.data if self.data is not None else {k: v for k, v in self.clients[index].items() if k != "name"}
        # test_fraction is each client's own held-out share; a 'test' file is a separate (global or client) test set.
        recipe = {k: v for k, v in self.recipe.items() if k != "test_fraction"}
        return RunConfig.from_dict({**recipe, **data, "baseline": False},
                                   source=self.source if index == 0 else f"{self.source}: client {index}")

    @property
    def held_out_fractions(self) -> tuple[float, float]:
        """Each client's validation and test shares of its data (default 0.1 each)."""
        val, test = self.recipe.get("val_fraction"), self.recipe.get("test_fraction")
        return (0.1 if val is None else float(val)), (0.1 if test is None else float(test))
