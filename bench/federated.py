"""Federated vs centralised fine-tuning, and what personalisation and robust aggregation buy.

Text: SST-2 (2,000 training phrases split across 5 clients; the GLUE dev set is the global test),
packaged MiniLM-L6 + LoRA. Images: Fashion-MNIST (2,000 training images across 5 clients; its test
set is the global test), EfficientNet-Lite0 at 32 px, full fine-tuning. For each: IID and
Dirichlet(0.5) partitions with FedAvg, and centralised fine-tuning on the pooled data for as many
epochs as the federation ran rounds x local epochs. Then, on the IID text split, client 0 sends
updates scaled by -10: FedAvg vs FedMedian. Finally three clients that each hold one domain (UCI amazon,
UCI imdb, 1,000 SST-2 phrases): local-only vs global vs personalised per client, with FedAvg and with each
client's head kept on the client (FedPer). Flower's Simulation
Engine (Ray), 1 CPU per client.

    python bench/federated.py                       # about 55 min on 2 CPU cores
    python bench/federated.py --only domains        # three clients, three sentiment domains
    python bench/federated.py --tiny --model DIR    # a smoke run on a tiny local model (tests)

The recorded image rows (2026-12-07) ran with the LR and the clients' LR decay across rounds swept too:

    python bench/federated.py --only image --batch-divisors 4 --lr-multipliers 1 3 --round-schedules constant cosine
    python bench/federated.py --only image --round-schedule-seeds 0 1 2   # the two recipes it chose between, per seed
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
DOMAINS = ROOT.parent / "shared" / "data" / "sentiment-domains"
RESULTS = ROOT / "bench" / "results" / "federated.json"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import machine, replace_section, save_results  # noqa: E402


def setups(args, folder: Path) -> dict:
    if args.tiny:
        from tiny_data import tiny_sentences

        files = tiny_sentences(folder, counts=(("train", 120), ("test", 20)))
        text = dict(model=args.model, strategy="lora", lr=5e-3, batch_size=16,
                    data={"train": files["train"], "test": files["test"], "text_column": "sentence",
                          "max_train_examples": 120})
        return {"text": text}
    text = dict(model=args.model, strategy="lora", lr=5e-4, batch_size=32,
                data={"train": str(SST2 / "train.tsv"), "test": str(SST2 / "test.tsv"), "text_column": "sentence",
                      "max_train_examples": args.examples})
    # The centralised run decays its LR over all its epochs (cosine); the clients keep the federated default, a
    # constant LR: a decay inside each round's local epoch restarts every round (docs/federated.md), and on the
    # clients' IID validation splits it scored 0.730 against constant's 0.787 (2026-12-03, batch 16).
    image = dict(model=args.image_model, strategy="full", lr=1e-3, batch_size=64, image_size=32,
                 centralised={"schedule": "cosine"}, data={"train": "fashion-mnist", "max_train_examples": args.examples})
    return {"text": text, "image": image}


# Each client holds out these shares of its data for its validation and its own test split.
CLIENT_VAL_FRACTION = CLIENT_TEST_FRACTION = 0.15


def run_setting(name: str, recipe: dict, folder: Path, args, **options) -> dict:
    import transferkit
    from transferkit.federated import FederatedConfig

    settings = {"num_clients": args.clients, "max_rounds": args.rounds, "local_epochs": args.local_epochs, "round_patience": None,
                "val_fraction": CLIENT_VAL_FRACTION, "test_fraction": CLIENT_TEST_FRACTION, **options}
    started = time.time()
    federated = {k: v for k, v in recipe.items() if k != "centralised"}
    metrics = transferkit.federate(FederatedConfig.from_dict({**federated, **settings, "out": str(folder / name)},
                                                             source=name))
    row = {"setting": name, "aggregator": metrics["aggregator"], "partitioner": metrics["partitioner"],
           "test_accuracy": metrics["test"]["accuracy"], "rounds": metrics["rounds"],
           "mean_client_local_only": metrics.get("mean_client_local_only"),
           "mean_client_global": metrics.get("mean_client_global"),
           "mean_client_personalised": metrics.get("mean_client_personalised"),
           "personalisation_gain_per_client": {c: r["personalised"] - r["global"]
                                               for c, r in metrics["per_client"].items() if "personalised" in r},
           "bytes_per_round": metrics["bytes"]["per_round"][0], "exchanged_fraction": metrics["bytes"]["exchanged_fraction"],
           "full_model_bytes": metrics["bytes"]["full_model"], "seconds": time.time() - started,
           "server_lr": options.get("server_lr"), "batch_size": recipe["batch_size"], "lr": recipe["lr"],
           "round_schedule": metrics.get("round_schedule", "constant"),
           "best_val_accuracy": max(h["val_accuracy"] for h in metrics["history"])}
    print(f"{name}: test {row['test_accuracy']:.4f}", flush=True)
    return row


def centralised(name: str, recipe: dict, folder: Path, args) -> dict:
    import transferkit

    data = recipe["data"]
    fields = {k: v for k, v in recipe.items() if k not in ("data", "centralised")} | recipe.get("centralised", {})
    started = time.time()
    # The pooled training data, the same global test, as many epochs as the federation ran. It trains on as
    # many examples as the clients do together: each client holds out a validation and a test share of its
    # examples, so the clients train on 70% of them (before 2026-12-03 this run trained on all of them, 43%
    # more data than the federation, and the gap in the table included that).
    extra = {"test": data["test"]} if "test" in data else {}
    examples = data.get("max_train_examples")
    pooled = None if examples is None else round(examples * (1 - CLIENT_VAL_FRACTION - CLIENT_TEST_FRACTION))
    metrics = transferkit.finetune(**fields, train=data["train"], text_column=data.get("text_column"),
                                   max_train_examples=pooled, val_fraction=0.15, **extra,
                                   epochs=_total_epochs(args), patience=None, baseline=False, out=str(folder / name))
    print(f"{name}: test {metrics['test']['accuracy']:.4f}", flush=True)
    return {"setting": name, "test_accuracy": metrics["test"]["accuracy"], "seconds": time.time() - started,
            "batch_size": recipe["batch_size"], "lr": recipe["lr"], "train_examples": metrics["data"]["train"],
            "best_val_accuracy": max(h["val_accuracy"] for h in metrics["history"])}


def _total_epochs(args) -> int:
    """The centralised run's epochs: as many passes over the data as the federation's rounds x local epochs."""
    total = args.rounds * args.local_epochs
    if abs(total - round(total)) > 1e-9:
        raise SystemExit(f"--rounds {args.rounds} x --local-epochs {args.local_epochs} is not a whole number of epochs")
    return round(total)


def _epochs_text(local_epochs: float) -> str:
    return "1 local epoch" if local_epochs == 1 else (f"{local_epochs:g} local epochs" if local_epochs > 1 else
                                                     f"1/{round(1 / local_epochs)} local epoch")


def _choose_on_validation(values: list, run, name=lambda value: f"{value:g}") -> tuple[Any, dict, dict[str, float]]:
    """Run once per value; keep the run with the best validation accuracy (ties: the first value). Returns the
    chosen value, its run, and every value's validation accuracy."""
    runs = {value: run(value) for value in values}
    chosen = max(runs, key=lambda value: runs[value]["best_val_accuracy"])
    return chosen, runs[chosen], {name(value): r["best_val_accuracy"] for value, r in runs.items()}


