"""Federated fine-tuning: partitioners, configuration errors, the client's local pieces, and whole runs
in Flower's Simulation Engine (Ray) on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import transferkit
from transferkit.cli import main
from transferkit.errors import UserError
from transferkit.federated import FederatedConfig
from transferkit.federated.partition import partition
from tests.conftest import make_sentences, write_table

pytest.importorskip("flwr")


class RecordingProgress:
    """Stands in for the server's progress bar: keeps the lines written to it."""

    def __init__(self):
        self.lines = []

    def write(self, line):
        self.lines.append(line)

    def update(self, n):
        pass

    def set_postfix(self, **values):
        pass


# -- partitioners ---------------------------------------------------------------------------------------------
def test_iid_partition_is_disjoint_complete_and_balanced():
    labels = np.repeat(np.arange(4), 25)
    parts = partition("iid", labels, 4, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert [len(p) for p in parts] == [25, 25, 25, 25]


def test_dirichlet_partition_skews_labels_more_for_small_alpha():
    labels = np.repeat(np.arange(5), 200)

    def mean_top_share(alpha):
        parts = partition("dirichlet", labels, 5, seed=1, alpha=alpha)
        assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
        return np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts])

    assert mean_top_share(0.1) > mean_top_share(100.0) + 0.2
    assert mean_top_share(100.0) < 0.35  # near IID: no class dominates a client


def test_pathological_partition_gives_each_client_k_classes():
    labels = np.repeat(np.arange(10), 30)
    parts = partition("pathological", labels, 5, seed=0, classes_per_client=2)
    assert all(len(set(labels[p])) == 2 for p in parts)


def test_a_partition_that_leaves_a_client_almost_empty_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than 4 examples"):
        partition("iid", np.zeros(10, dtype=int), 5, seed=0)
    with pytest.raises(UserError, match="unknown partitioner"):
        partition("shards", np.zeros(10, dtype=int), 2, seed=0)


# -- configuration errors, before any round ---------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"model": "m", "data": {"train": "a.csv"}, "clients": [{"train": "b"}, {"train": "c"}]}, "not both or neither"),
    ({"model": "m"}, "not both or neither"),
    ({"model": "m", "data": {"train": "a.csv"}, "aggregator": "fedsgd"}, "'aggregator' is 'fedsgd'"),
    ({"model": "m", "data": {"train": "a.csv"}, "poisoned_clients": [7]}, "not client indices"),
    ({"model": "m", "data": {"train": "a.csv"}, "strategy": "linear-probe"}, "linear-probe"),
    ({"model": "m", "data": {"train": "a.csv"}, "teacher": "runs/t"}, "'teacher' is not supported"),
    ({"model": "m", "data": {"train": "a.csv"}, "l2_sp": 0.01}, "'l2_sp' is not supported.*fedprox"),
    ({"model": "m", "data": {"train": "a.csv"}, "local_epochs": 0.3}, "'local_epochs' is 0.3: .* or 1/k"),
    ({"model": "m", "data": {"train": "a.csv"}, "local_epochs": 1.5}, "'local_epochs' is 1.5"),
    ({"model": "m", "data": {"train": "a.csv"}, "local_epochs": 0}, "'local_epochs' is 0.0"),
    ({"model": "m", "data": {"train": "a.csv"}, "head_init": "probe"}, "'head_init' is 'probe'"),
    ({"model": "m", "clients": [{"name": "a", "train": "x"}, {"name": "a", "train": "y"}]}, "client names repeat"),
    ({"model": "m", "clients": [{"name": "a", "train": "x"}, {"name": "b"}]}, "client 'b' needs 'train'"),
    ({"model": "m", "clients": [{"name": "a", "train": "x", "epochs": 3}, {"name": "b", "train": "y"}]}, "sets epochs"),
    ({"model": "m", "data": {"train": "a.csv"}, "max_rounds": "many"}, "'max_rounds' is 'many'"),
    ({"model": "m", "data": {"train": "a.csv"}, "aggregator": "fedavgm", "server_momentum": 1.0}, "'server_momentum' is 1.0"),
    ({"model": "m", "data": {"train": "a.csv"}, "aggregator": "fedadam", "server_lr": 0}, "'server_lr' is 0"),
    ({"model": "m", "data": {"train": "a.csv"}, "personal": "encoder"}, "'personal' is 'encoder': choose one of none, head"),
    ({"model": "m", "data": {"train": "a.csv"}, "client_optimizer_state": "carry"},
     "'client_optimizer_state' is 'carry': choose one of reset, keep"),
    ({"model": "m", "data": {"train": "a.csv"}, "round_schedule": "step"},
     "'round_schedule' is 'step': choose one of linear, cosine, exponential, constant"),
])
def test_bad_federated_configs_are_clear_errors(values, message):
    with pytest.raises(UserError, match=message):
        FederatedConfig.from_dict(values, source="fed.yaml")


def test_clients_with_test_labels_no_client_trains_on_are_refused(tiny_bert_dir, tmp_path):
    from transferkit.federated import federate

    a = write_table(tmp_path / "a.csv", make_sentences(40, seed=1))
    b = write_table(tmp_path / "b.csv", make_sentences(40, seed=2))
    odd = write_table(tmp_path / "odd.csv", [("good film", "neutral")] * 4)
    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "out": str(tmp_path / "run"), "clients": [
        {"name": "a", "train": str(a)}, {"name": "b", "train": str(b), "test": str(odd)}]}, source="fed.yaml")
    with pytest.raises(UserError, match=r"client 'b': test labels \['neutral'\]"):
        federate(config)
    assert not (tmp_path / "run").exists()


# -- the client's pieces ----------------------------------------------------------------------------------------
def test_server_learning_rate_defaults_to_each_aggregators_own_and_is_passed_to_flower():
    from transferkit.federated.aggregators import create_aggregator

    base = {"model": "m", "data": {"train": "a.csv"}}
    momentum = create_aggregator(FederatedConfig.from_dict({**base, "aggregator": "fedavgm"}), 3)
    assert type(momentum).__name__ == "FedAvgM"
    assert (momentum.server_learning_rate, momentum.server_momentum) == (1.0, 0.9)
    tuned = create_aggregator(FederatedConfig.from_dict({**base, "aggregator": "fedavgm", "server_lr": "3",
                                                         "server_momentum": 0}), 3)
    assert (tuned.server_learning_rate, tuned.server_momentum) == (3.0, 0.0)
    assert create_aggregator(FederatedConfig.from_dict({**base, "aggregator": "fedadam"}), 3).eta == 0.01


