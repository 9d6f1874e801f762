"""The Flower apps: a ClientApp whose handlers run transferkit's local fine-tuning, and a ServerApp whose
round loop uses a Flower strategy (flwr.serverapp.strategy) to sample clients and aggregate.

Rounds: train (clients fine-tune from the global weights and send back what trains), aggregate,
evaluate (clients score the new global weights on their validation split; the weighted mean decides
convergence), checkpoint. After the last round a query message asks every client for its report:
the global model, the global model fine-tuned on its data (personalised), and a model trained on its
data alone (local-only), all on its held-out test split.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..engine.checkpoint import atomic_write_text, replace_with, save_weights
from ..errors import UserError
from .aggregators import (SERVER_OPTIMISERS, average_statistics, create_aggregator, minimum_clients,
                          restore_server_state, server_state)
from .config import FederatedConfig
from . import client_state, optimizer_state, personal
from .local import (client_examples, exchanged_state, load_exchanged, load_personal, local_evaluate, local_model,
                    local_train, personal_state, round_share, training_seed)

NODE_WAIT_S = 300.0  # how long round 1 waits for every client to connect
PERSONALISE_PHASE, LOCAL_ONLY_PHASE = 100_000, 100_001  # training_seed phases past any round number


def _client_index(context) -> int:
    return int(context.node_config["partition-id"])


def classes_record(classes: list[str]) -> dict[str, str]:
    """The global classes travel with every message (a deployed client learns them from the server)."""
    return {"classes": json.dumps(classes)}


def local_privacy_mod(config_of: Callable[[Any], FederatedConfig]):
    """A client mod: when the federation asks for local differential privacy, Flower's LocalDpMod clips each
    training update's distance from the received weights to ``dp_clipping_norm`` and adds Gaussian noise of
    std ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon``; other messages pass untouched (LocalDpMod
    itself expects weights in the reply, which evaluate and query replies do not carry)."""
    from flwr.app import MessageType
    from flwr.clientapp.mod import LocalDpMod

    def mod(message, context, call_next):
        config = config_of(context)
        if config.dp_clipping_norm is None or message.metadata.message_type != MessageType.TRAIN:
            return call_next(message, context)
        sensitivity = config.dp_clipping_norm if config.dp_sensitivity is None else config.dp_sensitivity
        return LocalDpMod(config.dp_clipping_norm, sensitivity, config.dp_epsilon, config.dp_delta)(message, context, call_next)

    return mod


def make_client_app(config: FederatedConfig, classes: list[str]):
    """The ClientApp of a simulation: one config and class list for every client in this process."""
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=[local_privacy_mod(lambda context: config)])

    def setup(message, context):
        index = _client_index(context)
        return config, classes, index, client_examples(config)[index]

    # The simulated clients share this machine, so each keeps its state in the run directory.
    add_client_handlers(app, setup, lambda config, index, context: Path(config.out) / "clients" / f"client-{index}")
    return app


def add_client_handlers(app, setup: Callable, state_folder: Callable[[FederatedConfig, int, Any], Path | None]) -> None:
    """Train, evaluate and query handlers; ``setup(message, context)`` gives (config, classes, client index,
    the client's train/val/test examples), from the process's own objects (simulation) or from the run and
    node configuration (deployment). ``state_folder(config, index, context)``: where the client keeps its
    state between rounds on its own disk, for a resumed run (None: in memory only; see ``client_state``)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    def prepared(message, context):
        config, classes, index, split = setup(message, context)
        # Each client process uses the CPUs it was given (Ray's reservation), not every core of the machine.
        torch.set_num_threads(max(1, int(config.client_cpus)))
        local = local_model(config, classes)
        arrays = message.content["arrays"].to_torch_state_dict() if "arrays" in message.content else None
        load_exchanged(local, arrays)
        folder = state_folder(config, index, context)
        if folder is not None:  # a resumed run's first message: the state after the round the server resumed after
            settings = message.content["config"] if "config" in message.content else {}
            client_state.restore(folder, int(settings["server-round"]) if "server-round" in settings else None,
                                 context.state)
        load_personal(local, personal.kept(context.state)[0])
        return config, classes, index, local, split

    @app.train()
    def train(message: Message, context) -> Message:
        config, classes, index, local, split = prepared(message, context)
        received = exchanged_state(local)
        round_number = int(message.content["config"].get("server-round", 0))
        mu = float(message.content["config"].get("proximal-mu", 0.0))
        # local_epochs 1/k: this round trains on one k-th of the client's data, the next k-1 rounds on the rest.
        split = round_share(split, config.round_parts, round_number, local.run_config.seed, index)
        kept_moments = optimizer_state.kept(context.state) if config.client_optimizer_state == "keep" else None
        result = local_train(local, split, classes, config.epochs_per_round, mu, description=f"client {index} round {round_number}",
                             seed=training_seed(local.run_config.seed, index, round_number), optimizer_state=kept_moments,
                             lr_factor=config.round_lr_factor(round_number))
        if config.client_optimizer_state == "keep":
            optimizer_state.keep(context.state, result["optimizer_state"])
        update = exchanged_state(local)
        if local.personal:
            personal.keep(context.state, personal_state(local))
        folder = state_folder(config, index, context)
        if folder is not None:
            client_state.save(folder, round_number, context.state)
        if index in config.poisoned_clients:  # attack simulation: a scaled (e.g. sign-flipped) update
            update = {k: received[k] + config.poison_scale * (update[k] - received[k]) for k in update}
        # In the order the server sent them: Flower's mods (e.g. local DP) pair the reply's arrays with the message's.
        update = {k: update[k] for k in message.content["arrays"].keys()}
        metrics = MetricRecord({"num-examples": len(split["train"]), "client": index, "train_loss": result["train_loss"]})
        return Message(RecordDict({"arrays": ArrayRecord(update), "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context) -> Message:
        config, classes, index, local, split = prepared(message, context)
        scores = local_evaluate(local, split["val"], classes)
        metrics = MetricRecord({"num-examples": len(split["val"]), "client": index, "accuracy": scores["accuracy"],
                                "loss": scores["loss"]})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    @app.query()
    def report(message: Message, context) -> Message:
        settings = message.content["config"]
        if settings.get("kind") == "describe":
            # Before round 1 a deployed server asks each client which labels it holds (never the examples).
            config, _, index, split = setup(message, context)
            labels = sorted({label for part in split.values() for label in part.labels})
            metrics = MetricRecord({"client": index, "train_examples": len(split["train"])})
            return Message(RecordDict({"metrics": metrics, "labels": ConfigRecord({"labels": json.dumps(labels)})}),
                           reply_to=message)
        config, classes, index, local, split = prepared(message, context)
        global_scores = local_evaluate(local, split["test"], classes, confusion=True)
        scores = {"client": index, "train_examples": len(split["train"]), "test_examples": len(split["test"]),
                  "global": global_scores["accuracy"], "personal_rounds": personal.kept_rounds(context.state),
                  # Rows: true class; summed over clients, the union test set's accuracy and macro-F1 follow exactly.
                  "global_confusion": [int(v) for row in global_scores["confusion"] for v in row]}
        # With a decay across rounds, the report's own fine-tunes decay the same way over their epochs: a
        # federation whose LR ended near zero is not then trained a whole epoch at its peak LR.
        decay = None if config.round_schedule == "constant" else config.round_schedule
        if int(settings["personalise-epochs"]) > 0:
            # Fine-tune the global model on this client's data at each LR factor; keep the one whose validation
            # accuracy is best, and only if it does not drop below the global model's (model selection on the
            # client's validation split, never its test split; a tie between factors goes to the first).
            start = copy.deepcopy(local.model.state_dict())
            best = local_evaluate(local, split["val"], classes)["accuracy"]
            scores["personalised"], scores["personalisation_kept"] = scores["global"], 0
            for factor in config.personalise_lr_factors:
                local.model.load_state_dict(start)
                local_train(local, split, classes, int(settings["personalise-epochs"]), lr_factor=factor,
                            description=f"client {index} personalise", schedule=decay, adjust_logits=False,
                            seed=training_seed(local.run_config.seed, index, PERSONALISE_PHASE))
                val = local_evaluate(local, split["val"], classes)["accuracy"]
                if val > best or (val == best and not scores["personalisation_kept"]):
                    best = val
                    scores["personalised"] = local_evaluate(local, split["test"], classes)["accuracy"]
                    scores["personalisation_kept"], scores["personalisation_lr_factor"] = 1, factor
        if int(settings["local-only-epochs"]) > 0:
            load_exchanged(local, None)  # from the pretrained weights, its own data only
            # Its LR decays over its epochs as the federation's did over its rounds (if it did).
            local_train(local, split, classes, int(settings["local-only-epochs"]), description=f"client {index} local-only",
                        seed=training_seed(local.run_config.seed, index, LOCAL_ONLY_PHASE), schedule=decay,
                        adjust_logits=False)
            scores["local_only"] = local_evaluate(local, split["test"], classes)["accuracy"]
        return Message(RecordDict({"metrics": MetricRecord(scores)}), reply_to=message)


def state_path(run_dir: Path) -> Path:
    """``RUN/rounds/state.json``: its presence means a federation has rounds on record (resumable until it ends)."""
    return run_dir / "rounds" / "state.json"


class RoundCheckpoint:
    """``RUN/rounds/``: each round's global weights (``round-N.safetensors``) and server optimiser state
    (``server-N.safetensors``), then ``state.json`` (history, best round, classes), so an interrupted federation
    resumes at the next round. The files are named by round and ``state.json`` is written last, so a crash
    between the writes leaves ``state.json`` naming the previous round's files, which are still there: only the
    latest and the best round are kept, and older ones are removed once the new round is on record."""

    def __init__(self, run_dir: Path):
        self.folder = run_dir / "rounds"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_path = state_path(run_dir)

    def save(self, weights: dict[str, torch.Tensor], state: dict, server: dict[str, np.ndarray] | None = None) -> None:
        from safetensors.numpy import save_file

        number = len(state["history"])
        holder = torch.nn.Module()
        for name, tensor in weights.items():  # a module whose state dict is exactly the global weights
            holder.register_buffer(name.replace(".", "__"), tensor.contiguous())
        save_weights(holder, self.folder / f"round-{number}.safetensors")
        if server:
            temporary = self.folder / f"server-{number}.safetensors.tmp"
            save_file(server, str(temporary))
            replace_with(temporary, self.folder / f"server-{number}.safetensors")
        atomic_write_text(self.state_path, json.dumps(state))  # the round is on record from here
        keep = {f"round-{number}.safetensors", f"server-{number}.safetensors", f"round-{state['best_round']}.safetensors"}
        for path in self.folder.glob("*-*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def state(self) -> dict | None:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else None

    def load_server_state(self, number: int) -> dict[str, np.ndarray]:
        """The server optimiser's state saved with round ``number`` (empty when the aggregator keeps none)."""
        from safetensors.numpy import load_file

        path = self.folder / f"server-{number}.safetensors"
        return load_file(str(path)) if path.is_file() else {}

    def load(self, which: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The global weights of the ``latest`` or the ``best`` round on record, and the state."""
        from safetensors.torch import load_file

        state = self.state()
        if state is None or not state["history"]:
            return None
        number = len(state["history"]) if which == "latest" else state["best_round"]
        path = self.folder / f"round-{number}.safetensors"
        if not path.is_file():
            raise UserError(f"{path} is missing although {self.state_path} records round {number}: the round files "
                            f"were moved or deleted; restore them, or start the run again")
        weights = {name.replace("__", "."): tensor for name, tensor in load_file(str(path)).items()}
        return weights, state


def _bytes(record) -> int:
    return int(record.count_bytes())


def _failures(sent: list, replies: list, names: dict[int, str], timeout: float) -> dict[str, str]:
    """Who failed this round and why, by client name. A reply is matched to its message, not to its sender: when
    a node is gone, the SuperLink answers in its place, with its own node id as the sender."""
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}

    def name(node: int) -> str:
        return names.get(node, f"node {node}")

    failures = {name(destination.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)): r.error.reason
                for r in replies if r.has_error()}
    answered = {r.metadata.reply_to_message_id for r in replies}
    failures.update({name(node): f"no reply within {timeout:g} s"
                     for message_id, node in destination.items() if message_id not in answered})
    return failures


def _reply_client(reply) -> int:
    return int(reply.content["metrics"]["client"])


def wait_for_nodes(grid, count: int, timeout: float) -> list[int]:
    """The connected nodes, once ``count`` of them are there (every client, before round 1: later rounds go on
    with fewer when a client drops out)."""
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.time() > deadline:
            raise UserError(f"{len(nodes)} of {count} clients connected within {timeout:.0f} s: on the Deployment "
                            f"Engine, start one flower-supernode per client (--node-config 'partition-id=K')")
        time.sleep(1.0)


def server_loop(grid, config: FederatedConfig, classes: list[str], initial: dict[str, torch.Tensor], run_dir: Path,
                resume: bool, progress, node_names: dict[int, str] | None = None,
                clients_keep_state: bool = False) -> dict[str, Any]:
    """Rounds until convergence (no gain of ``min_delta`` in the mean client validation accuracy for
    ``round_patience`` rounds) or ``max_rounds``; then the clients' reports."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    strategy = create_aggregator(config, config.num_clients)
    checkpoint = RoundCheckpoint(run_dir)
    # The classes are saved with the rounds: a resumed run must not depend on every client being back.
    state = {"history": [], "best_round": None, "best_accuracy": None, "bad_rounds": 0, "classes": classes}
    weights = initial
    saved = checkpoint.load("latest") if resume else None
    # Round 1 waits for every client; a resumed run, like any later round, goes on with those connected.
    wait_for_nodes(grid, config.num_clients if saved is None else minimum_clients(config, config.num_clients),
                   NODE_WAIT_S)
    if saved is not None:
        # In the initial weights' order (the state dict's), not the file's: Flower's server optimisers pair the
        # global arrays with the clients' replies by position.
        if set(saved[0]) != set(initial):
            raise UserError(f"{checkpoint.folder} holds other weights than this config's model exchanges: resume with "
                            f"the config the run started with ({run_dir / 'config.yaml'})")
        weights, state = {name: saved[0][name] for name in initial}, saved[1]
        restore_server_state(strategy, checkpoint.load_server_state(len(state["history"])), list(weights))
        kept = [what for what, on in (("personal parts", config.personal != "none"),
                                      ("optimiser states", config.client_optimizer_state == "keep")) if on]
        # They live in the clients' Flower state, which a new run starts empty; clients that write it to their
        # disk (client_state: always in a simulation, with a state-dir on a SuperNode) take it back.
        where = ("from their state files" if clients_keep_state else
                 "from the SuperNodes' state-dir, or start afresh where a SuperNode has none")
        progress.write(f"resuming after round {len(state['history'])}"
                       + (f"; the clients' {' and '.join(kept)} resume {where}" if kept else ""))
    arrays = ArrayRecord(weights)
    start = len(state["history"]) + 1
    for round_number in range(start, config.max_rounds + 1):
        if config.round_patience is not None and state["bad_rounds"] >= config.round_patience:
            break
        started = time.time()
        messages = list(strategy.configure_train(round_number, arrays, ConfigRecord(classes_record(classes)), grid))
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout_s))
        # Replies arrive in the order the clients finish, which varies from run to run; a weighted average summed
        # in that order differs in its last bits, and training amplifies that over the rounds. In client order
        # the same seed gives the same run.
        answered = sorted((r for r in replies if not r.has_error()), key=_reply_client)
        failures = _failures(messages, replies, node_names or {}, config.round_timeout_s)
        bytes_down = _bytes(arrays) * len(messages)
        bytes_up = sum(_bytes(r.content["arrays"]) for r in answered)
        aggregated, _ = strategy.aggregate_train(round_number, answered)
        if aggregated is not None:
            arrays = average_statistics(aggregated, answered) if config.aggregator in SERVER_OPTIMISERS else aggregated
        # A client that failed this round's training is not asked to evaluate: one that let training time out
        # would most likely make the round wait out the timeout a second time. (Clients not sampled for
        # training still evaluate, so every round's validation covers the same clients.)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        failed = set(sent_to.values()) - {sent_to.get(r.metadata.reply_to_message_id) for r in answered}
        evaluations = sorted((r for r in grid.send_and_receive(
            [m for m in strategy.configure_evaluate(round_number, arrays, ConfigRecord(classes_record(classes)), grid)
             if m.metadata.dst_node_id not in failed],
            timeout=config.round_timeout_s)
            if not r.has_error()), key=_reply_client)
        per_client = {int(r.content["metrics"]["client"]): float(r.content["metrics"]["accuracy"]) for r in evaluations}
        examples = {int(r.content["metrics"]["client"]): int(r.content["metrics"]["num-examples"]) for r in evaluations}
        total = sum(examples.values()) or 1
        accuracy = sum(per_client[c] * examples[c] / total for c in per_client)
        loss = sum(float(r.content["metrics"]["loss"]) * int(r.content["metrics"]["num-examples"]) / total for r in evaluations)
        improved = state["best_accuracy"] is None or accuracy > state["best_accuracy"] + config.min_delta
        if improved:
            state.update(best_round=round_number, best_accuracy=accuracy, bad_rounds=0)
        else:
            state["bad_rounds"] += 1
        lr_factor = config.round_lr_factor(round_number)
        record = {"round": round_number, "val_accuracy": accuracy, "val_loss": loss, "clients_sent": len(messages),
                  "clients_trained": len(answered), "failures": failures, "bytes_down": bytes_down, "bytes_up": bytes_up,
                  "client_val_accuracy": {str(c): a for c, a in sorted(per_client.items())}, "seconds": time.time() - started,
                  "client_lr_factor": lr_factor}
        state["history"].append(record)
        checkpoint.save(arrays.to_torch_state_dict(), state, server_state(strategy, list(arrays.keys())))
        progress.update(1)
        progress.set_postfix(val_accuracy=f"{accuracy:.4f}", clients=f"{len(answered)}/{len(messages)}")
        progress.write(f"round {round_number}/{config.max_rounds}: {len(answered)}/{len(messages)} clients trained, "
                       f"mean client val accuracy {accuracy:.4f}{' (best)' if improved else ''}"
                       + (f"; client LR x{lr_factor:.3g}" if config.round_schedule != "constant" else "")
                       + (f"; dropped: {', '.join(f'{n} ({why})' for n, why in failures.items())}" if failures else ""))
    best, _ = checkpoint.load("best")
    # The clients' reports on the best round's global weights.
    best_arrays = ArrayRecord(best)
    rounds_done = len(state["history"])
    settings = ConfigRecord({"personalise-epochs": config.personalise_epochs, **classes_record(classes),
                             "local-only-epochs": config.local_only_epochs(rounds_done)})
    queries = [Message(RecordDict({"arrays": best_arrays, "config": settings}), dst_node_id=node,
                       message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    reports = {}
    for reply in grid.send_and_receive(queries, timeout=config.report_timeout_s(rounds_done)):
        if not reply.has_error():
            metrics = dict(reply.content["metrics"])
            reports[int(metrics.pop("client"))] = metrics
    return {"history": state["history"], "best_round": state["best_round"], "best_weights": best,
            "clients": dict(sorted(reports.items()))}


def make_server_app(config: FederatedConfig, classes: list[str], initial: dict[str, torch.Tensor], run_dir: Path,
                    resume: bool, results: dict, progress):
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        results.update(server_loop(grid, config, classes, initial, run_dir, resume, progress, clients_keep_state=True))

    return app