def _seed_result(seed: int, row: dict) -> dict:
    """What a per-seed ablation keeps of one run."""
    return {"seed": seed, **{k: row[k] for k in ("test_accuracy", "best_val_accuracy", "seconds") if k in row}}


def run_optimizer_state_ablation(args, folder: Path, name: str, recipe: dict, pair: dict) -> dict:
    """FedAvg on the IID split with the batch size and LR the recorded pair chose, each client's AdamW reset every
    round (the default) vs kept between rounds, once per seed (the seed also draws the partition)."""
    chosen = {**recipe, "batch_size": pair["federated_batch_size"], "lr": pair["federated_lr"]}
    runs: dict[str, list[dict]] = {"reset": [], "keep": []}
    for seed in args.optimizer_state_seeds:
        for mode in runs:
            row = run_setting(f"iid-optimizer-{mode}-seed{seed}", {**chosen, "seed": seed}, folder, args,
                              partitioner="iid", client_optimizer_state=mode)
            runs[mode].append(_seed_result(seed, row))
    return {"batch_size": chosen["batch_size"], "lr": chosen["lr"], "runs": runs, "date": time.strftime("%Y-%m-%d")}


def optimizer_state_table(results: dict) -> list[str]:
    lines = []
    for name in ("text", "image"):
        ablation = results.get(f"{name}-optimizer-state")
        if not ablation:
            continue
        runs = ablation["runs"]
        seeds = [r["seed"] for r in runs["reset"]]
        lines += [f"### {name}: the clients' AdamW reset every round vs kept between rounds (FedAvg, IID, batch "
                  f"{ablation['batch_size']}, lr {ablation['lr']:g}; {ablation.get('machine', results['machine'])}, {ablation['date']})", "",
                  "| client optimiser | " + " | ".join(f"seed {s}: test / best val" for s in seeds) + " | mean test |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for mode, label in (("reset", "reset each round (default)"), ("keep", "kept (`client_optimizer_state: keep`)")):
            cells = [f"{r['test_accuracy']:.4f} / {r['best_val_accuracy']:.4f}" for r in runs[mode]]
            mean = sum(r["test_accuracy"] for r in runs[mode]) / len(runs[mode])
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean:.4f} |")
        lines.append("")
    return lines


