"""What a client does with its own data, in plain transferkit terms (no Flower here): read its share,
build the model, fine-tune it locally with the same engine as a centralised run, evaluate.

The ClientApp (``apps.py``) calls these; so does the driver for the pooled-data checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..backbones.registry import create_backbone
from ..config import RunConfig
from ..data.dataset import Examples, encode_labels
from ..data.packaged import PACKAGED_DATASETS, load_packaged
from ..data.readers import read_examples
from ..data.splits import subsample
from ..engine.batches import Batches
from ..engine.cpu_memory import keep_freed_memory_for_reuse
from ..engine.loop import Engine, default_device
from ..errors import UserError
from ..evaluation.metrics import summary_metrics
from ..finetune import DEFAULT_LR, batch_augmenter, engine_settings
from ..model import Classifier
from ..objectives import CrossEntropyObjective, RegularisedObjective, balanced_class_weights, class_log_prior
from ..strategies.base import check_freeze_batchnorm
from ..strategies import create_strategy
from .config import DATA_FIELDS, FederatedConfig
from .optimizer_state import load as load_optimizer_state
from .partition import partition
from .personal import personal_keys

_DATA_CACHE: dict[tuple, dict] = {}
_MODEL_CACHE: dict[tuple, tuple] = {}


def read_dataset(run_config: RunConfig) -> tuple[Examples, Examples | None]:
    """The training data (and a test file, if given) named by a client's run config."""
    columns = dict(text_column=run_config.text_column, image_column=run_config.image_column,
                   label_column=run_config.label_column)
    if run_config.train in PACKAGED_DATASETS:
        packaged = load_packaged(run_config.train)
        train, test = packaged["train"], packaged.get("test")
    else:
        train, test = read_examples(run_config.train, **columns), None
    if run_config.test:
        test = read_examples(run_config.test, **columns)
    if run_config.max_train_examples is not None:
        train = subsample(train, run_config.max_train_examples, run_config.seed)
    return train, test


def held_out_split(examples: Examples, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Examples]:
    """A client's own train/val/test split (seeded, random: a skewed client may hold a class only once)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_test = max(1, int(round(test_fraction * len(examples)))) if test_fraction > 0 else 0
    n_val = max(1, int(round(val_fraction * len(examples))))
    if len(examples) - n_test - n_val < 2:
        raise UserError(f"a client holds {len(examples)} examples, too few for its train/val/test split: use fewer clients")
    return {"test": examples.subset(order[:n_test]), "val": examples.subset(order[n_test:n_test + n_val]),
            "train": examples.subset(order[n_test + n_val:])}


def client_examples(config: FederatedConfig) -> list[dict[str, Examples]]:
    """Every client's train/val/test examples, computed the same way in every process."""
    key = ("examples", config.fingerprint)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]["clients"]
    base = config.run_config
    val_fraction, test_fraction = config.held_out_fractions
    clients = []
    if config.data is not None:
        train, _ = read_dataset(base)
        labels = np.array(train.labels)
        parts = partition(config.partitioner, labels, config.num_clients, base.seed, alpha=config.alpha,
                          classes_per_client=config.classes_per_client)
        for i, part in enumerate(parts):
            clients.append(held_out_split(train.subset(part), val_fraction, test_fraction, base.seed + 100 + i))
    else:
        clients = [_own_dataset_split(config, i) for i in range(config.num_clients)]
    _DATA_CACHE[key] = {"clients": clients}
    return clients


def _own_dataset_split(config: FederatedConfig, index: int, data: dict[str, Any] | None = None) -> dict[str, Examples]:
    """Client ``index``'s train/val/test from its own dataset: the config's entry, or ``data`` (the same fields,
    as a deployed SuperNode gives them for files on its own machine)."""
    name = config.client_names[index]
    run_config = config.client_run_config(index)
    if data:
        unknown = sorted(set(data) - set(DATA_FIELDS) - {"name"})
        if unknown:
            raise UserError(f"client '{name}': its data config sets {', '.join(unknown)}: it takes {', '.join(DATA_FIELDS)}")
        run_config = run_config.replace(**{k: v for k, v in data.items() if k != "name"})
    val_fraction, test_fraction = config.held_out_fractions
    seed = config.run_config.seed + 100 + index
    try:
        train, test = read_dataset(run_config)
    except UserError as error:
        raise UserError(f"client '{name}': {error}") from None
    if test is not None:  # its own test file: train and val come from its training data
        split = held_out_split(train, val_fraction, 0.0, seed)
        split["test"] = test
        return split
    return held_out_split(train, val_fraction, test_fraction, seed)


def one_client_examples(config: FederatedConfig, index: int, data: dict[str, Any] | None = None) -> dict[str, Examples]:
    """What one deployed client reads: its own dataset (``data`` overriding the config's data fields), or its
    partition of the shared dataset, which it must then hold in full."""
    if not 0 <= index < config.num_clients:
        raise UserError(f"partition-id {index} is not a client of this federation (0..{config.num_clients - 1}): "
                        f"start each SuperNode with its own --node-config 'partition-id=K'")
    key = ("one", config.fingerprint, index, json.dumps(data, sort_keys=True, default=str))
    if key not in _DATA_CACHE:
        if config.data is not None:
            if data:
                raise UserError("a federation over one partitioned dataset reads it on every client: drop data-config "
                                "from --node-config, or list one dataset per client under 'clients'")
            split = client_examples(config)[index]
        else:
            split = _own_dataset_split(config, index, data)
        _DATA_CACHE[key] = {"split": split}
    return _DATA_CACHE[key]["split"]