def test_fedavgm_pairs_arrays_by_name_and_keeps_batchnorm_statistics_averaged():
    """Flower's FedAvgM pairs the current and the averaged arrays by position: the server's initial weights and
    the clients' updates must list them in one order. Its momentum must not touch running statistics."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from transferkit.federated.aggregators import average_statistics, create_aggregator
    from transferkit.federated.local import exchanged_keys

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    keys = exchanged_keys(net)
    assert keys == [k for k in net.state_dict() if k != "1.num_batches_tracked"]  # state-dict order, floats only
    initial = {k: net.state_dict()[k].clone() for k in keys}

    class Grid:
        def get_node_ids(self):
            return [11, 12]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    strategy = create_aggregator(FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"},
                                                            "aggregator": "fedavgm", "server_momentum": 0.9}), 2)
    sent = list(strategy.configure_train(1, ArrayRecord(initial), ConfigRecord({}), Grid()))
    replies = []
    for message, (shift, examples) in zip(sent, ((1.0, 30), (3.0, 10))):
        update = {k: v + shift for k, v in initial.items()}
        replies.append(Message(RecordDict({"arrays": ArrayRecord(update),
                                           "metrics": MetricRecord({"num-examples": examples})}), reply_to=message))
    aggregated, _ = strategy.aggregate_train(1, replies)
    result = average_statistics(aggregated, replies).to_torch_state_dict()
    for name, value in initial.items():  # round 1 of FedAvgM at server LR 1 is the weighted mean: + 1.5
        assert torch.allclose(result[name], value + 1.5), name
    # Round 2: momentum carries the parameters further; the statistics stay the plain weighted mean.
    sent = list(strategy.configure_train(2, ArrayRecord(result), ConfigRecord({}), Grid()))
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: v + 1.0 for k, v in result.items()}),
                                   "metrics": MetricRecord({"num-examples": 20})}), reply_to=m) for m in sent]
    second = average_statistics(strategy.aggregate_train(2, replies)[0], replies).to_torch_state_dict()
    assert torch.allclose(second["0.weight"], result["0.weight"] + 1.0 + 0.9 * 1.5)
    assert torch.allclose(second["1.running_var"], result["1.running_var"] + 1.0)


def test_proximal_term_is_zero_at_the_global_weights_and_pulls_back():
    from transferkit.federated.local import ProximalPenalty

    model = torch.nn.Linear(3, 2)
    penalty = ProximalPenalty(model, mu=0.5)
    assert float(penalty(model).detach()) == 0.0
    with torch.no_grad():
        model.weight.add_(1.0)
    value = penalty(model)
    assert float(value.detach()) == pytest.approx(0.5 * 0.5 * 6)
    value.backward()
    assert torch.allclose(model.weight.grad, torch.full((2, 3), 0.5))  # mu * (w - w_global)


def test_lora_clients_exchange_only_adapters_and_the_head(tiny_bert_dir, tmp_path):
    from transferkit.federated.local import local_model

    data = write_table(tmp_path / "d.csv", make_sentences(60))
    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "strategy": "lora", "data": {"train": str(data)}},
                                       source="t")
    local = local_model(config, ["neg", "pos"])
    assert local.exchanged and all("lora_" in k or k.startswith("head.") for k in local.exchanged)
    total = sum(v.numel() for v in local.model.state_dict().values())
    sent = sum(local.model.state_dict()[k].numel() for k in local.exchanged)
    assert sent < 0.5 * total


def test_personal_parts_name_the_head_or_the_batchnorm_layers_among_what_trains():
    from transferkit.federated.personal import personal_keys

    model = torch.nn.Module()
    model.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model.head = torch.nn.Linear(4, 2)
    trained = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert personal_keys(model, "head", trained) == ["head.weight", "head.bias"]
    assert personal_keys(model, "batchnorm", trained) == ["body.1.weight", "body.1.bias", "body.1.running_mean",
                                                          "body.1.running_var"]
    assert personal_keys(model, "none", trained) == []
    # 'none' read from YAML or the command line arrives as no value: it means no personal part, not an error.
    assert FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"}, "personal": "none"}, source="t").personal == "none"
    assert FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"}, "personal": None}, source="t").personal == "none"
    # Only what trains can be personal: a frozen BatchNorm stays out.
    assert personal_keys(model, "batchnorm", ["body.0.weight", "head.weight"]) == []


def test_a_client_keeps_its_personal_part_in_its_flower_state_and_counts_the_rounds():
    from flwr.app import RecordDict

    from transferkit.federated import personal

    state = RecordDict()
    assert personal.kept(state) == (None, 0)
    head = {"head.weight": torch.randn(2, 3)}
    personal.keep(state, head)
    head["head.weight"].add_(1.0)  # what is kept is a copy, not the live tensor
    personal.keep(state, head)
    weights, rounds = personal.kept(state)
    assert rounds == 2 and torch.equal(weights["head.weight"], head["head.weight"])


def test_fedper_keeps_the_head_on_the_client_and_fedbn_needs_batchnorm(tiny_bert_dir, tmp_path):
    from transferkit.federated.local import local_model

    data = write_table(tmp_path / "d.csv", make_sentences(60))
    recipe = {"model": str(tiny_bert_dir), "strategy": "lora", "data": {"train": str(data)}}
    local = local_model(FederatedConfig.from_dict({**recipe, "personal": "head"}, source="t"), ["neg", "pos"])
    assert local.personal and all(k.startswith("head.") for k in local.personal)
    assert local.exchanged and not any(k.startswith("head.") for k in local.exchanged)
    with pytest.raises(UserError, match="'personal' is 'batchnorm', but .* trains no such weights"):
        local_model(FederatedConfig.from_dict({**recipe, "personal": "batchnorm"}, source="fed.yaml"), ["neg", "pos"])


def test_a_clients_local_training_repeats_itself_whatever_ran_before_in_its_process(tiny_bert_dir, tmp_path):
    from transferkit.data.readers import read_examples
    from transferkit.federated.local import exchanged_state, held_out_split, load_exchanged, local_model, local_train

    data = write_table(tmp_path / "d.csv", make_sentences(80, seed=4))
    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "strategy": "lora", "lr": 5e-3, "batch_size": 8,
                                        "dropout": 0.3, "data": {"train": str(data)}}, source="t")
    split = held_out_split(read_examples(str(data), text_column="text"), 0.1, 0.1, seed=0)
    local = local_model(config, ["neg", "pos"])

    def train(seed, noise):
        load_exchanged(local, None)
        torch.rand(noise)  # another client or round ran in this process before: the global RNG moved on
        local_train(local, split, ["neg", "pos"], 1, seed=seed)
        return exchanged_state(local)

    first, second, other = train(7, 1), train(7, 123), train(8, 1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)  # a different phase trains differently


def test_a_kept_optimiser_state_survives_the_flower_state_and_resumes_adams_step_count():
    from flwr.app import RecordDict

    from transferkit.federated import optimizer_state

    weights = torch.nn.Parameter(torch.randn(3, 2))
    bias = torch.nn.Parameter(torch.zeros(2))
    adam = torch.optim.AdamW([weights, bias], lr=0.1)
    for _ in range(3):
        (weights.sum() ** 2 + bias.sum()).backward()
        adam.step()
        adam.zero_grad()
    state = RecordDict()
    assert optimizer_state.kept(state) is None
    optimizer_state.keep(state, adam.state_dict()["state"])
    adam.state[weights]["exp_avg"].add_(1.0)  # what is kept is a copy, not the live tensor
    fresh = torch.optim.AdamW([weights, bias], lr=0.01)
    optimizer_state.load(fresh, optimizer_state.kept(state))
    assert float(fresh.state[weights]["step"]) == 3.0 and fresh.param_groups[0]["lr"] == 0.01  # its own LR stays
    assert torch.allclose(fresh.state[weights]["exp_avg"] + 1.0, adam.state[weights]["exp_avg"])
    assert torch.equal(fresh.state[bias]["exp_avg_sq"], adam.state[bias]["exp_avg_sq"])
    with pytest.raises(RuntimeError, match="trainable parameters changed"):
        optimizer_state.load(torch.optim.AdamW([weights], lr=0.01), optimizer_state.kept(state))


def test_local_training_started_from_kept_moments_goes_on_counting_adams_steps(tiny_bert_dir, tmp_path):
    from transferkit.data.readers import read_examples
    from transferkit.federated.local import held_out_split, load_exchanged, local_model, local_train

    data = write_table(tmp_path / "d.csv", make_sentences(80, seed=6))
    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "strategy": "lora", "lr": 5e-3, "batch_size": 8,
                                        "data": {"train": str(data)}, "client_optimizer_state": "keep"}, source="t")
    split = held_out_split(read_examples(str(data), text_column="text"), 0.1, 0.1, seed=0)
    local = local_model(config, ["neg", "pos"])
    load_exchanged(local, None)
    first = local_train(local, split, ["neg", "pos"], 1, seed=1)["optimizer_state"]
    steps = {float(moments["step"]) for moments in first.values()}
    load_exchanged(local, None)
    second = local_train(local, split, ["neg", "pos"], 1, seed=2, optimizer_state=first)["optimizer_state"]
    assert len(steps) == 1 and steps.pop() > 0
    assert {float(m["step"]) for m in second.values()} == {2 * float(m["step"]) for m in first.values()}
    reset = local_train(local, split, ["neg", "pos"], 1, seed=2)["optimizer_state"]
    assert {float(m["step"]) for m in reset.values()} == {float(m["step"]) for m in first.values()}


def test_the_clients_lr_decays_across_rounds_as_one_schedule_over_max_rounds():
    def factors(**options):
        config = FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"}, "max_rounds": 5, **options}, source="t")
        return [round(config.round_lr_factor(r), 4) for r in range(1, 6)]

    assert factors() == [1.0] * 5  # constant by default
    assert factors(round_schedule="linear") == [0.9, 0.7, 0.5, 0.3, 0.1]  # each round at the middle of its share
    assert factors(round_schedule="cosine") == [0.9755, 0.7939, 0.5, 0.2061, 0.0245]
    assert FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"}}, source="t").recipe["schedule"] == "constant"


def test_local_training_scales_the_recipes_lrs_by_the_rounds_factor(tiny_bert_dir, tmp_path, monkeypatch):
    from transferkit.data.readers import read_examples
    from transferkit.federated import local as local_module

    data = write_table(tmp_path / "d.csv", make_sentences(40, seed=7))
    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "strategy": "lora", "lr": 4e-3, "head_lr": 8e-3,
                                        "batch_size": 8, "data": {"train": str(data)}}, source="t")
    split = local_module.held_out_split(read_examples(str(data), text_column="text"), 0.2, 0.0, seed=0)
    seen = []

    class Recording(local_module.Engine):
        def __init__(self, model, groups, *args, **kwargs):
            seen.append((sorted({g["lr"] for g in groups}), args[3].schedule))
            super().__init__(model, groups, *args, **kwargs)

    monkeypatch.setattr(local_module, "Engine", Recording)
    local = local_module.local_model(config, ["neg", "pos"])
    local_module.load_exchanged(local, None)
    local_module.local_train(local, split, ["neg", "pos"], 1, seed=1, lr_factor=0.25)
    local_module.local_train(local, split, ["neg", "pos"], 1, seed=1, schedule="cosine")
    assert [schedule for _, schedule in seen] == ["constant", "cosine"]
    assert seen[0][0] == pytest.approx([1e-3, 2e-3]) and seen[1][0] == pytest.approx([4e-3, 8e-3])


def test_a_client_missing_a_class_pushes_its_logit_down_less_with_logit_adjustment(tiny_bert_dir, tmp_path):
    """Label skew: a client that holds no 'pos' example. Plain cross-entropy drives the shared head's 'pos' logit
    down; the logit-adjusted loss (this client's own prior) much less. With SGD: under AdamW, the default, both
    moved it about alike (-0.24, -0.23): Adam's per-parameter scaling turns the small gradients into full steps.
    The report's personal fine-tunes use plain cross-entropy (adjust_logits=False): a model that stays on the
    client fits its own class mix."""
    from transferkit.data.readers import read_examples
    from transferkit.federated.local import held_out_split, load_exchanged, local_model, local_train

    rows = [r for r in make_sentences(120, seed=5) if r[1] == "neg"]
    data = write_table(tmp_path / "d.csv", rows)
    split = held_out_split(read_examples(str(data), text_column="text"), 0.2, 0.0, seed=0)

    def pos_margin(adjust=True, **recipe):
        config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "strategy": "lora", "optimizer": "sgd", "lr": 0.1,
                                            "batch_size": 8, "data": {"train": str(data)}, **recipe}, source="t")
        local = local_model(config, ["neg", "pos"])
        load_exchanged(local, None)
        local_train(local, split, ["neg", "pos"], 2, seed=0, adjust_logits=adjust)
        bias = local.model.head.linear.bias.detach()
        return float(bias[1] - bias[0])

    plain, adjusted = pos_margin(), pos_margin(logit_adjustment=1.0)
    assert plain < adjusted < 0 and abs(adjusted) < abs(plain) / 2
    assert pos_margin(logit_adjustment=1.0, adjust=False) == plain


def client_report(config, split) -> dict:
    """The client's final report (personalisation, local-only baseline), from its query handler registered on a
    stand-in ClientApp: one client holding ``split``, classes neg and pos, one epoch of each fine-tune."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from transferkit.federated import apps

    class App:  # collects the handlers as Flower's ClientApp decorators do
        handlers = {}

        def __getattr__(self, kind):
            return lambda: (lambda handler: self.handlers.setdefault(kind, handler))

    app = App()
    apps.add_client_handlers(app, lambda message, context: (config, ["neg", "pos"], 0, split), lambda *unused: None)
    settings = ConfigRecord({"personalise-epochs": 1, "local-only-epochs": 1, **apps.classes_record(["neg", "pos"])})
    message = Message(RecordDict({"config": settings}), dst_node_id=1, message_type=MessageType.QUERY)
    message.metadata.__dict__["_message_id"] = "1"
    return app.handlers["query"](message, SimpleNamespace(state=RecordDict())).content["metrics"]


@pytest.mark.parametrize("round_schedule", ["constant", "cosine"])
def test_the_reports_personalisation_and_local_only_runs_decay_as_the_rounds_did(tiny_bert_dir, tmp_path, monkeypatch,
                                                                                round_schedule):
    """With a decay across rounds the federation ends near LR 0; the report's own fine-tunes (personalisation of the
    global model, the local-only baseline) then decay over their epochs too, instead of a whole epoch at the peak
    LR (on Fashion-MNIST under label skew: personalisation kept by 3 of 5 clients instead of none)."""
    from transferkit.data.readers import read_examples
    from transferkit.federated import apps
    from transferkit.federated.local import held_out_split

    data = write_table(tmp_path / "d.csv", make_sentences(60, seed=4))
    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "strategy": "lora", "batch_size": 8,
                                        "round_schedule": round_schedule, "data": {"train": str(data)}}, source="t")
    split = held_out_split(read_examples(str(data), text_column="text"), 0.2, 0.2, seed=0)
    schedules = []
    real_train = apps.local_train

    def local_train(*args, **kwargs):
        schedules.append((kwargs["description"].split()[-1], kwargs.get("schedule")))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(apps, "local_train", local_train)

    metrics = client_report(config, split)
    expected = None if round_schedule == "constant" else round_schedule
    assert schedules == [("personalise", expected), ("local-only", expected)]
    assert {"personalised", "local_only", "global"} <= set(metrics)


