"""Flower's Deployment Engine on this machine's loopback: a real SuperLink, one real SuperNode per client (each
reading its own data file through --node-config), and `transferkit federate --superlink` submitting the run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_sentences, write_table

pytest.importorskip("flwr")
BIN = Path(sys.executable).parent
# `flower-supernode` with its heartbeat every 10 s (Flower's floor) instead of its hard-coded 30 s: the SuperLink
# declares a silent node offline after two missed intervals, so the killed client's round goes on after ~20 s
# instead of ~60 s. Nothing else about the SuperNode differs.
# (The interval the node announces and the one its sender waits are two imports of the same constant.)
SUPERNODE = ("import sys; import flwr.client.grpc_rere_client.connection as announced; "
             "import flwr.supercore.heartbeat as sender; "
             "announced.HEARTBEAT_DEFAULT_INTERVAL = sender.HEARTBEAT_DEFAULT_INTERVAL = 10; "
             "from flwr.supernode.cli import flower_supernode; sys.exit(flower_supernode())")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited early: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"port {port} never opened: {log.read_text()[-2000:]}")


@pytest.fixture()
def federation(tmp_path):
    """A SuperLink and a way to start SuperNodes, all stopped at the end."""
    control, fleet, serverappio = _free_ports(3)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}
    processes = []

    def start(command, name, home):
        log = tmp_path / f"{name}.log"
        # A session of its own: killing the group takes the SuperNode's ClientApp process with it.
        process = subprocess.Popen(command, env=dict(env, FLWR_HOME=str(tmp_path / home)), stdout=open(log, "w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(process)
        return process, log

    link, log = start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                       "--control-api-address", f"127.0.0.1:{control}", "--fleet-api-address", f"127.0.0.1:{fleet}",
                       "--serverappio-api-address", f"127.0.0.1:{serverappio}"], "superlink", "superlink-home")
    _wait_for_port(control, link, log)

    def supernode(partition: int, node_config: str):
        (appio,) = _free_ports(1)
        return start([sys.executable, "-c", SUPERNODE, "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                      "--clientappio-api-address", f"127.0.0.1:{appio}", "--node-config", node_config],
                     f"supernode-{partition}", f"supernode-{partition}-home")

    yield {"control": f"127.0.0.1:{control}", "supernode": supernode, "logs": tmp_path}
    # Whole process groups: the SuperLink's ServerApp and the SuperNodes' ClientApps are child processes.
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            # Short: a Flower process that ignores SIGTERM held the teardown for the whole wait (20 s in one CI run);
            # nothing here tests a graceful stop.
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def test_deployed_federation_survives_a_killed_client_and_resumes_after_a_stop(tiny_bert_dir, tmp_path, federation):
    """Three SuperNodes: two read files "on their own machines" (data-config; the server's config names other
    paths), the third reads the path the config names and is killed while it trains in round 1. Round 1 goes
    on with the other two and names the dropped client. Then `flwr stop` ends the run on the SuperLink: the
    submitting command exits 2 saying the rounds are kept, and `--resume` continues after round 1 with the two
    clients still there. Local DP is on. Each client keeps its own head (FedPer); the two live SuperNodes name a
    state-dir, so the resumed run (a new Flower run, empty client state) gives them their heads back from disk."""
    nodes, entries = [], []
    for i in range(3):
        data = write_table(tmp_path / f"site{i}.csv", make_sentences(80, seed=20 + i))
        if i < 2:
            (tmp_path / f"site{i}.yaml").write_text(f"train: {data}\n")
            nodes.append(federation["supernode"](i, f'partition-id={i} data-config="{tmp_path / f"site{i}.yaml"}" '
                                                   f'state-dir="{tmp_path / "state"}"'))
            entries.append(f"  - {{name: site{i}, train: /elsewhere/site{i}.csv}}")
        else:
            nodes.append(federation["supernode"](i, f"partition-id={i}"))
            entries.append(f"  - {{name: site{i}, train: {data}}}")
    config = tmp_path / "fed.yaml"
    config.write_text(f"model: {tiny_bert_dir}\nstrategy: full\nlr: 1.0e-3\nbatch_size: 16\nmax_rounds: 2\n"
                      f"round_patience: null\nround_timeout_s: 60\ndp_clipping_norm: 5.0\ndp_epsilon: 1000\n"
                      f"personal: head\nclients:\n" + "\n".join(entries) + f"\nout: {tmp_path / 'run'}\n")
    submit = subprocess.Popen([sys.executable, "-m", "transferkit", "federate", "--config", str(config),
                               "--superlink", federation["control"], "--insecure"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim, victim_log = nodes[2]
    deadline = time.time() + 600
    while "train message" not in victim_log.read_text():  # its first round's training has started
        assert time.time() < deadline and submit.poll() is None, victim_log.read_text()[-2000:] + (submit.stdout.read() if submit.poll() is not None else "")
        time.sleep(0.5)
    os.killpg(victim.pid, signal.SIGKILL)
    state = tmp_path / "run" / "rounds" / "state.json"
    while not state.is_file():  # round 1 is checkpointed
        assert time.time() < deadline and submit.poll() is None
        time.sleep(0.2)
    home = tmp_path / "flwr-cli"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "{federation["control"]}"\ninsecure = true\n')
    flwr = {"env": {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}, "capture_output": True,
            "text": True, "timeout": 60, "check": True}
    runs = json.loads(subprocess.run([str(BIN / "flwr"), "ls", "--format", "json"], **flwr).stdout)["runs"]
    (run_id,) = [r["run-id"] for r in runs if r["status"].startswith("running")]
    subprocess.run([str(BIN / "flwr"), "stop", str(run_id)], **flwr)
    output, _ = submit.communicate(timeout=300)
    assert submit.returncode == 2 and f"continue with --resume --out {tmp_path / 'run'}" in output, output[-3000:]
    assert "dropped: site2" in output and not (tmp_path / "run" / "metrics.json").exists()
    rounds_done = len(json.loads(state.read_text())["history"])  # 1, or 2 if the stop came after round 2's save

    resumed = subprocess.run([sys.executable, "-m", "transferkit", "federate", "--resume", "--out", str(tmp_path / "run"),
                              "--superlink", federation["control"], "--insecure"], capture_output=True, text=True,
                             timeout=900)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(federation["logs"].glob("*.log")))
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-2000:] + logs
    output = resumed.stdout + resumed.stderr
    assert f"resuming after round {rounds_done}" in output and "state-dir" in output

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["engine"] == "deployment" and metrics["rounds"] == 2
    first, second = metrics["history"]
    assert first["clients_sent"] == 3 and first["clients_trained"] == 2 and set(first["failures"]) == {"site2"}
    # Round 2 trains on the two live clients and names nobody else (the resumed run did not wait for site2).
    assert second["clients_trained"] == 2 and set(second["failures"]) <= {"site2"}
    assert metrics["dropped_clients"] == ["site2"] and set(metrics["per_client"]) == {"site0", "site1"}
    assert "global model test accuracy" in output
    test_examples = sum(r["test_examples"] for r in metrics["per_client"].values())
    assert metrics["test"]["examples"] == test_examples == 16  # 10% of each reporting client's 80
    mean = sum(r["global"] * r["test_examples"] for r in metrics["per_client"].values()) / test_examples
    assert abs(metrics["test"]["accuracy"] - mean) < 1e-9  # the union's accuracy, from the clients' confusion matrices
    assert metrics["privacy"]["clipping_norm"] == 5.0 and metrics["privacy"]["noise_std"] > 0
    assert metrics["privacy"]["total"]["rounds"] == 2 and metrics["privacy"]["total"]["basic_composition"]["epsilon"] == 2000
    assert "LocalDpMod: parameters are clipped" in (federation["logs"] / "supernode-0.log").read_text()

    # Both heads trained in both rounds: the one of round 1 came back from the state-dir after the stop.
    assert {name: r["personal_rounds"] for name, r in metrics["per_client"].items()} == {"site0": 2, "site1": 2}
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["run-client-0", "run-client-1"]
    import transferkit
    from transferkit.errors import UserError

    with pytest.raises(UserError, match="personal head on each client"):  # no single model to predict with
        transferkit.load_run(tmp_path / "run")


def test_an_unreachable_superlink_is_one_clear_line(tiny_bert_dir, tmp_path):
    (port,) = _free_ports(1)
    data = write_table(tmp_path / "d.csv", make_sentences(40))
    result = subprocess.run([sys.executable, "-m", "transferkit", "federate", "--model", str(tiny_bert_dir),
                             "--client", f"name=a,train={data}", "--client", f"name=b,train={data}",
                             "--out", str(tmp_path / "run"), "--superlink", f"127.0.0.1:{port}", "--insecure"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "not reachable" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run").exists()  # nothing written: the same command works once the SuperLink runs
    result = subprocess.run([sys.executable, "-m", "transferkit", "federate", "--model", str(tiny_bert_dir),
                             "--client", f"name=a,train={data}", "--client", f"name=b,train={data}",
                             "--out", str(tmp_path / "run"), "--superlink", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--insecure" in result.stderr and not (tmp_path / "run").exists()



def test_a_resumed_run_goes_on_without_a_node_that_died_after_it_was_listed(tiny_bert_dir, tmp_path):
    """A killed SuperNode stays listed until it has missed two heartbeats; asked to describe itself, it answers
    with Flower's 'Node Unavailable' error. Round 1 cannot start without it (its labels make the head); a resumed
    run has its classes and goes on with the others."""
    from types import SimpleNamespace

    from transferkit.errors import UserError
    from transferkit.federated import FederatedConfig
    from transferkit.federated.deployment import describe_clients

    def reply(node, client=None):
        if client is None:
            return SimpleNamespace(has_error=lambda: True, metadata=SimpleNamespace(src_node_id=node),
                                   error=SimpleNamespace(reason="Node Unavailable"))
        return SimpleNamespace(has_error=lambda: False, metadata=SimpleNamespace(src_node_id=node),
                               content={"metrics": {"client": client}, "labels": {"labels": '["neg", "pos"]'}})

    grid = SimpleNamespace(send_and_receive=lambda messages, timeout: [reply(11, 0), reply(12, 1), reply(13)])
    config = FederatedConfig.from_dict({"model": str(tiny_bert_dir), "clients": [
        {"name": f"site{i}", "train": str(tmp_path / f"site{i}.csv")} for i in range(3)]}, source="t")
    classes, names = describe_clients(grid, [11, 12, 13], config, known_classes=["neg", "pos"])
    assert classes == ["neg", "pos"] and names == {11: "site0", 12: "site1"}
    with pytest.raises(UserError, match="failed before round 1: Node Unavailable"):
        describe_clients(grid, [11, 12, 13], config)
