"""The flow of one federated run: check every client's data, build the starting model, run the Flower
apps in Flower's Simulation Engine (Ray), then test the global model and write the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..data.dataset import sort_classes
from ..engine.checkpoint import atomic_write_text
from ..errors import UserError
from ..finetune import check_run_dir
from ..saved_model import COLUMN_KEYS, save_classifier
from .apps import state_path
from .config import FederatedConfig
from .local import client_examples, load_exchanged, local_evaluate, local_model, read_dataset
from .plots import plot_clients, plot_rounds


def _check_clients(config: FederatedConfig) -> tuple[list[dict], list[str]]:
    """Every client's split, and the global classes; every data mistake surfaces before round 1."""
    clients = client_examples(config)
    names = config.client_names
    modalities = {c["train"].modality for c in clients}
    if len(modalities) > 1:
        raise UserError(f"the clients hold different kinds of data ({', '.join(sorted(modalities))}): one model serves one modality")
    classes = sort_classes([label for c in clients for label in c["train"].labels])
    if len(classes) < 2:
        raise UserError(f"all clients together hold one class ('{classes[0]}'): a classifier needs at least two")
    for name, client in zip(names, clients):
        for split in ("val", "test"):
            unseen = sorted(set(client[split].labels) - set(classes))
            if unseen:
                raise UserError(f"client '{name}': {split} labels {unseen[:5]} occur in no client's training data: "
                                f"the global head cannot predict them; fix the labels or add training examples")
    return clients, classes


def _hide_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    """Flower asks callers of ``run_simulation`` to use ``flwr run`` instead; a ``transferkit federate`` user called
    neither (``flwr run`` needs a Flower app project, which the Python API does without), so the advice would only
    confuse. Every other Flower message is shown."""
    return "`run_simulation` function is deprecated" not in record.getMessage()


def _simulate(config: FederatedConfig, classes: list[str], initial: dict, run_dir: Path, resume: bool) -> dict[str, Any]:
    # Flower's telemetry is off in our runs, set before flwr is imported (and in each client's process).
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from .apps import make_client_app, make_server_app

    results: dict[str, Any] = {}
    # Client processes inherit this environment; their own output stays in Ray's logs (log_to_driver off).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    backend = {"client_resources": {"num_cpus": config.client_cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(os.cpu_count() or 1, int(np.ceil(config.client_cpus))),
                             "include_dashboard": False, "logging_level": "error", "log_to_driver": False}}
    flower_log = logging.getLogger("flwr")
    flower_log.addFilter(_hide_run_simulation_deprecation)
    try:
        with tqdm(total=config.max_rounds, desc="federated rounds", unit="round", dynamic_ncols=True) as progress, \
                warnings.catch_warnings():
            # Ray's tip about a future default for actors without GPUs (it will stop hiding the GPUs from them):
            # the clients ask for no GPU and keep today's behaviour, so the tip is noise to a transferkit user.
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
            run_simulation(make_server_app(config, classes, initial, run_dir, resume, results, progress),
                           make_client_app(config, classes), num_supernodes=config.num_clients, backend_name="ray",
                           backend_config=backend)
    finally:
        flower_log.removeFilter(_hide_run_simulation_deprecation)
    if "history" not in results:
        if state_path(run_dir).is_file():
            raise UserError(f"the federated run stopped before it finished (see the Flower log above); the rounds "
                            f"completed so far are in {run_dir / 'rounds'}: continue with --resume --out {run_dir}")
        raise UserError("the federated run stopped before its first round finished (see the Flower log above): "
                        "fix the cause and run it again")
    return results