@pytest.mark.parametrize("val, kept_factor", [
    ({1.0: 0.75, 0.1: 0.85}, 0.1),  # the best validation wins, not the first or the best test
    ({1.0: 0.80, 0.1: 0.78}, 1.0),  # a tie with the global model keeps the personalised one (it does not drop)
    ({1.0: 0.70, 0.1: 0.78}, None),  # every factor drops validation accuracy: the global model stays
])
def test_personalisation_tries_each_lr_factor_from_the_global_model_and_keeps_the_best_on_validation(
        tiny_bert_dir, tmp_path, monkeypatch, val, kept_factor):
    from transferkit.data.readers import read_examples
    from transferkit.federated import apps
    from transferkit.federated.local import held_out_split

    data = write_table(tmp_path / "d.csv", make_sentences(60, seed=4))
    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "strategy": "lora", "batch_size": 8,
                                        "personalise_lr_factors": "1,0.1", "data": {"train": str(data)}}, source="t")
    assert config.personalise_lr_factors == [1.0, 0.1]
    split = held_out_split(read_examples(str(data), text_column="text"), 0.2, 0.2, seed=0)
    model_now = {"factor": None}
    starts = []

    def local_train(local, split, classes, epochs, **kwargs):
        head = local.model.head.linear.weight
        starts.append((kwargs.get("lr_factor", 1.0), head.detach().clone()))
        with torch.no_grad():
            head.add_(1.0)  # a fine-tune moves the weights: the next factor must start from the global model again
        model_now["factor"] = "local" if "local-only" in kwargs["description"] else kwargs["lr_factor"]
        return {}

    tests = {None: 0.70, 1.0: 0.90, 0.1: 0.80, "local": 0.60}

    def local_evaluate(local, examples, classes, confusion=False):
        factor = model_now["factor"]
        if examples is split["val"]:
            return {"accuracy": 0.80 if factor is None else val[factor]}
        return {"accuracy": tests[factor], **({"confusion": [[1, 0], [0, 1]]} if confusion else {})}

    monkeypatch.setattr(apps, "local_train", local_train)
    monkeypatch.setattr(apps, "local_evaluate", local_evaluate)

    metrics = client_report(config, split)
    assert [factor for factor, _ in starts[:2]] == [1.0, 0.1]
    assert torch.equal(starts[0][1], starts[1][1])  # both factors started from the global model
    assert metrics["personalisation_kept"] == int(kept_factor is not None)
    assert metrics["personalised"] == (tests[kept_factor] if kept_factor else metrics["global"])
    assert metrics.get("personalisation_lr_factor") == kept_factor and metrics["local_only"] == 0.60
    assert config.report_timeout_s(5) == config.round_timeout_s * (1 + 2 + 5)  # two personalisations, five epochs


