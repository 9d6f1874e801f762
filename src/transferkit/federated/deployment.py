"""Flower's Deployment Engine: the same ServerApp round loop and ClientApp handlers as a simulation, as
module-level apps that a SuperLink and real SuperNodes (other processes or machines) load.

Everything travels through Flower: the federation's config rides in the run config (``federation``, JSON),
the global classes and weights in each message. A SuperNode knows which client it is from its node config
(``partition-id=K``) and may point at its own data (``data-config=client.yaml``: the data fields of its
entry under ``clients``, for files stored elsewhere on its machine). Before round 1 the server asks every
client which labels it holds (the examples never leave the client), and after the last round the global
test score is the union of the clients' test splits, summed from the confusion matrices they report.

    flower-superlink --insecure --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9092 --clientappio-api-address 127.0.0.1:9094 \\
        --node-config 'partition-id=0 data-config="site0.yaml"'
    transferkit federate --config fed.yaml --superlink 127.0.0.1:9093 --insecure
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import read_yaml
from ..data.dataset import sort_classes
from ..errors import UserError
from .config import FederatedConfig

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import ConfigRecord, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from .aggregators import minimum_clients  # noqa: E402
from .apps import (NODE_WAIT_S, RoundCheckpoint, add_client_handlers, local_privacy_mod, server_loop,  # noqa: E402
                   state_path, wait_for_nodes)
from .local import load_exchanged, local_model, one_client_examples  # noqa: E402

DESCRIBE_TIMEOUT_S = 600.0

server_app = ServerApp()


def federation_config(context) -> FederatedConfig:
    return _parse_federation(context.run_config["federation"])


@functools.lru_cache(maxsize=4)
def _parse_federation(text: str) -> FederatedConfig:
    # Every message (and the privacy mod before it) asks for the config: parse and validate it once per run.
    return FederatedConfig.from_dict(json.loads(text), source="the federation's config")


def _client_setup(message, context):
    config = federation_config(context)
    if "partition-id" not in context.node_config:
        raise UserError("this SuperNode has no partition-id: start it with --node-config 'partition-id=K' (K = its "
                        "client's position under 'clients', from 0)")
    index = int(context.node_config["partition-id"])
    data = read_yaml(context.node_config["data-config"]) if "data-config" in context.node_config else None
    settings = message.content["config"] if "config" in message.content else {}
    classes = json.loads(settings["classes"]) if "classes" in settings else None
    return config, classes, index, one_client_examples(config, index, data)


def _client_state_folder(config, index: int, context) -> Path | None:
    """``state-dir`` of the SuperNode's node config: where this client keeps its state between rounds (personal
    part, kept optimiser moments), so a resumed federation gives it back; without one it is kept in memory."""
    folder = context.node_config.get("state-dir")
    return Path(str(folder)) / f"{Path(config.out).name}-client-{index}" if folder else None


client_app = ClientApp(mods=[local_privacy_mod(federation_config)])
add_client_handlers(client_app, _client_setup, _client_state_folder)


def describe_clients(grid, nodes: list[int], config: FederatedConfig,
                     known_classes: list[str] | None = None) -> tuple[list[str], dict[int, str]]:
    """Ask every client which labels it holds; the global classes are their union. Also which node is which
    client, so the rounds can name a client that drops. A resumed run passes the classes it started with: then
    a client may be missing (it dropped out), but none may bring a label the global head lacks."""
    queries = [Message(RecordDict({"config": ConfigRecord({"kind": "describe"})}), dst_node_id=node,
                       message_type=MessageType.QUERY) for node in nodes]
    labels, seen = set(), {}
    for reply in grid.send_and_receive(queries, timeout=DESCRIBE_TIMEOUT_S):
        if reply.has_error():
            if known_classes is not None:
                # A resumed run goes on without a client that dropped out: its node can still be listed for
                # up to two heartbeat intervals after it died, and the rounds name it among the failures.
                continue
            raise UserError(f"SuperNode {reply.metadata.src_node_id} failed before round 1: {reply.error.reason}")
        index = int(reply.content["metrics"]["client"])
        if index in seen:
            raise UserError(f"two SuperNodes say they are client {index}: give each its own partition-id")
        seen[index] = reply.metadata.src_node_id
        labels |= set(json.loads(reply.content["labels"]["labels"]))
    if known_classes is not None:
        unknown = sorted(labels - set(known_classes))
        if unknown:
            raise UserError(f"the clients now hold labels the resumed run started without: {unknown[:10]}; "
                            f"start a new run (without --resume) to train a head for them")
        return list(known_classes), {node: config.client_names[index] for index, node in seen.items()}
    missing = sorted(set(range(config.num_clients)) - set(seen))
    if missing:
        raise UserError(f"no SuperNode is client {missing} (partition-id): every client of the config needs one")
    classes = sort_classes(sorted(labels))
    if len(classes) < 2:
        raise UserError(f"all clients together hold one class ({classes}): a classifier needs at least two")
    return classes, {node: config.client_names[index] for index, node in seen.items()}


@server_app.main()
def main(grid, context) -> None:
    from tqdm.auto import tqdm

    from .run import union_test, write_federated_run

    try:
        config = federation_config(context)
        run_dir = Path(config.out)
        resume = bool(context.run_config.get("resume", False))
        saved = RoundCheckpoint(run_dir).state() if resume else None
        known = saved.get("classes") if saved else None
        # Round 1 needs every client (their labels make the head); a resumed run goes on with those connected.
        nodes = wait_for_nodes(grid, config.num_clients if known is None else minimum_clients(config, config.num_clients),
                               float(context.run_config.get("wait-s", NODE_WAIT_S)))
        classes, node_names = describe_clients(grid, nodes, config, known)
        local = local_model(config, classes)
        load_exchanged(local, None)
        initial = {k: v.detach().clone() for k, v in local.model.state_dict().items() if k in local.exchanged}
        started = time.time()
        with tqdm(total=config.max_rounds, desc="federated rounds", unit="round", dynamic_ncols=True) as progress:
            results = server_loop(grid, config, classes, initial, run_dir, resume, progress, node_names)
        if not results["clients"]:
            raise UserError(f"no client sent its final report; the rounds are kept in {run_dir / 'rounds'}, "
                            f"continue with --resume")
        results["engine"] = "deployment"
        load_exchanged(local, results["best_weights"])
        write_federated_run(config, local, classes, results, initial, union_test(results["clients"], classes),
                            time.time() - started, run_dir)
    except UserError as error:
        # The submitting side reads this line from the run's log.
        print(f"transferkit: error: {error}", file=sys.stderr, flush=True)
        raise


# -- submitting a run ---------------------------------------------------------------------------------

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "transferkit-federation"
version = "1.0.0"
description = "transferkit federated fine-tuning (generated by transferkit federate --superlink)"
license = "Apache-2.0"
# No dependencies: every SuperLink and SuperNode machine runs the transferkit already installed there, and
# the SuperLink is started with --disable-runtime-dependency-installation (offline machines cannot install).
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "transferkit"

[tool.flwr.app.components]
serverapp = "transferkit.federated.deployment:server_app"
clientapp = "transferkit.federated.deployment:client_app"

[tool.flwr.app.config]
federation = '''{federation}'''
resume = {resume}
wait-s = {wait}
"""