def parse_schedule_candidate(entry: str, base_lr: float) -> tuple[str, float, str, float | None]:
    """``SCHEDULE@M[+keep][+fedavgm:SERVER_LR]`` -> (round schedule, client LR, client optimiser state, FedAvgM's
    server LR or None for FedAvg)."""
    head, *suffixes = entry.split("+")
    schedule, _, multiple = head.partition("@")
    optimizer, server_lr = "reset", None
    for suffix in suffixes:
        if suffix == "keep":
            optimizer = "keep"
        elif suffix.startswith("fedavgm:"):
            try:
                server_lr = float(suffix.split(":", 1)[1])
            except ValueError:
                raise SystemExit(f"--schedule-candidates {entry}: write the server LR as fedavgm:1.0") from None
        else:
            raise SystemExit(f"--schedule-candidates {entry}: the suffixes are +keep and +fedavgm:SERVER_LR")
    return schedule, base_lr * float(multiple or 1), optimizer, server_lr


def run_round_schedule_seeds(args, folder: Path, name: str, recipe: dict, pair: dict, recorded: dict | None = None) -> dict:
    """IID at the recorded pair's batch size, each ``--schedule-candidates`` entry (round schedule @ a multiple of
    the recipe's LR, FedAvg or FedAvgM) once per seed: what one seed's validation choice between them is worth; and
    the pair's centralised recipe once per seed, the reference of the means. With ``recorded`` (a previous table at
    the same batch size), a row already recorded for the same candidate and seed is taken, not rerun: seeded runs
    repeat exactly (since the server averages in client order, 2026-12-07)."""
    candidates = [parse_schedule_candidate(entry, recipe["lr"]) for entry in args.schedule_candidates]
    kept = recorded["runs"] if recorded and recorded.get("batch_size") == pair["federated_batch_size"] else {}
    runs: dict[str, list[dict]] = {}

    def add(label: str, seed: int, run) -> None:
        previous = next((r for r in kept.get(label, []) if r["seed"] == seed), None)
        if previous is not None:
            print(f"{label}, seed {seed}: recorded test {previous['test_accuracy']:.4f}", flush=True)
        runs.setdefault(label, []).append(previous or _seed_result(seed, run()))

    central = pair["rows"]["centralised"]
    central_label = f"centralised, pooled data, batch {central['batch_size']} @ lr {central['lr']:g}"
    for seed in args.round_schedule_seeds:
        # The centralised reference varies with the seed too: the gap is between means.
        add(central_label, seed, lambda: centralised(f"centralised-seed{seed}", {
            **recipe, "batch_size": central["batch_size"], "lr": central["lr"], "seed": seed}, folder, args))
        for schedule, lr, optimizer, server_lr in candidates:
            label = (f"{schedule} over rounds @ lr {lr:g}" + (", AdamW kept between rounds" if optimizer == "keep" else "")
                     + ("" if server_lr is None else f", FedAvgM (server LR {server_lr:g}, momentum 0.9)"))
            server = {} if server_lr is None else {"aggregator": "fedavgm", "server_lr": server_lr}
            add(label, seed, lambda: run_setting(
                f"iid-{schedule}-lr{lr:g}-{optimizer}-{server_lr or 'fedavg'}-seed{seed}",
                {**recipe, "batch_size": pair["federated_batch_size"], "lr": lr, "seed": seed}, folder, args,
                partitioner="iid", round_schedule=schedule, client_optimizer_state=optimizer, **server))
    return {"batch_size": pair["federated_batch_size"], "runs": runs, "date": time.strftime("%Y-%m-%d")}