def test_personalisation_lr_factors_must_be_positive():
    for bad in ("", "1,-0.1", "0"):
        with pytest.raises(UserError, match="personalise_lr_factors"):
            FederatedConfig.from_dict({"model": "m", "data": {"train": "d.csv"}, "personalise_lr_factors": bad},
                                      source="t")


def test_a_clients_loss_takes_balanced_weights_from_its_own_label_counts(tiny_bert_dir, tmp_path, monkeypatch):
    from transferkit.data.readers import read_examples
    from transferkit.federated import local as local_module

    rows = make_sentences(80, seed=5)
    skewed = [r for r in rows if r[1] == "pos"][:30] + [r for r in rows if r[1] == "neg"][:10]  # 3:1, as under label skew
    data = write_table(tmp_path / "d.csv", skewed)
    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "strategy": "lora", "batch_size": 8,
                                        "class_weights": "balanced", "data": {"train": str(data)}}, source="t")
    split = {"train": read_examples(str(data), text_column="text")}
    split["val"] = split["train"]
    seen = []

    class Recording(local_module.CrossEntropyObjective):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            seen.append(self.weight)

    monkeypatch.setattr(local_module, "CrossEntropyObjective", Recording)
    local_module.local_train(local_module.local_model(config, ["neg", "pos"]), split, ["neg", "pos"], 1, seed=0)
    # n / (k * count): 40 / (2 * 10) for neg, 40 / (2 * 30) for pos (unweighted runs pass None, as before)
    assert len(seen) == 1 and torch.allclose(seen[0], torch.tensor([2.0, 2 / 3]))


def test_a_clients_model_keeps_only_the_layers_the_recipe_keeps(tiny_bert_dir, tmp_path):
    from transferkit.federated.local import local_model

    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "strategy": "full", "keep_layers": 1,
                                        "data": {"train": "a.csv"}}, source="t")
    local = local_model(config, ["neg", "pos"])
    assert local.model.backbone.encoder.config.num_hidden_layers == 1
    assert not any(".layer.1." in key for key in local.exchanged)  # the dropped layer neither trains nor travels


def test_a_fractional_local_epoch_trains_each_round_on_the_next_share_of_the_clients_data():
    from transferkit.data.dataset import Examples
    from transferkit.federated.local import round_share

    config = FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"}, "local_epochs": 0.25}, source="t")
    assert (config.round_parts, config.epochs_per_round) == (4, 1)
    split = {"train": Examples([f"t{i}" for i in range(10)], ["a", "b"] * 5, "t.csv", "text"), "val": None}
    passes = [[round_share(split, 4, r, base_seed=0, client=1)["train"].inputs for r in rounds]
              for rounds in ((1, 2, 3, 4), (5, 6, 7, 8))]
    for shares in passes:  # four rounds cover the data once
        assert sorted(sum(shares, [])) == sorted(split["train"].inputs) and [len(s) for s in shares] == [3, 3, 2, 2]
    assert passes[0] != passes[1]  # each pass cuts anew
    assert round_share(split, 4, 2, base_seed=0, client=1)["train"].inputs == passes[0][1]  # and repeatably
    assert round_share(split, 1, 7, base_seed=0, client=1) is split  # whole epochs: every round sees everything


def test_the_final_reports_wait_grows_with_the_training_they_do():
    """The final report personalises and trains the local-only baseline: with a 30 s round timeout it must not be
    cut off after 30 s (a slow CI machine dropped every report that way)."""
    base = {"model": "m", "data": {"train": "a.csv"}, "round_timeout_s": 30}
    plain = FederatedConfig.from_dict({**base, "personalise_epochs": 0, "local_only": False}, source="t")
    assert plain.report_timeout_s(rounds_done=5) == 30  # evaluation only: one round's wait
    both = FederatedConfig.from_dict(base, source="t")  # 1 personalisation epoch, 2 local-only epochs after 2 rounds
    assert both.report_timeout_s(rounds_done=2) == 30 * (1 + 3)
    quarter = FederatedConfig.from_dict({**base, "local_epochs": 0.25}, source="t")  # a round is a quarter epoch
    assert quarter.report_timeout_s(rounds_done=8) == 30 * (1 + (1 + 2) / 0.25)