def federate(config: FederatedConfig | str | Path, *, resume: bool = False, overwrite: bool = False,
             superlink: str | None = None, insecure: bool = False, root_certificates: str | None = None) -> dict[str, Any]:
    """Fine-tune one model across clients that keep their data; returns the metrics also written to
    ``metrics.json``. By default Flower's Simulation Engine runs the clients here; with ``superlink``
    (host:port of a SuperLink's Control API) the run goes to Flower's Deployment Engine, whose SuperNodes
    are the clients (``federated/deployment.py``).

    Example::

        transferkit.federate("fed.yaml")
        transferkit.federate("fed.yaml", superlink="127.0.0.1:9093", insecure=True)
    """
    if isinstance(config, (str, Path)):
        config = FederatedConfig.load(config)
    run_dir = Path(config.out)
    if not resume:
        check_run_dir(run_dir, False, overwrite)
    elif not state_path(run_dir).is_file() or (run_dir / "metrics.json").is_file():
        raise UserError(f"{run_dir} has no unfinished federated run to resume (no rounds/state.json, or it finished)")
    if superlink is not None:
        return _deploy(config, run_dir, superlink, insecure, root_certificates, resume, overwrite)
    clients, classes = _check_clients(config)
    local = local_model(config, classes)
    load_exchanged(local, None)
    initial = {k: v.detach().clone() for k, v in local.model.state_dict().items() if k in local.exchanged}
    if not resume:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    recipe = config.run_config
    for name, client in zip(config.client_names, clients):
        # Steps, not epochs, decide how far a round moves the model: a client with few of them barely moves
        # the average (a smaller batch_size gives it more; docs/federated.md).
        per_round = math.ceil(len(client["train"]) / config.round_parts)
        steps = math.ceil(per_round / recipe.batch_size / recipe.accumulate) * config.epochs_per_round
        print(f"{name}: {len(client['train'])} train ({steps} optimiser steps per round at batch {recipe.batch_size}), "
              f"{len(client['val'])} val, {len(client['test'])} test, classes {sorted(set(client['train'].labels))[:10]}")
    started = time.time()
    results = _simulate(config, classes, initial, run_dir, resume)
    seconds = time.time() - started

    load_exchanged(local, results["best_weights"])
    # With personal parts, the shared weights alone are no client's model: each client scores its own test split.
    shared_test = read_dataset(config.run_config)[1] if config.data is not None and config.personal == "none" else None
    if shared_test is not None:  # the dataset's own test split
        test = local_evaluate(local, shared_test, classes) | {"examples": len(shared_test)}
        test = {k: test[k] for k in ("accuracy", "macro_f1", "examples")}
    else:  # the union of the clients' test splits, which the clients already scored in their reports
        test = union_test(results["clients"], classes)
    return write_federated_run(config, local, classes, results, initial, test, seconds, run_dir)


def _deploy(config: FederatedConfig, run_dir: Path, superlink: str, insecure: bool, root_certificates: str | None,
            resume: bool, overwrite: bool) -> dict[str, Any]:
    """Submit to a SuperLink; the clients read their own data, so nothing here reads any."""
    from .deployment import check_superlink, submit

    check_superlink(superlink, insecure, root_certificates)  # before the run directory exists
    if not resume:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    submit(config, run_dir, superlink, insecure=insecure, root_certificates=root_certificates, resume=resume)
    return json.loads((run_dir / "metrics.json").read_text())