def round_schedule_table(results: dict) -> list[str]:
    lines = []
    for name in ("text", "image"):
        ablation = results.get(f"{name}-round-schedule")
        if not ablation:
            continue
        runs = ablation["runs"]
        seeds = [r["seed"] for r in next(iter(runs.values()))]
        central_runs = next((each for label, each in runs.items() if label.startswith("centralised")), None)
        central = ({"test_accuracy": sum(r["test_accuracy"] for r in central_runs) / len(central_runs)} if central_runs
                   else results.get(name, {}).get("rows", {}).get("centralised"))
        lines += [f"### {name}: the clients' LR across rounds, once per seed (IID, FedAvg unless the row says FedAvgM, "
                  f"batch {ablation['batch_size']}; "
                  f"{ablation.get('machine', results['machine'])}, {ablation['date']})", "",
                  "| clients' LR | " + " | ".join(f"seed {s}: test / best val" for s in seeds) + " | mean test | mean val |"
                  + (" mean test vs centralised |" if central else ""),
                  "|---|" + "---|" * (len(seeds) + 2 + bool(central))]
        for label, each in runs.items():
            cells = [f"{r['test_accuracy']:.4f} / {r['best_val_accuracy']:.4f}" for r in each]
            test = sum(r["test_accuracy"] for r in each) / len(each)
            val = sum(r["best_val_accuracy"] for r in each) / len(each)
            gap = "" if not central else (" - |" if label.startswith("centralised") else
                                          f" {100 * (test - central['test_accuracy']):+.2f} pts |")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {test:.4f} | {val:.4f} |" + gap)
        lines.append("")
    return lines