def test_resume_without_an_unfinished_federation_is_a_clear_error(tmp_path):
    from transferkit.federated import federate

    config = FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"}, "out": str(tmp_path / "none")}, source="t")
    with pytest.raises(UserError, match="no unfinished federated run to resume"):
        federate(config, resume=True)


def test_round_checkpoint_round_trips_and_a_crash_between_its_writes_leaves_the_previous_round(tmp_path, monkeypatch):
    from transferkit.federated import apps

    checkpoint = apps.RoundCheckpoint(tmp_path)
    weights = {"head.linear.weight": torch.randn(2, 3), "backbone.x.lora_A.default.weight": torch.randn(4, 3)}
    checkpoint.save(weights, {"history": [{"round": 1}], "best_round": 1}, server={"m_t/head": np.ones(2)})
    loaded, state = checkpoint.load("best")
    assert state["best_round"] == 1 and set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert checkpoint.load_server_state(1)["m_t/head"].tolist() == [1.0, 1.0]

    # Round 2 dies after its weights are written, before state.json: round 1 is still what is on record.
    second = {k: v + 1 for k, v in weights.items()}
    monkeypatch.setattr(apps, "atomic_write_text", lambda path, text: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        checkpoint.save(second, {"history": [{"round": 1}, {"round": 2}], "best_round": 1}, server={"m_t/head": np.zeros(2)})
    monkeypatch.undo()
    latest, state = checkpoint.load("latest")
    assert len(state["history"]) == 1 and all(torch.equal(latest[k], weights[k]) for k in weights)
    assert checkpoint.load_server_state(len(state["history"]))["m_t/head"].tolist() == [1.0, 1.0]

    # Later rounds keep only the latest and the best round's files.
    checkpoint.save(second, {"history": [{"round": 1}, {"round": 2}], "best_round": 1})
    checkpoint.save(second, {"history": [{"round": 1}, {"round": 2}, {"round": 3}], "best_round": 3})
    assert sorted(p.name for p in tmp_path.glob("rounds/*.safetensors")) == ["round-3.safetensors"]



@pytest.mark.parametrize("aggregator", ["fedavgm", "fedadam"])
def test_a_server_optimisers_state_survives_the_round_checkpoint(tmp_path, aggregator):
    """Round 2 of a strategy rebuilt from the round-1 checkpoint equals round 2 of the one that kept running: the
    momentum (FedAvgM) and both moments (FedAdam) are saved, and the weights come back in the state-dict order
    the server optimisers pair them by (the file holds them in its own order)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from transferkit.federated.aggregators import create_aggregator, restore_server_state, server_state
    from transferkit.federated.apps import RoundCheckpoint

    class Grid:
        def get_node_ids(self):
            return [11, 12]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def one_round(strategy, number, weights, shift):
        sent = list(strategy.configure_train(number, ArrayRecord(weights), ConfigRecord({}), Grid()))
        replies = [Message(RecordDict({"arrays": ArrayRecord({k: v + shift * (i + 1) for k, v in weights.items()}),
                                       "metrics": MetricRecord({"num-examples": 10 * (i + 1)})}), reply_to=m)
                   for i, m in enumerate(sent)]
        return strategy.aggregate_train(number, replies)[0].to_torch_state_dict()

    config = FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"}, "aggregator": aggregator,
                                        "server_momentum": 0.9, "server_lr": 0.5}, source="t")
    # Names whose sorted order is not the state-dict order.
    initial = {"z.weight": torch.randn(3, 2), "a.bias": torch.randn(3), "m.weight": torch.randn(2, 2)}
    running = create_aggregator(config, 2)
    first = one_round(running, 1, initial, 0.5)
    checkpoint = RoundCheckpoint(tmp_path)
    checkpoint.save(first, {"history": [{"round": 1}], "best_round": 1}, server=server_state(running, list(first)))
    assert checkpoint.load_server_state(1)  # both optimisers keep state after round 1
    expected = one_round(running, 2, first, -0.25)

    saved, _ = checkpoint.load("latest")
    weights = {name: saved[name] for name in initial}  # what server_loop does on --resume
    resumed = create_aggregator(config, 2)
    restore_server_state(resumed, checkpoint.load_server_state(1), list(weights))
    again = one_round(resumed, 2, weights, -0.25)
    assert all(torch.allclose(again[k], expected[k], atol=1e-6) for k in initial)
    # Without the saved state, round 2 goes elsewhere: the check above could fail.
    fresh = one_round(create_aggregator(config, 2), 2, weights, -0.25)
    assert not all(torch.allclose(fresh[k], expected[k], atol=1e-6) for k in initial)


# -- whole runs in the Simulation Engine --------------------------------------------------------------------------
def test_federated_lora_run_reports_clients_and_saves_a_usable_global_model(tiny_bert_dir, tmp_path):
    import transferkit

    data = write_table(tmp_path / "data.csv", make_sentences(240, seed=3))
    metrics = transferkit.federate(FederatedConfig.from_dict({
        "model": str(tiny_bert_dir), "strategy": "lora", "lr": 5e-3, "batch_size": 16, "out": str(tmp_path / "run"),
        "data": {"train": str(data)}, "partitioner": "dirichlet", "alpha": 1.0, "num_clients": 3,
        "aggregator": "fedprox", "max_rounds": 2, "round_patience": None, "client_optimizer_state": "keep",
        "round_schedule": "linear"}, source="test"))
    run = tmp_path / "run"
    assert metrics["rounds"] == 2 and all(h["clients_trained"] == 3 and not h["failures"] for h in metrics["history"])
    assert metrics["round_schedule"] == "linear" and [h["client_lr_factor"] for h in metrics["history"]] == [0.75, 0.25]
    assert "fedprox, 3 clients; client LR linear over rounds" in (run / "report.md").read_text()
    assert metrics["bytes"]["exchanged_fraction"] < 0.5
    assert metrics["bytes"]["total"] == sum(h["bytes_down"] + h["bytes_up"] for h in metrics["history"])
    assert set(metrics["per_client"]) == {"client-0", "client-1", "client-2"}
    for report in metrics["per_client"].values():
        assert {"global", "personalised", "local_only"} <= set(report)
        assert report["personalised"] >= 0 and 0 <= report["global"] <= 1
    assert (run / "plots" / "rounds.png").is_file() and (run / "plots" / "clients.png").is_file()
    assert not (run / "rounds").exists()  # round checkpoints go once the run finished
    model = transferkit.load_run(run)
    assert model.predict(["good movie"])[0] in ("neg", "pos")
    assert model.columns == {"label_column": "label"}  # the clients' columns, for evaluate/predict (text was guessed)



def test_fedper_run_trains_each_clients_own_head_over_every_round_and_a_resumed_run_gives_it_back(
        tiny_bert_dir, tmp_path, monkeypatch):
    """Two rounds, then the run dies before writing its results; resumed with a third round, each client takes
    its head back from its state file (a new Flower run starts with empty client states)."""
    import transferkit
    from transferkit.federated import run as federated_run

    clients = [{"name": f"site{i}", "train": str(write_table(tmp_path / f"c{i}.csv", make_sentences(60, seed=20 + i)))}
               for i in range(2)]
    recipe = {"model": str(tiny_bert_dir), "strategy": "lora", "lr": 5e-3, "batch_size": 16, "out": str(tmp_path / "run"),
              "clients": clients, "personal": "head", "max_rounds": 2, "round_patience": None, "personalise_epochs": 0,
              "local_only": False}

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the results were written")

    with monkeypatch.context() as patched:
        patched.setattr(federated_run, "write_federated_run", crash)
        with pytest.raises(RuntimeError, match="killed"):
            transferkit.federate(FederatedConfig.from_dict(recipe, source="test"))
    kept = sorted(p.name for p in (tmp_path / "run" / "clients" / "client-0").iterdir())
    assert kept == ["round-1.safetensors", "round-2.safetensors"]
    metrics = transferkit.federate(FederatedConfig.from_dict({**recipe, "max_rounds": 3}, source="test"), resume=True)
    # Each client's head trained in every round: two before the resume (in memory), one after (from its file).
    assert [r["personal_rounds"] for r in metrics["per_client"].values()] == [3, 3]
    assert not (tmp_path / "run" / "clients").exists()  # a finished run keeps no client state
    assert metrics["personal"]["part"] == "head" and metrics["personal"]["kept_keys"] == 2
    assert metrics["test"]["examples"] > 0  # the clients' own test splits, each scored with its own head
    assert not (tmp_path / "run" / "model").exists()  # the shared part alone is no client's model


def test_fedbn_run_keeps_each_clients_batchnorm_layers_and_sends_the_rest(tmp_path):
    """FedBN end to end on the packaged EfficientNet-Lite0: two clients whose images differ in brightness."""
    import transferkit
    from PIL import Image

    from tests.conftest import make_stripes

    clients = []
    for i, shift in enumerate((0, 90)):
        root = tmp_path / f"site{i}"
        images, labels = make_stripes(32, size=32, seed=i)
        for j, (image, label) in enumerate(zip(images, labels)):
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image.astype(int) + shift, 0, 255).astype(np.uint8)).save(root / label / f"{j:02d}.png")
        clients.append({"name": f"site{i}", "train": str(root)})
    metrics = transferkit.federate(FederatedConfig.from_dict({
        "model": "efficientnet-lite0", "image_size": 32, "strategy": "freeze-bottom", "freeze_layers": 14,
        "lr": 1e-3, "batch_size": 8, "out": str(tmp_path / "run"), "clients": clients, "personal": "batchnorm",
        "max_rounds": 2, "round_patience": None, "personalise_epochs": 0, "local_only": False}, source="test"))
    # The trainable BatchNorm layers (scale, shift, running statistics) of the top blocks stayed home.
    assert metrics["personal"]["part"] == "batchnorm" and metrics["personal"]["kept_keys"] > 0
    assert [r["personal_rounds"] for r in metrics["per_client"].values()] == [2, 2]
    assert all(0 <= r["global"] <= 1 for r in metrics["per_client"].values())  # shared part + own BatchNorm
    assert metrics["bytes"]["exchanged_fraction"] < 1.0 and metrics["test"]["examples"] > 0
    assert not (tmp_path / "run" / "model").exists()


def test_federate_cli_per_client_datasets_with_a_robust_aggregator_and_a_poisoned_client(tiny_bert_dir, tmp_path):
    clients = [write_table(tmp_path / f"c{i}.csv", make_sentences(60, seed=10 + i)) for i in range(3)]
    out = tmp_path / "fed"
    command = [sys.executable, "-m", "transferkit", "federate", "--model", str(tiny_bert_dir), "--lr", "1e-3",
               "--batch-size", "16", "--out", str(out), "--aggregator", "fedmedian", "--max-rounds", "1",
               "--personalise-epochs", "0", "--local-only", "false", "--poisoned-clients", "0", "--local-epochs", "0.5"]
    for i, path in enumerate(clients):
        command += ["--client", f"name=site{i},train={path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["aggregator"] == "fedmedian" and metrics["partitioner"] == "per-client datasets"
    assert set(metrics["per_client"]) == {"site0", "site1", "site2"}
    assert all(set(r) >= {"global"} and "local_only" not in r for r in metrics["per_client"].values())
    assert "global model test accuracy" in result.stdout
    # 60 rows less 10% validation and 10% test: 48 to train on, half of them per round: 2 steps of 16.
    assert "site0: 48 train (2 optimiser steps per round at batch 16), 6 val, 6 test" in result.stdout


# -- client-side differential privacy (Flower's LocalDpMod behind our mod) ---------------------------------------
def _dp_config(**dp):
    return FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"}, **dp}, source="test")


def _train_exchange(mod, received, update, message_type="train"):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    message = Message(RecordDict({"arrays": ArrayRecord(received), "config": ConfigRecord({})}), dst_node_id=1,
                      message_type=message_type)

    def client(msg, context):
        content = {"metrics": MetricRecord({"num-examples": 1})}
        if message_type == "train":
            content["arrays"] = ArrayRecord(update)
        return Message(RecordDict(content), reply_to=msg)

    return mod(message, None, client)


def test_the_privacy_accountant_composes_rounds_by_both_bounds():
    import math

    from transferkit.federated.privacy import compose_rounds

    sigma = math.sqrt(2 * math.log(1.25 / 1e-5)) / 2.0  # Flower's noise for epsilon 2, sensitivity 1
    one = compose_rounds(2.0, 1e-5, 1.0, sigma, 1)
    assert one["basic_composition"] == {"epsilon": 2.0, "delta": 1e-5}
    # By hand: rho = 1 / (2 sigma^2) = epsilon^2 / (4 ln(1.25e5)) = 4 / 46.94 = 0.0852;
    # epsilon = rho + 2 sqrt(rho ln 1e5) = 0.0852 + 2 * 0.9904 = 2.066 (for one round, looser than 2).
    assert one["zcdp"]["rho"] == pytest.approx(0.08521, abs=1e-4)
    assert one["zcdp"]["epsilon"] == pytest.approx(2.0661, abs=1e-3)
    many = compose_rounds(2.0, 1e-5, 1.0, sigma, 100)
    assert many["basic_composition"]["epsilon"] == 200.0 and many["zcdp"]["rho"] == pytest.approx(100 * one["zcdp"]["rho"])
    assert many["zcdp"]["epsilon"] < 40 < many["basic_composition"]["epsilon"]  # sqrt(k) beats k


def test_local_dp_clips_the_update_and_adds_noise_only_to_training_replies():
    from transferkit.federated.apps import local_privacy_mod

    received = {"w": torch.zeros(100), "b": torch.zeros(3)}
    update = {"w": torch.full((100,), 1.0), "b": torch.full((3,), 1.0)}  # an update of norm sqrt(103)

    def sent(reply):
        arrays = reply.content["arrays"].to_torch_state_dict()
        return torch.cat([arrays["w"], arrays["b"]])

    # A huge budget: (almost) no noise, so the update is exactly clipped to the norm.
    clipped = sent(_train_exchange(local_privacy_mod(lambda c: _dp_config(dp_clipping_norm=2.0, dp_epsilon=1e9)),
                                   received, update))
    assert abs(float(clipped.norm()) - 2.0) < 1e-3
    assert torch.allclose(clipped / clipped.norm(), torch.ones(103) / 103 ** 0.5, atol=1e-4)  # direction kept
    noisy = sent(_train_exchange(local_privacy_mod(lambda c: _dp_config(dp_clipping_norm=2.0, dp_epsilon=1.0)),
                                 received, update))
    assert float((noisy - clipped).std()) > 1.0  # std = 2 * sqrt(2 ln(1.25e5)) / 1, about 9.7
    untouched = sent(_train_exchange(local_privacy_mod(lambda c: _dp_config()), received, update))
    assert torch.equal(untouched, torch.ones(103))
    evaluation = _train_exchange(local_privacy_mod(lambda c: _dp_config(dp_clipping_norm=2.0, dp_epsilon=1.0)),
                                 received, update, message_type="evaluate")
    assert not evaluation.has_error() and "arrays" not in evaluation.content


@pytest.mark.parametrize("dp, message", [
    ({"dp_epsilon": 1.0}, "dp_clipping_norm"),
    ({"dp_clipping_norm": 1.0}, "dp_epsilon"),
    ({"dp_clipping_norm": 1.0, "dp_epsilon": 1.0, "dp_delta": 2}, "dp_delta"),
])
def test_local_dp_settings_are_checked(dp, message):
    with pytest.raises(UserError, match=message):
        _dp_config(**dp)


def test_union_test_from_confusion_matrices_equals_scoring_the_pooled_predictions():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from transferkit.federated.run import union_test

    rng = np.random.default_rng(0)
    reports, all_true, all_pred = {}, [], []
    for client in range(3):
        true, pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
        pred[true == 3] = 3  # class 3 always right, class 2 never predicted by client 0
        if client == 0:
            pred[pred == 2] = 1
        reports[client] = {"global_confusion": confusion_matrix(true, pred, labels=range(4)).ravel().tolist()}
        all_true += true.tolist()
        all_pred += pred.tolist()
    scores = union_test(reports, ["a", "b", "c", "d"])
    assert scores["examples"] == 150
    assert scores["accuracy"] == accuracy_score(all_true, all_pred)
    assert abs(scores["macro_f1"] - f1_score(all_true, all_pred, average="macro")) < 1e-12


def test_a_failure_is_named_after_the_client_the_message_went_to_not_the_sender_of_the_error():
    """When a node is gone the SuperLink answers in its place, with its own node id (1) as the sender; the round's
    report must still name the client that dropped, and a client that never answered is named too."""
    from flwr.app import Error, Message, RecordDict

    from transferkit.federated.apps import _failures

    sent = []
    for node, message_id in ((7, "m7"), (8, "m8"), (9, "m9")):
        message = Message(RecordDict(), dst_node_id=node, message_type="train")
        message.metadata.__dict__["_message_id"] = message_id
        sent.append(message)
    ok = Message(RecordDict(), reply_to=sent[0])
    gone = Message(Error(code=3, reason="node unavailable"), reply_to=sent[1])
    gone.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink writes it
    failures = _failures(sent, [ok, gone], {7: "site0", 8: "site1", 9: "site2"}, 30)
    assert failures == {"site1": "node unavailable", "site2": "no reply within 30 s"}


def test_a_resumed_deployment_goes_on_without_a_missing_client_but_refuses_new_labels():
    """Round 1 needs every client (their labels make the head); a resumed run keeps the classes it started with,
    lets a client that dropped out stay away, and refuses one whose labels the head lacks."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from transferkit.federated.deployment import describe_clients

    config = FederatedConfig.from_dict({"model": "m", "clients": [{"name": f"site{i}", "train": f"{i}.csv"}
                                                                  for i in range(3)]}, source="t")

    class Grid:  # nodes 10 and 11 are clients 0 and 1; client 2 is gone
        def __init__(self, labels):
            self.labels = labels

        def send_and_receive(self, messages, timeout):
            return [Message(RecordDict({"metrics": MetricRecord({"client": node - 10}),
                                        "labels": ConfigRecord({"labels": json.dumps(self.labels[node - 10])})}),
                            reply_to=m) for m, node in zip(messages, (10, 11))]

    grid = Grid([["neg"], ["pos"]])
    with pytest.raises(UserError, match=r"no SuperNode is client \[2\]"):
        describe_clients(grid, [10, 11], config)
    classes, names = describe_clients(grid, [10, 11], config, known_classes=["neg", "pos"])
    assert classes == ["neg", "pos"] and sorted(names.values()) == ["site0", "site1"]
    with pytest.raises(UserError, match=r"labels the resumed run started without: \['meh'\]"):
        describe_clients(Grid([["neg"], ["meh"]]), [10, 11], config, known_classes=["neg", "pos"])


def test_a_client_that_failed_training_is_not_asked_to_evaluate_and_the_report_waits_for_its_training(tmp_path):
    """A server loop on a stand-in Flower grid: node 12 never answers. The round records it as dropped and does
    not send it an evaluation (that would wait out the timeout again); the final report waits
    ``report_timeout_s``; a resumed FedPer run says the clients' personal parts start afresh."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from transferkit.federated.apps import server_loop

    config = FederatedConfig.from_dict({"model": "m", "clients": [{"name": f"site{i}", "train": f"{i}.csv"}
                                                                  for i in range(3)],
                                        "max_rounds": 1, "round_timeout_s": 7, "personal": "head",
                                        "round_patience": None, "min_clients": 2}, source="t")
    initial = {"head.weight": torch.zeros(2, 3), "head.bias": torch.zeros(2)}

    class Grid:
        def __init__(self, silent=(2,)):
            self.sent, self.timeouts, self.silent = [], [], set(silent)

        def get_node_ids(self):
            return [10, 11, 12]

        def send_and_receive(self, messages, timeout):
            messages = list(messages)
            for number, m in enumerate(messages):  # as Flower's grids do when they push a message
                m.metadata.__dict__["_message_id"] = f"{len(self.sent) + number}"
            self.sent += [(m.metadata.message_type, m.metadata.dst_node_id) for m in messages]
            self.timeouts.append(timeout)
            replies = []
            for m in messages:
                client = m.metadata.dst_node_id - 10
                if client in self.silent:
                    continue
                if m.metadata.message_type == MessageType.TRAIN:
                    arrays = {k: v + client + 1 for k, v in m.content["arrays"].to_torch_state_dict().items()}
                    content = {"arrays": ArrayRecord(arrays),
                               "metrics": MetricRecord({"num-examples": 10, "client": client, "train_loss": 0.5})}
                elif m.metadata.message_type == MessageType.EVALUATE:
                    content = {"metrics": MetricRecord({"num-examples": 5, "client": client, "accuracy": 0.8, "loss": 0.4})}
                else:
                    content = {"metrics": MetricRecord({"client": client, "global": 0.8})}
                replies.append(Message(RecordDict(content), reply_to=m))
            return replies

    grid, progress = Grid(), RecordingProgress()
    results = server_loop(grid, config, ["neg", "pos"], initial, tmp_path / "run", False, progress,
                          {10: "site0", 11: "site1", 12: "site2"})
    (record,) = results["history"]
    assert record["clients_trained"] == 2 and set(record["failures"]) == {"site2"}
    assert "dropped: site2" in progress.lines[-1]
    evaluated = sorted(node for kind, node in grid.sent if kind == MessageType.EVALUATE)
    assert evaluated == [10, 11]  # not the client that let training time out
    assert grid.timeouts[-1] == config.report_timeout_s(1) > config.round_timeout_s
    assert sorted(results["clients"]) == [0, 1]

    config = dataclasses.replace(config, max_rounds=2)
    server_loop(Grid(), config, ["neg", "pos"], initial, tmp_path / "run", True, progress, {})
    assert "resuming after round 1; the clients' personal parts resume from the SuperNodes' state-dir, or start afresh " \
           "where a SuperNode has none" in progress.lines

    # Clients a round does not sample for training still evaluate: every round validates on the same clients.
    sampled = dataclasses.replace(config, max_rounds=1, fraction_train=0.5)
    grid = Grid(silent=())
    server_loop(grid, sampled, ["neg", "pos"], initial, tmp_path / "sampled", False, progress, {})
    assert sum(kind == MessageType.TRAIN for kind, _ in grid.sent) == 2
    assert sorted(node for kind, node in grid.sent if kind == MessageType.EVALUATE) == [10, 11, 12]


def test_the_server_averages_the_clients_updates_in_client_order_whatever_order_they_arrive_in(tmp_path):
    """Replies come back in the order the clients finish; a float32 weighted sum taken in that order differs in its
    last bits from run to run, and later rounds amplify it (a seeded image federation moved by 3.5 pts). The server
    sorts them by client first, so the same seed gives the same weights."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from transferkit.federated.apps import server_loop

    config = FederatedConfig.from_dict({"model": "m", "clients": [{"name": f"site{i}", "train": f"{i}.csv"}
                                                                  for i in range(4)],
                                        "max_rounds": 2, "round_patience": None}, source="t")
    initial = {"head.weight": torch.zeros(64, 64), "head.bias": torch.zeros(64)}

    class Grid:
        def __init__(self, order):
            self.order = order

        def get_node_ids(self):
            return [10, 11, 12, 13]

        def send_and_receive(self, messages, timeout):
            replies = []
            for m in messages:
                client = m.metadata.dst_node_id - 10
                if m.metadata.message_type == MessageType.TRAIN:
                    noise = torch.Generator().manual_seed(client)
                    arrays = {k: v + torch.randn(v.shape, generator=noise) * 10 ** client
                              for k, v in m.content["arrays"].to_torch_state_dict().items()}
                    content = {"arrays": ArrayRecord(arrays),
                               "metrics": MetricRecord({"num-examples": 10 + client, "client": client, "train_loss": 0.5})}
                elif m.metadata.message_type == MessageType.EVALUATE:
                    content = {"metrics": MetricRecord({"num-examples": 5, "client": client, "accuracy": 0.1 * client,
                                                        "loss": 0.4})}
                else:
                    content = {"metrics": MetricRecord({"client": client})}
                replies.append(Message(RecordDict(content), reply_to=m))
            return [replies[i] for i in self.order(len(replies))]

    arrived = {"in client order": lambda n: range(n), "reversed": lambda n: reversed(range(n)),
               "shuffled": lambda n: [2, 0, 3, 1][:n] if n == 4 else range(n)}
    runs = {name: server_loop(Grid(order), config, ["neg", "pos"], initial, tmp_path / name.replace(" ", "-"), False,
                              RecordingProgress(), {}) for name, order in arrived.items()}
    reference = runs["in client order"]
    assert reference["best_weights"]["head.weight"].abs().sum() > 0
    for name, run in runs.items():
        for key, value in reference["best_weights"].items():
            assert torch.equal(run["best_weights"][key], value), f"{name}: {key} differs"
        assert [h["val_accuracy"] for h in run["history"]] == [h["val_accuracy"] for h in reference["history"]]


def test_a_clients_state_file_per_round_restores_the_round_the_server_resumed_after(tmp_path):
    """After round N a client writes its personal part and kept moments; an empty state (a new Flower run) before
    round N+1 takes round N's file back, even when the client had already written a later round the server
    never checkpointed. Only the last two rounds stay on disk; a state that is not empty is left alone."""
    from flwr.app import RecordDict

    from transferkit.federated import client_state, optimizer_state, personal

    folder = tmp_path / "client-0"
    state = RecordDict()
    for round_number in (1, 2, 3):
        personal.keep(state, {"head.weight": torch.full((2, 3), float(round_number))})
        optimizer_state.keep(state, {0: {"step": torch.tensor(float(10 * round_number)), "exp_avg": torch.ones(3)}})
        client_state.save(folder, round_number, state)
    assert sorted(p.name for p in folder.iterdir()) == ["round-2.safetensors", "round-3.safetensors"]

    fresh = RecordDict()
    assert client_state.restore(folder, 3, fresh) == 2  # the server resumed after round 2: round 3 runs again
    weights, rounds = personal.kept(fresh)
    assert rounds == 2 and weights["head.weight"].eq(2).all()
    assert optimizer_state.kept(fresh)[0]["step"].item() == 20
    latest = RecordDict()
    assert client_state.restore(folder, None, latest) == 3 and personal.kept(latest)[1] == 3
    assert client_state.restore(folder, 3, latest) is None and personal.kept(latest)[1] == 3  # not empty: kept
    assert client_state.restore(folder, 2, RecordDict()) is None  # no file before round 2 any more
    assert client_state.restore(tmp_path / "none", 5, RecordDict()) is None


def test_a_supernode_keeps_its_client_state_only_in_the_state_dir_its_node_config_names(tmp_path):
    from types import SimpleNamespace

    from transferkit.federated.deployment import _client_state_folder

    config = FederatedConfig.from_dict({"model": "m", "data": {"train": "a.csv"}, "out": "/srv/runs/fed"}, source="t")
    named = SimpleNamespace(node_config={"partition-id": 1, "state-dir": str(tmp_path)})
    assert _client_state_folder(config, 1, named) == tmp_path / "fed-client-1"
    assert _client_state_folder(config, 1, SimpleNamespace(node_config={"partition-id": 1})) is None


def test_loading_a_fedper_run_says_why_it_has_no_model(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "federated", "personal": {"part": "head"}}))
    with pytest.raises(UserError, match=r"personal head on each client \(personal: head\).*without 'personal'"):
        transferkit.load_run(tmp_path)
    (tmp_path / "texts.csv").write_text("text\ngood\n")
    assert main(["predict", str(tmp_path), "--input", str(tmp_path / "texts.csv"), "--output", str(tmp_path / "p.csv")]) == 2
    assert "personal head on each client" in capsys.readouterr().err


def test_flowers_run_simulation_deprecation_advice_is_hidden_and_nothing_else():
    import logging

    from transferkit.federated.run import _hide_run_simulation_deprecation

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("flwr", logging.WARNING, __file__, 1, "DEPRECATED FEATURE: %s", (message,), None)

    assert not _hide_run_simulation_deprecation(record("The `run_simulation` function is deprecated and will be removed"))
    assert _hide_run_simulation_deprecation(record("The `start_client` function is deprecated"))
    assert _hide_run_simulation_deprecation(logging.LogRecord("flwr", logging.INFO, __file__, 1, "aggregate_train: "
                                                              "Received 2 results and 0 failures", None, None))