def union_test(reports: dict[int, dict], classes: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 of the global model on the union of the clients' test splits, from the confusion
    matrices the clients report (a deployed server never sees their examples)."""
    from ..evaluation.metrics import summary_metrics

    size = len(classes)
    confusion = np.zeros((size, size), dtype=np.int64)
    for report in reports.values():
        confusion += np.asarray(report["global_confusion"], dtype=np.int64).reshape(size, size)
    # The (true, predicted) pairs the matrix counts, for scikit-learn's own accuracy and macro-F1.
    true, predicted = np.divmod(np.repeat(np.arange(size * size), confusion.ravel()), size)
    return {**summary_metrics(true, predicted), "examples": int(confusion.sum())}


def write_federated_run(config: FederatedConfig, local, classes: list[str], results: dict[str, Any],
                        initial: dict, test: dict[str, Any], seconds: float, run_dir: Path) -> dict[str, Any]:
    """The run directory of a finished federation (simulated or deployed): metrics, report, plots, global model."""
    full_bytes = sum(v.numel() * v.element_size() for v in local.model.state_dict().values() if v.is_floating_point())
    exchanged_bytes = sum(v.numel() * v.element_size() for v in initial.values())
    history = results["history"]
    per_client = {}
    for index, report in results["clients"].items():
        per_client[config.client_names[index]] = {k: v for k, v in report.items() if k != "global_confusion"}
    metrics: dict[str, Any] = {
        "kind": "federated", "model": config.run_config.model, "strategy": config.run_config.strategy,
        "aggregator": config.aggregator, "round_schedule": config.round_schedule, "clients": config.num_clients,
        "partitioner": config.partitioner if config.data is not None else "per-client datasets",
        "engine": results.get("engine", "simulation"),
        "rounds": len(history), "best_round": results["best_round"], "seconds": seconds,
        "test": test,
        "bytes": {"full_model": full_bytes, "exchanged_per_client_per_direction": exchanged_bytes,
                  "exchanged_fraction": exchanged_bytes / full_bytes,
                  "per_round": [h["bytes_down"] + h["bytes_up"] for h in history],
                  "total": sum(h["bytes_down"] + h["bytes_up"] for h in history)},
        "per_client": per_client, "history": history,
        # Clients without a final report (they dropped out): the global test and the means leave them out.
        "dropped_clients": [name for i, name in enumerate(config.client_names) if i not in results["clients"]],
    }
    if config.dp_clipping_norm is not None:
        sensitivity = config.dp_clipping_norm if config.dp_sensitivity is None else config.dp_sensitivity
        metrics["privacy"] = {"mechanism": "local differential privacy (Flower LocalDpMod): each training update "
                                           "clipped, then Gaussian noise added, on the client",
                              "clipping_norm": config.dp_clipping_norm, "epsilon_per_round": config.dp_epsilon,
                              "delta": config.dp_delta, "sensitivity": sensitivity,
                              "noise_std": sensitivity * float(np.sqrt(2 * np.log(1.25 / config.dp_delta))) / config.dp_epsilon}
        if sensitivity > 0:
            from .privacy import compose_rounds

            # Counted as if every client trained in every round: an upper bound when fraction_train < 1 or a
            # client dropped out.
            metrics["privacy"]["total"] = compose_rounds(config.dp_epsilon, config.dp_delta, sensitivity,
                                                         metrics["privacy"]["noise_std"], len(history))
    for key in ("global", "personalised", "local_only"):
        values = [r[key] for r in per_client.values() if key in r]
        if values:
            metrics[f"mean_client_{key}"] = float(np.mean(values))
    if config.personal == "none":
        # The clients' column names, where they all agree: what evaluate/predict then read by default.
        recipes = [config.client_run_config(i) for i in range(config.num_clients)]
        columns = {key: values.pop() for key in COLUMN_KEYS
                   if len(values := {getattr(r, key) for r in recipes}) == 1}
        save_classifier(local.model.cpu(), classes, run_dir / "model", columns=columns)
    else:
        metrics["personal"] = {"part": config.personal, "kept_keys": len(local.personal),
                               "saved_model": "none: each client's model is the shared part plus its own personal part, "
                                              "which never leaves the client"}
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    metrics["plots"] = [str(p.relative_to(run_dir)) for p in (plot_rounds(history, config.client_names, plots / "rounds.png"),
                                                               plot_clients(per_client, plots / "clients.png"))]
    (run_dir / "report.md").write_text(federated_report(metrics), encoding="utf-8")
    # A finished run cannot resume: its round checkpoints and the simulated clients' state files go.
    shutil.rmtree(run_dir / "rounds", ignore_errors=True)
    shutil.rmtree(run_dir / "clients", ignore_errors=True)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def federated_table(metrics: dict[str, Any]) -> str:
    rows = [("client", "local-only", "global", "personalised")]
    for name, report in metrics["per_client"].items():
        rows.append((name, *(f"{report[k]:.4f}" if k in report else "-" for k in ("local_only", "global", "personalised"))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    b = metrics["bytes"]
    lines += ["", f"global model test accuracy {metrics['test']['accuracy']:.4f} (best of {metrics['rounds']} rounds: "
              f"round {metrics['best_round']}); {metrics['aggregator']}, {metrics['clients']} clients"
              + (f" ({', '.join(metrics['dropped_clients'])} dropped out)" if metrics.get("dropped_clients") else "")
              + (f"; client LR {metrics['round_schedule']} over rounds" if metrics.get("round_schedule", "constant") != "constant" else ""),
              f"sent per client per direction {b['exchanged_per_client_per_direction'] / 1e6:.2f} MB = "
              f"{100 * b['exchanged_fraction']:.2f}% of the model; {b['total'] / 1e6:.1f} MB in all"]
    if metrics.get("personal"):
        lines.append(f"personal part '{metrics['personal']['part']}' ({metrics['personal']['kept_keys']} tensors) kept on "
                     f"each client: 'global' is the shared part with the client's own part; no global model is saved")
    total = metrics.get("privacy", {}).get("total")
    if total:
        zcdp, basic = total["zcdp"], total["basic_composition"]
        lines.append(f"local DP over {total['rounds']} rounds: epsilon {zcdp['epsilon']:.3g} at delta {zcdp['delta']:g} "
                     f"(zCDP), {basic['epsilon']:.3g} at delta {basic['delta']:g} (basic composition)")
    return "\n".join(lines)


def federated_report(metrics: dict[str, Any]) -> str:
    lines = [f"# Federated run: {metrics['model']}, {metrics['strategy']}, {metrics['aggregator']}, "
             f"{metrics['clients']} clients ({metrics['partitioner']})", "", "```", federated_table(metrics), "```", "",
             "Per client, on its own held-out test split: local-only (trained on its data alone, same epochs), "
             "global (the federated model), personalised (the global model fine-tuned on its data).", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in metrics.get("plots", [])]
    return "\n".join(lines) + "\n"