def run_pair(args, folder: Path, name: str, recipe: dict, previous: dict | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    # One round is one local epoch over a client's share: with k clients it takes about 1/k of the steps of a
    # centralised epoch. The batch size is a recipe choice like the learning rate, so each side picks its own
    # from the same candidates on its own validation data (centralised: pooled; federated: the clients' IID
    # splits, then used for every federated row).
    # The LR is swept the same way (--lr-multipliers): averaging k clients' updates takes about 1/k of the
    # sequential steps of a centralised run, which a larger client LR may make up for.
    sizes = sorted({max(1, recipe["batch_size"] // d) for d in args.batch_divisors}, reverse=True)
    lrs = [recipe["lr"] * m for m in args.lr_multipliers]
    candidates = [(bs, lr) for bs in sizes for lr in lrs]
    name_of = (lambda c: f"{c[0]}") if len(lrs) == 1 else (lambda c: f"{c[0]} @ lr {c[1]:g}")
    tag = (lambda c: f"b{c[0]}") if len(lrs) == 1 else (lambda c: f"b{c[0]}-lr{c[1]:g}")
    _, central, central_sweep = _choose_on_validation(candidates, lambda c: centralised(
        f"centralised-{tag(c)}", {**recipe, "batch_size": c[0], "lr": c[1]}, folder, args), name_of)
    if previous is not None:  # --centralised-only: the federated rows stay as recorded
        recorded = {key.split(", ")[0] for key in previous["rows"]["iid"]["batch_sweep"]}
        if set(central_sweep) != recorded:
            raise SystemExit(f"{name}: the recorded federated rows tried {sorted(recorded)}: "
                             f"pass the --batch-divisors and --lr-multipliers they were run with")
        return {**previous, "rows": {"centralised": {**central, "batch_sweep": central_sweep, "date": time.strftime("%Y-%m-%d")},
                                     **{k: v for k, v in previous["rows"].items() if k != "centralised"}}}
    rows = {"centralised": {**central, "batch_sweep": central_sweep}}
    # The federation may also decay its clients' LR across rounds (round_schedule), chosen with them; the
    # centralised run decays over its epochs with the recipe's schedule.
    schedules = args.round_schedules
    federated_candidates = [(bs, lr, schedule) for bs, lr in candidates for schedule in schedules]
    federated_name = name_of if len(schedules) == 1 else (lambda c: f"{name_of(c)}, {c[2]} over rounds")
    federated_tag = tag if len(schedules) == 1 else (lambda c: f"{tag(c)}-{c[2]}")
    round_schedule = schedules[0]
    if "iid" in args.partitions:
        (batch_size, lr, round_schedule), iid, iid_sweep = _choose_on_validation(federated_candidates, lambda c: run_setting(
            f"iid-{federated_tag(c)}", {**recipe, "batch_size": c[0], "lr": c[1]}, folder, args, round_schedule=c[2]),
            federated_name)
        rows["iid"] = {**iid, "batch_sweep": iid_sweep}
        recipe = {**recipe, "batch_size": batch_size, "lr": lr}
    if "dirichlet" in args.partitions:
        rows["dirichlet"] = run_setting("dirichlet", recipe, folder, args, partitioner="dirichlet", alpha=0.5,
                                        round_schedule=round_schedule)
    if args.server_lrs and "iid" in args.partitions:
        # FedAvgM: the server's learning rate chosen on the clients' validation splits (best round's mean
        # client validation accuracy), on the IID split; the Dirichlet split takes the chosen one.
        server_lr, fedavgm, lr_sweep = _choose_on_validation(args.server_lrs, lambda lr: run_setting(
            f"iid-fedavgm-{lr:g}", recipe, folder, args, aggregator="fedavgm", server_lr=lr, round_schedule=round_schedule))
        rows["iid-fedavgm"] = {**fedavgm, "server_lr_sweep": lr_sweep}
        if "dirichlet" in args.partitions:
            rows["dirichlet-fedavgm"] = run_setting("dirichlet-fedavgm", recipe, folder, args, partitioner="dirichlet",
                                                    alpha=0.5, aggregator="fedavgm", server_lr=server_lr,
                                                    round_schedule=round_schedule)
    if name == "text" and not args.no_attack:
        for aggregator in ("fedavg", "fedmedian"):
            rows[f"poisoned-{aggregator}"] = run_setting(f"poisoned-{aggregator}", recipe, folder, args,
                                                         aggregator=aggregator, poisoned_clients=[0],
                                                         personalise_epochs=0, local_only=False,
                                                         round_schedule=round_schedule)
    return {"model": recipe["model"], "strategy": recipe["strategy"], "clients": args.clients, "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "examples": args.examples, "federated_batch_size": recipe["batch_size"], "federated_lr": recipe["lr"],
            "federated_round_schedule": round_schedule, "rows": rows}


def run_domains(args, folder: Path, personal: str = "none") -> dict:
    """Three clients, three domains: UCI amazon and imdb reviews and a share of SST-2 (MiniLM-L6 + LoRA);
    with ``personal``, each client keeps that part of its model to itself (head: FedPer)."""
    import transferkit
    from transferkit.federated import FederatedConfig

    from adapt import _with_header

    folder.mkdir(parents=True, exist_ok=True)
    clients = [{"name": "amazon", "train": _with_header(DOMAINS / "amazon.tsv", folder / "amazon.tsv")},
               {"name": "imdb", "train": _with_header(DOMAINS / "imdb.tsv", folder / "imdb.tsv")},
               {"name": "sst2", "train": str(SST2 / "train.tsv"), "max_train_examples": 1000}]
    recipe = dict(model=args.model, strategy="lora", lr=args.domain_lr, batch_size=args.domain_batch_size)
    started = time.time()
    metrics = transferkit.federate(FederatedConfig.from_dict(
        {**recipe, "round_schedule": args.domain_round_schedule, "text_column": "sentence", "clients": clients,
         "max_rounds": args.rounds, "local_epochs": 1,
         "round_patience": None, "val_fraction": 0.15, "test_fraction": 0.15, "personal": personal,
         "personalise_lr_factors": args.personalise_lr_factors,
         "out": str(folder / f"run-{personal}")},
        source="domains"))
    print(f"domains (personal {personal}): {metrics['per_client']}", flush=True)
    return {"model": recipe["model"], "rounds": args.rounds, "personal": personal, "batch_size": recipe["batch_size"],
            "lr": recipe["lr"], "round_schedule": args.domain_round_schedule,
            "personalise_lr_factors": args.personalise_lr_factors,
            "per_client": metrics["per_client"],
            "test_accuracy": metrics["test"]["accuracy"], "seconds": time.time() - started}


def table(results: dict) -> str:
    lines = []
    for name in ("text", "image"):
        pair = results.get(name)
        if not pair:
            continue
        rows = pair["rows"]
        central = rows["centralised"]
        lines += [f"### {name}: {pair['model']} + {pair['strategy']}, {pair['examples']} training examples, "
                  f"{pair['clients']} clients, {pair['rounds']} rounds x {_epochs_text(pair.get('local_epochs', 1))} "
                  f"({pair.get('machine', results['machine'])}, "
                  f"{pair.get('date', results['date'])})", "",
                  "| setting | global test acc | vs centralised | client mean: local-only / global / personalised | "
                  "clients gaining >= 1 pt from personalisation | sent per round (% of model) | time (s) |",
                  "|---|---|---|---|---|---|---|",
                  f"| centralised, pooled data{_pooled_note(central, pair)}, {round(pair['rounds'] * pair.get('local_epochs', 1))} epochs{_batch_note(central)} | {central['test_accuracy']:.4f} | - | - | - | - | "
                  f"{central['seconds']:.0f} |"]
        for key, row in rows.items():
            if key == "centralised":
                continue
            gains = row["personalisation_gain_per_client"]
            gaining = f"{sum(g >= 0.01 for g in gains.values())}/{len(gains)}" if gains else "-"
            clients = (" / ".join(f"{row[k]:.4f}" if row.get(k) is not None else "-" for k in
                                  ("mean_client_local_only", "mean_client_global", "mean_client_personalised")))
            server = f" (server LR {row['server_lr']:g}, momentum 0.9)" if row.get("server_lr") else ""
            if row.get("round_schedule", "constant") != "constant" and not key.startswith("poisoned"):
                server += f", client LR {row['round_schedule']} over rounds"
            label = {"iid": f"FedAvg{server}, IID", "dirichlet": f"FedAvg{server}, Dirichlet(0.5)", "iid-fedavgm": f"FedAvgM{server}, IID",
                     "dirichlet-fedavgm": f"FedAvgM{server}, Dirichlet(0.5)"}.get(
                key, f"{row['aggregator']}, IID, client 0 sends -10 x its update")
            lines.append(f"| {label} | {row['test_accuracy']:.4f} | {100 * (row['test_accuracy'] - central['test_accuracy']):+.2f} pts | "
                         f"{clients} | {gaining} | {row['bytes_per_round'] / 1e6:.2f} MB ({100 * row['exchanged_fraction']:.2f}%) | "
                         f"{row['seconds']:.0f} |")
        if central.get("batch_sweep") and rows.get("iid", {}).get("batch_sweep"):
            with_lr = any("@" in key for key in central["batch_sweep"])
            with_schedule = any("over rounds" in key for key in rows["iid"]["batch_sweep"])
            chosen = (f"{pair['federated_batch_size']} @ lr {pair['federated_lr']:g}" if with_lr
                      else f"{pair['federated_batch_size']}")
            if with_schedule:
                chosen += f", {pair['federated_round_schedule']} over rounds"
            what = "Batch size and client LR" if with_lr else "Batch size"
            if with_schedule:
                what += " (federated: and the decay of the clients' LR across rounds, `round_schedule`)"
            lines += ["", f"{what}, chosen by validation accuracy "
                      f"(centralised: pooled validation split; federated: the "
                      f"best round's mean client validation accuracy on the IID split, then used by every federated row, "
                      f"{chosen}): centralised "
                      + ", ".join(f"{bs}: {acc:.4f}" for bs, acc in central["batch_sweep"].items()) + "; federated "
                      + ", ".join(f"{bs}: {acc:.4f}" for bs, acc in rows["iid"]["batch_sweep"].items()) + "."]
        sweeps = [row["server_lr_sweep"] for row in rows.values() if row.get("server_lr_sweep")]
        if sweeps:
            lines += ["", "FedAvgM's server learning rate, chosen by the best round's mean client validation accuracy "
                      "on the IID split: " + ", ".join(f"{lr}: {acc:.4f}" for lr, acc in sweeps[0].items()) + "."]
        lines.append("")
    domains = results.get("domains")
    if domains:
        lines += [f"### domains: three clients, each its own domain (UCI amazon, UCI imdb, 1,000 SST-2 phrases), "
                  f"{domains['model']} + lora, FedAvg, {domains['rounds']} rounds x 1 local epoch, batch "
                  f"{domains.get('batch_size', 32)}, clients' LR {domains.get('lr', 5e-4):g} "
                  f"{domains.get('round_schedule', 'constant')} over rounds ({domains.get('machine', results['machine'])}, "
                  f"{domains.get('date', results['date'])})", "",
                  "| client | local-only | global | personalised | personalised - global | personalisation LR factor "
                  f"kept on validation (tried {', '.join(f'{f:g}' for f in domains.get('personalise_lr_factors', [1.0]))}) |",
                  "|---|---|---|---|---|---|"]
        for name, r in domains["per_client"].items():
            kept = (f"{r['personalisation_lr_factor']:g}" if "personalisation_lr_factor" in r
                    else ("1" if r.get("personalisation_kept") else "none: the global model"))
            lines.append(f"| {name} | {r['local_only']:.4f} | {r['global']:.4f} | {r['personalised']:.4f} | "
                         f"{100 * (r['personalised'] - r['global']):+.2f} pts | {kept} |")
        lines += ["", f"Global model on the union of the clients' test splits: {domains['test_accuracy']:.4f}; "
                  f"{domains['seconds']:.0f} s.", ""]
    fedper = results.get("domains-head")
    if domains and fedper:
        lines += [f"### domains with a personal head (FedPer, `personal: head`): the same clients, data, recipe and rounds; "
                  f"each client's head stays on the client ({fedper.get('date', results['date'])})", "",
                  "| client | FedAvg global | FedPer: shared part + own head | FedPer - FedAvg | FedPer, then personalised | "
                  "rounds that trained the own head |", "|---|---|---|---|---|---|"]
        for name, r in fedper["per_client"].items():
            base = domains["per_client"][name]["global"]
            lines.append(f"| {name} | {base:.4f} | {r['global']:.4f} | {100 * (r['global'] - base):+.2f} pts | "
                         f"{r['personalised']:.4f} | {r.get('personal_rounds', '-')} |")
        lines += ["", f"Union of the clients' test splits, each scored with its own head: {fedper['test_accuracy']:.4f} "
                  f"(FedAvg's global model: {domains['test_accuracy']:.4f}); {fedper['seconds']:.0f} s.", ""]
    lines += optimizer_state_table(results)
    lines += round_schedule_table(results)
    return "\n".join(lines).rstrip()


def _pooled_note(central: dict, pair: dict) -> str:
    """How many examples the centralised reference trained on, and when, if not with the federated rows."""
    note = f" ({central['train_examples']:,} examples" if central.get("train_examples") else ""
    if note and central.get("date") and central["date"] != pair.get("date"):
        note += f", measured {central['date']}"
    return note + (")" if note else "")


def _batch_note(row: dict) -> str:
    note = f", batch {row['batch_size']}" if row.get("batch_size") else ""
    return note + (f", lr {row['lr']:g}" if row.get("lr") else "")


def write_doc(results: dict) -> None:
    intro = ("## Federated fine-tuning (bench/federated.py)\n\nFlower Simulation Engine (Ray), one CPU per client. "
             "Global test: the dataset's own test split, predicted once by the best round's global model (chosen on "
             "the clients' validation splits). Centralised: the examples the clients train on, pooled (each client "
             "holds out 15% of its share for validation and 15% for its own test, so 70% of the examples train on "
             "either side). Client means: each client's own held-out test split; personalised = "
             "the global model fine-tuned 1 epoch on the client's data, kept only if its validation accuracy does not "
             "drop (where the clients' LR decayed across rounds, its LR decays over that epoch the same way: the "
             "image rows since 2026-12-07). Sent per round: parameters down and up for all clients. Reference points (other data, from "
             "scratch): Flower niid_bench FedAvg CIFAR-10 IID 71.3 vs Dirichlet(0.5) 62.5; FedPEFT sends ~0.2% of the "
             "model per round.\n\n")
    replace_section("## Federated fine-tuning (bench/federated.py)", intro + table(results) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["text", "image", "domains"], default=["text", "image", "domains"])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--image-model", default="efficientnet-lite0")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=float, default=1.0,
                        help="epochs per round, or 1/k: each round trains on a k-th of a client's data (text, image)")
    parser.add_argument("--partitions", nargs="+", choices=["iid", "dirichlet"], default=["iid", "dirichlet"])
    parser.add_argument("--no-attack", action="store_true", help="skip the poisoned-client runs")
    parser.add_argument("--server-lrs", nargs="*", type=float, default=[1.0, 3.0],
                        help="FedAvgM server learning rates to try (chosen on validation); none: skip FedAvgM")
    parser.add_argument("--batch-divisors", nargs="+", type=int, default=[1, 4],
                        help="batch sizes to try, as the recipe's batch size divided by each (chosen on validation, "
                             "centralised and federated separately)")
    parser.add_argument("--lr-multipliers", nargs="+", type=float, default=[1.0],
                        help="learning rates to try, as the recipe's LR times each (chosen on validation with the batch "
                             "size, centralised and federated separately)")
    parser.add_argument("--round-schedules", nargs="+", choices=["constant", "linear", "cosine", "exponential"],
                        default=["constant"], help="federated: how the clients' LR decays across rounds, tried with each "
                                                   "batch size and LR (chosen on the clients' IID validation splits)")
    parser.add_argument("--domain-batch-size", type=int, default=8,
                        help="domains: the clients' batch size (default 8, the one the IID text sweep chose)")
    # The default LR and decay: the text recipe with the best mean client validation accuracy over two seeds
    # (--round-schedule-seeds 0 1, 2026-12-08); the domain tables before 2026-12-08 ran at a constant 5e-4.
    parser.add_argument("--domain-lr", type=float, default=1.5e-3, help="domains: the clients' LR (default 1.5e-3)")
    parser.add_argument("--personalise-lr-factors", nargs="+", type=float, default=[1.0, 0.1],
                        help="domains: multiples of the clients' LR the personalisation tries, each client keeping the "
                             "best on its validation split (default 1 0.1)")
    parser.add_argument("--domain-round-schedule", choices=["constant", "linear", "cosine", "exponential"],
                        default="cosine", help="domains: the decay of the clients' LR across rounds (default cosine)")
    parser.add_argument("--personal", nargs="+", choices=["none", "head"], default=["none", "head"],
                        help="domains: personal parts to run (none: FedAvg; head: FedPer)")
    parser.add_argument("--centralised-only", action="store_true",
                        help="re-run only the centralised reference of --only's pairs; the recorded federated rows stay")
    parser.add_argument("--optimizer-state-seeds", nargs="+", type=int, default=None,
                        help="instead of the pairs: FedAvg IID at the recorded pair's batch and LR with the clients' "
                             "AdamW reset vs kept between rounds, once per seed (text, image)")
    parser.add_argument("--round-schedule-seeds", nargs="+", type=int, default=None,
                        help="instead of the pairs: FedAvg IID at the recorded pair's batch size, each "
                             "--schedule-candidates entry once per seed (text, image)")
    parser.add_argument("--schedule-candidates", nargs="+", default=["constant@1", "cosine@3"],
                        help="with --round-schedule-seeds: SCHEDULE@M[+keep][+fedavgm:SERVER_LR], the clients' LR decay "
                             "across rounds at M x the recipe's LR, +keep: their AdamW moments kept between rounds, "
                             "+fedavgm:S: FedAvgM with server LR S and momentum 0.9 (default constant@1 cosine@3)")
    parser.add_argument("--keep-recorded", action="store_true",
                        help="with --round-schedule-seeds: take the rows already recorded for a candidate and seed "
                             "(same batch size) instead of rerunning them")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--doc-only", action="store_true")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
    if not args.doc_only:
        results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
        with tempfile.TemporaryDirectory() as tmp:
            available = setups(args, Path(tmp))
            for name in args.only:
                if name == "domains" and not args.tiny:  # real data only
                    for personal in args.personal:
                        key = "domains" if personal == "none" else f"domains-{personal}"
                        results[key] = run_domains(args, Path(tmp) / "domains", personal)
                        results[key].update(date=results["date"], machine=results["machine"])
                        save_results(args.results, results)
                if name not in available:
                    continue
                # The ablations rerun FedAvg IID around the recorded pair's choice, once per seed.
                ablation = next(((flag, key, run) for flag, key, run in (
                    ("--round-schedule-seeds", "round-schedule", run_round_schedule_seeds),
                    ("--optimizer-state-seeds", "optimizer-state", run_optimizer_state_ablation))
                    if getattr(args, flag[2:].replace("-", "_"))), None)
                if ablation:
                    flag, key, run = ablation
                    if name not in results:
                        raise SystemExit(f"{flag}: no recorded {name} pair in {args.results}")
                    reuse = {"recorded": results.get(f"{name}-{key}")} if key == "round-schedule" and args.keep_recorded else {}
                    results[f"{name}-{key}"] = run(args, Path(tmp) / f"{name}-{key}", name, available[name], results[name],
                                                   **reuse)
                    results[f"{name}-{key}"]["machine"] = results["machine"]
                    save_results(args.results, results)
                    continue
                if args.centralised_only:
                    if name not in results:
                        raise SystemExit(f"--centralised-only: no recorded {name} rows in {args.results}")
                    results[name] = run_pair(args, Path(tmp) / name, name, available[name], previous=results[name])
                else:
                    results[name] = run_pair(args, Path(tmp) / name, name, available[name])
                    results[name].update(date=results["date"], machine=results["machine"])
                save_results(args.results, results)
        print(table(results))
    if not args.no_doc:
        write_doc(results)


if __name__ == "__main__":
    main()