def _absolute_data_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Data paths that exist here, made absolute: the server and loopback clients run in other directories."""
    def fix(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: str(Path(v).resolve()) if k in ("train", "test") and isinstance(v, str) and Path(v).exists() else v
                for k, v in entry.items()}

    values = dict(values)
    if values.get("data"):
        values["data"] = fix(values["data"])
    if values.get("clients"):
        values["clients"] = [fix(c) for c in values["clients"]]
    return values


def check_superlink(superlink: str, insecure: bool, root_certificates: str | None) -> str:
    """The ``flwr`` command, once the SuperLink's address, TLS choice and reachability are fine (checked before
    anything is written)."""
    if not insecure and not root_certificates:
        raise UserError("--superlink needs --insecure (no TLS, e.g. loopback) or --root-certificates CA.pem")
    if root_certificates and not Path(root_certificates).is_file():
        raise UserError(f"--root-certificates {root_certificates} does not exist: give the SuperLink's CA certificate (PEM)")
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if flwr is None:
        raise UserError("the flwr command is not installed: pip install 'transferkit[federated]'")
    host, _, port = superlink.rpartition(":")
    if not port.isdigit():
        raise UserError(f"--superlink '{superlink}' is not host:port (the SuperLink's Control API, e.g. 127.0.0.1:9093)")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as error:
        raise UserError(f"SuperLink {superlink} is not reachable ({error.strerror or error}): start flower-superlink, "
                        f"and give its Control API address (default port 9093)") from None
    return flwr


def submit(config: FederatedConfig, run_dir: Path, superlink: str, *, insecure: bool, root_certificates: str | None,
           resume: bool, wait_s: float = NODE_WAIT_S) -> None:
    """Build the Flower app for this federation and run it on the SuperLink at ``superlink`` (its Control
    API, host:port) with ``flwr run``, streaming its log; the ServerApp writes ``run_dir``."""
    flwr = check_superlink(superlink, insecure, root_certificates)
    values = _absolute_data_paths(config.to_dict())
    values["out"] = str(run_dir.resolve())
    federation = json.dumps(values, default=str)
    if "'''" in federation:
        raise UserError("the federated config holds ''' in a value: rename that file or column")
    app = run_dir / "flower-app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_PYPROJECT.format(federation=federation, resume=str(resume).lower(),
                                                              wait=float(wait_s)), encoding="utf-8")
    with tempfile.TemporaryDirectory() as home:
        connection = [f'address = "{superlink}"'] + (["insecure = true"] if insecure else
                                                     [f'root-certificates = "{Path(root_certificates).resolve()}"'])
        Path(home, "config.toml").write_text('[superlink]\ndefault = "transferkit"\n\n[superlink.transferkit]\n'
                                             + "\n".join(connection) + "\n", encoding="utf-8")
        env = {**os.environ, "FLWR_HOME": home, "FLWR_TELEMETRY_ENABLED": "0",
               "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
        # The run's log is shown as it comes (a federation can take hours) and kept to explain a failure.
        process = subprocess.Popen([flwr, "run", str(app), "transferkit", "--stream"], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = []
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
        process.wait()
    output = "".join(lines)
    if process.returncode != 0 or not (run_dir / "metrics.json").is_file():
        reason = [line for line in output.splitlines() if "transferkit: error:" in line]
        if reason:
            raise UserError(reason[-1].split("transferkit: error:", 1)[1].strip())
        unreachable = "unavailable" in output or "Connection" in output and process.returncode != 0
        resumable = state_path(run_dir).is_file()
        raise UserError(f"the federated run on SuperLink {superlink} did not finish"
                        + (": the SuperLink is not reachable there (start flower-superlink, check the Control API "
                           "address, default port 9093)" if unreachable else
                           f"; its log is above (run_dir {run_dir}; the ServerApp writes there, on the SuperLink's machine)"
                           + (f"; the finished rounds are kept: continue with --resume --out {run_dir} and the same --superlink"
                              if resumable else "")))