@dataclass
class LocalModel:
    model: Classifier
    strategy: Any
    run_config: RunConfig
    initial: dict[str, torch.Tensor]  # the starting weights every client shares (pretrained + seeded head)
    exchanged: list[str]  # the state-dict keys that travel: trainable parameters and their modules' float buffers
    personal: list[str]  # the trained keys each client keeps to itself (``personal.py``); they never travel


def local_model(config: FederatedConfig, classes: list[str]) -> LocalModel:
    """One model per process, reused across rounds and clients: every round overwrites what travels."""
    key = (config.fingerprint, tuple(classes))
    if key not in _MODEL_CACHE:
        keep_freed_memory_for_reuse()  # a client's process (a Ray actor, a ClientApp) is not started by our CLI
        base = config.run_config
        strategy = create_strategy(base)
        backbone = create_backbone(base.model, image_size=base.image_size, max_length=base.max_length,
                                   pooling=base.pooling, allow_pickle=base.allow_pickle)
        if base.keep_layers is not None:
            backbone.keep_bottom_layers(base.keep_layers)
        torch.manual_seed(base.seed)
        model = Classifier(backbone, len(classes), base.dropout)
        strategy.prepare(model)
        strategy.apply(model)
        check_freeze_batchnorm(strategy, model, base.model)
        if base.lr is None:
            base = base.replace(lr=strategy.default_lr or DEFAULT_LR[backbone.modality])
        trained = exchanged_keys(model)
        personal = personal_keys(model, config.personal, trained)
        if config.personal != "none" and not personal:
            raise UserError(f"{config.source}: 'personal' is '{config.personal}', but {base.model} under {base.strategy} "
                            f"trains no such weights: choose 'none' or another personal part")
        _MODEL_CACHE[key] = LocalModel(model, strategy, base, {k: v.detach().clone() for k, v in model.state_dict().items()},
                                       [k for k in trained if k not in personal], personal)
    return _MODEL_CACHE[key]


def exchanged_keys(model: torch.nn.Module) -> list[str]:
    """Trainable parameters, plus the floating-point buffers (BatchNorm statistics) of modules that train,
    in state-dict order: the server's initial weights and every client's update list them the same way, as
    Flower's server optimisers (FedAvgM, FedAdam) need, since they pair arrays by position, not by name."""
    keys = {name for name, p in model.named_parameters() if p.requires_grad}
    for module_name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            keys |= {f"{module_name}.{b}" if module_name else b for b, buffer in module.named_buffers(recurse=False)
                     if buffer.is_floating_point()}
    return [name for name in model.state_dict() if name in keys]


def _state_of(local: LocalModel, keys: list[str]) -> dict[str, torch.Tensor]:
    state = local.model.state_dict()
    return {k: state[k].detach().cpu().clone() for k in keys}


def personal_state(local: LocalModel) -> dict[str, torch.Tensor]:
    return _state_of(local, local.personal)


def load_personal(local: LocalModel, state: dict[str, torch.Tensor] | None) -> None:
    """Put this client's own part back on top of the global weights (nothing before its first round)."""
    if state:
        local.model.load_state_dict({k: v for k, v in state.items() if k in local.personal}, strict=False)


def exchanged_state(local: LocalModel) -> dict[str, torch.Tensor]:
    return _state_of(local, local.exchanged)


def load_exchanged(local: LocalModel, state: dict[str, torch.Tensor] | None) -> None:
    """Start from the shared initial weights, then the received global part (if any)."""
    local.model.load_state_dict(local.initial)
    if state:
        unknown = sorted(set(state) - set(local.exchanged))
        if unknown:
            raise UserError(f"received parameters {unknown[:3]} that this client's model does not train: the server "
                            f"and the clients must use the same model and strategy")
        local.model.load_state_dict(state, strict=False)


class ProximalPenalty:
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over the trainable parameters (Li et al. 2020)."""

    def __init__(self, model: torch.nn.Module, mu: float):
        self.mu = mu
        self.reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        terms = [(p - self.reference[n]).pow(2).sum() for n, p in model.named_parameters() if n in self.reference]
        return 0.5 * self.mu * torch.stack(terms).sum() if terms else torch.zeros(())


SHARE_PHASE = 200_000  # training_seed phase of the order in which local_epochs 1/k cuts a client's data (+ the pass)


def round_share(split: dict[str, Examples], parts: int, round_number: int, base_seed: int, client: int) -> dict[str, Examples]:
    """The client's split with only this round's share of its training data (``local_epochs`` 1/parts):
    ``parts`` consecutive rounds cover it once, cut from a permutation drawn anew for every pass."""
    if parts <= 1:
        return split
    passes, share = divmod(max(round_number, 1) - 1, parts)
    order = np.random.default_rng(training_seed(base_seed, client, SHARE_PHASE + passes)).permutation(len(split["train"]))
    return {**split, "train": split["train"].subset(np.sort(np.array_split(order, parts)[share]))}


def training_seed(base_seed: int, client: int, phase: int) -> int:
    """The seed of one client's local training in one phase (round r is phase r; the final personalisation and
    local-only runs have their own): a Ray worker runs many clients and rounds in one process, so what its
    global RNG holds depends on what ran there before, and a run would not repeat itself."""
    return base_seed + 1_000 * phase + client


def _batches(local: LocalModel, examples: Examples, classes: list[str], train: bool, seed: int | None = None) -> Batches:
    backbone, config = local.model.backbone, local.run_config
    if seed is not None:
        config = config.replace(seed=seed)
    prepared = backbone.prepare(examples.inputs)
    labels = encode_labels(examples.labels, classes)
    if train:
        augmenter = batch_augmenter(config, backbone)
        return Batches(prepared, labels, backbone.collate, config.batch_size, shuffle=True, seed=config.seed,
                       lengths=backbone.lengths(prepared), oversample=config.sampler == "oversample",
                       transform=augmenter if augmenter.active else None)
    return Batches(prepared, labels, backbone.collate, config.eval_batch_size, lengths=backbone.lengths(prepared))


def local_train(local: LocalModel, split: dict[str, Examples], classes: list[str], epochs: int,
                proximal_mu: float = 0.0, description: str = "local", seed: int | None = None,
                optimizer_state: dict | None = None, lr_factor: float = 1.0, schedule: str | None = None,
                adjust_logits: bool = True) -> dict[str, Any]:
    """Fine-tune the loaded weights on this client's data (best epoch on its validation split). ``seed`` fixes
    the batch order, dropout and augmentation of this call (``training_seed``), whatever ran before it.
    ``optimizer_state`` (a previous call's ``result["optimizer_state"]``) starts the optimiser from those moments.
    ``lr_factor`` scales the recipe's LRs (this round's place in the federation's decay); ``schedule`` replaces
    the recipe's schedule over this call's epochs. ``adjust_logits`` False trains with plain cross-entropy even
    when the recipe sets ``logit_adjustment``: a model that stays on this client should fit its own class mix."""
    config = local.run_config
    if schedule is not None:
        config = config.replace(schedule=schedule)
    if seed is not None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
    unknown = sorted(set(split["train"].labels) - set(classes))
    if unknown:
        raise UserError(f"client labels {unknown[:5]} are not classes of the global model")
    labels = encode_labels(split["train"].labels, classes)
    # Balanced weights come from this client's own label counts: under label skew they keep its majority
    # classes from pulling the shared head towards them every round.
    weight = balanced_class_weights(labels, len(classes)) if config.class_weights == "balanced" else None
    # The logit-adjusted loss uses this client's label counts too (FedLC): a class the client rarely or never
    # sees is explained by its prior, so its updates stop pushing that class's logit down in the shared head.
    # It acts through the gradients' size, so under SGD; AdamW's per-parameter scaling undoes much of it.
    offset = (class_log_prior(labels, len(classes), config.logit_adjustment)
              if adjust_logits and config.logit_adjustment is not None else None)
    objective = CrossEntropyObjective(label_smoothing=config.label_smoothing, weight=weight, logit_offset=offset)
    if proximal_mu > 0:
        objective = RegularisedObjective(objective, [ProximalPenalty(local.model, proximal_mu)])
    head_lr = None if config.head_lr is None else config.head_lr * lr_factor
    groups = local.strategy.param_groups(local.model, config.lr * lr_factor, head_lr, config.weight_decay)
    engine = Engine(local.model, groups, objective, _batches(local, split["train"], classes, True, seed),
                    _batches(local, split["val"], classes, False), engine_settings(config, epochs),
                    set_train_mode=local.strategy.set_train_mode, description=description)
    load_optimizer_state(engine.optimizer, optimizer_state)
    engine.fit()
    last = engine.history[-1]
    return {"train_loss": float(last["train_loss"]), "val_accuracy": float(last.get("val_accuracy", float("nan"))),
            "optimizer_state": engine.optimizer.state_dict()["state"]}


def local_evaluate(local: LocalModel, examples: Examples, classes: list[str], confusion: bool = False) -> dict[str, Any]:
    """Loss, accuracy, macro-F1 (and with ``confusion`` the confusion matrix, rows the true class)."""
    batches = _batches(local, examples, classes, False)
    engine_model = local.model.to(default_device()).eval()
    from ..engine.batches import map_in_order

    logits = map_in_order(batches, lambda inputs: engine_model(**inputs), default_device())
    loss = float(torch.nn.functional.cross_entropy(logits, batches.labels))
    labels, predictions = batches.labels.numpy(), logits.argmax(1).numpy()
    scores = {"loss": loss, **summary_metrics(labels, predictions)}
    if confusion:
        from sklearn.metrics import confusion_matrix

        scores["confusion"] = confusion_matrix(labels, predictions, labels=list(range(len(classes)))).tolist()
    return scores
