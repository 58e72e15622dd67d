"""`trace-dist tune` end to end on real Ray, three searches: a grid search stopped with Ctrl-C and
resumed (results, best.yaml), the shipped quick search (Optuna + ASHA, 2-worker DeepSpeed ZeRO-2
trials, a Pareto front, nothing but 127.0.0.1 on the wire), and a two-node cluster whose trial
loses a worker and resumes from its checkpoint."""

import csv
import ipaddress
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from trace_dist.ports import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def write_search(tmp_path, data, space, **fields) -> Path:
    doc = {
        "base": {"config": [str(REPO / "configs/tiny.yaml")],
                 "overrides": {"data.path": str(data), "train.max_steps": 4, "train.eval_interval": 2,
                               "train.eval_batches": 1, "train.samples_to_log": 2, "checkpoint.interval": 2,
                               "zero.stage": 2}},
        "space": space, "search": {"algorithm": "grid"}, "scheduler": {"type": "fifo"}, "workers": 2, **fields,
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def tune_cmd(search: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trace_dist", "tune", "--config", str(search), "--output", str(out), *extra]


def attempts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_grid_search_resumes_reports_and_its_best_config_trains(tiny_data, tmp_path):
    # One worker per trial: what is tested here is Tune's experiment state and the results; the
    # worker group (and its restart after a failure) is tested on two nodes below.
    search = write_search(tmp_path, tiny_data, space={"data.segment": {"grid": ["fixed:8", "fixed:16"]}},
                          max_concurrency=1, workers=1)
    out = tmp_path / "out"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(tune_cmd(search, out), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    # With one trial at a time, trial 1 starting means trial 0 has finished.
    while not list((out / "trials").glob("*_00001/attempts.jsonl")):
        assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(1)
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    assert first.wait(timeout=300) == 130
    log.close()
    with open(out / "results.csv") as f:
        assert sorted(r["status"] for r in csv.DictReader(f)) == ["completed", "unfinished"]
    (done,) = list((out / "trials").glob("*_00000"))
    assert len(attempts(done)) == 1 and steps(done) == [1, 2, 3, 4]

    proc = subprocess.run(tune_cmd(search, out, "--resume"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(attempts(done)) == 1 and steps(done) == [1, 2, 3, 4]  # the finished trial did not run again
    (resumed,) = list((out / "trials").glob("*_00001"))
    assert len(attempts(resumed)) >= 2 and steps(resumed)[-1] == 4
    assert list((done / "tensorboard").glob("events.out.tfevents.*"))

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["data.segment"] for r in rows) == ["fixed:16", "fixed:8"]
    assert {r["status"] for r in rows} == {"completed"}
    for r in rows:  # the objective is val_bpb (bits/byte of the bound); val_ppl_bound is exp of the per-token loss
        assert float(r["objective"]) == float(r["val_bpb"])
        assert float(r["val_ppl_bound"]) == pytest.approx(2.718281828 ** float(r["val_loss"]), rel=1e-4)
    best = min(rows, key=lambda r: float(r["objective"]))
    assert json.loads((out / "results.json").read_text())["best_trial"] == best["trial"]
    assert any(line.split()[:3] == ["trial", "status", "step"] for line in proc.stdout.splitlines())  # the table
    assert f"best trial {best['trial']}" in proc.stdout
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    # best.yaml is the best trial's full config, ready for `trace-dist train`.
    from trace_dist.config import load_config

    cfg = load_config(out / "best.yaml")
    assert cfg.data.segment == best["data.segment"]
    assert cfg.train.output_dir == str(out / "best") and cfg.zero.stage == 2
    # `trace-dist train` takes it: every check it makes before it starts a process (config, data,
    # tokenizer) passes. (That a config file trains is tested throughout tests/test_launcher.py.)
    train = subprocess.run([sys.executable, "-m", "trace_dist.cli", "train", "--config", str(out / "best.yaml"),
                            "--dry-run"], capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert str(out / "best" / "config.yaml") in train.stdout.split()


# ------------------------------------------------------------------ the shipped quick search
def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def system_nameservers() -> set[str]:
    lines = Path("/etc/resolv.conf").read_text().splitlines() if Path("/etc/resolv.conf").exists() else []
    return {f.split()[1] for f in lines if f.startswith("nameserver") and len(f.split()) > 1}


def is_name_lookup(sock: tuple, nameservers: set[str]) -> bool:
    """A UDP query to this machine's own resolver. torch's TCPStore asks it, through getnameinfo,
    for the name of the store's address (a PTR query for 127.0.0.1) whenever a rank connects:
    glibc does not match the address it connects to, ::ffff:127.0.0.1, with /etc/hosts'
    127.0.0.1 line. That is the resolver the machine's owner configured, not a Ray or trial
    connection, and no code of ours can stop it."""
    _name, status, _lip, rip, rport = sock
    return status == "NONE" and rport == 53 and rip in nameservers


class SocketWatch(threading.Thread):
    """Every inet socket of a process tree (the search, Ray's daemons, every worker), sampled
    every 0.2 s while the root process runs: {(process name, status, local ip, remote ip, remote port)}."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.seen: set[tuple] = set()

    def run(self):
        while self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE:
            try:
                tree = {p.pid: p for p in [self.root, *self.root.children(recursive=True)]}
            except psutil.Error:
                return
            # One system-wide read of the socket tables per sample (per process, each call re-reads
            # them all: ~15 s of CPU over a search).
            for c in psutil.net_connections(kind="inet"):
                if c.pid in tree and c.laddr:
                    try:
                        name = tree[c.pid].name()
                    except psutil.Error:  # it ended meanwhile
                        continue
                    self.seen.add((name, c.status, c.laddr.ip, *(c.raddr or (None, None))))
            time.sleep(0.2)


def test_quick_search_optuna_asha_pareto_and_only_loopback_sockets(tiny_data, tmp_path):
    """configs/tune/quick.yaml as shipped, data, step count and number of trials from the command line."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trace_dist", "tune", "--config", str(REPO / "configs/tune/quick.yaml"),
           "--output", str(out), "--trials", "2", f"data.path={tiny_data}", "train.max_steps=16"]
    log = open(tmp_path / "tune.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    watch = SocketWatch(proc.pid)
    watch.start()
    try:
        rc = proc.wait(timeout=1200)
    finally:
        proc.kill()
        log.close()
    watch.join(timeout=10)
    text = (tmp_path / "tune.log").read_text()
    assert rc == 0, text[-4000:]

    # Nothing listened on or talked to anything but 127.0.0.0/8, and the watch saw Ray's daemons
    # and the trial workers (the DeepSpeed ranks) at work.
    nameservers = system_nameservers()
    outside = sorted(s for s in watch.seen if (not is_loopback(s[2]) or (s[3] and not is_loopback(s[3])))
                     and not is_name_lookup(s, nameservers))
    assert not outside, outside
    names = {s[0] for s in watch.seen}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::RayTrainWorker") for n in names), names
    assert any(s[1] == "LISTEN" and s[0].startswith("ray::RayTrainWorker") for s in watch.seen)  # gloo, the store

    # The command-line overrides reached the base config and were recorded.
    recorded = yaml.safe_load((out / "search.yaml").read_text())
    assert recorded["base"]["overrides"]["data.path"] == str(tiny_data)
    assert recorded["search"]["algorithm"] == "optuna" and recorded["scheduler"]["type"] == "asha"

    # Optuna sampled 2 distinct points of the space (--trials 2); ASHA let them run to a rung (step 8) at least.
    assert recorded["trials"] == 2
    trials = json.loads((out / "results.json").read_text())["trials"]
    assert len(trials) == 2 and {t["status"] for t in trials} <= {"completed", "stopped"}, trials
    betas = [t["params"]["kl.beta"] for t in trials]
    assert len(set(betas)) == 2 and all(0.1 <= b <= 1.0 for b in betas)
    assert all(t["step"] >= 8 for t in trials) and any(t["status"] == "completed" for t in trials)

    # A real Pareto plot: every trial reported finite diversity of its prior samples.
    plotted = [t for t in trials if all(math.isfinite(t["metrics"].get(k, math.nan)) for k in ("val_bpb", "distinct_2"))]
    assert len(plotted) >= 2 and any(t["pareto"] for t in plotted), trials
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # The table carries every validation metric the trainer reported, the KL floor among them.
    with open(out / "results.csv") as f:
        header = next(csv.reader(f))
    assert "kl_floor" in header, header


# ------------------------------------------------------------------ a two-node cluster
def agent_ports() -> list[str]:
    """Ports Ray would otherwise take at fixed defaults, which two nodes on one machine (or other
    test runs on it) would share."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


def stop_tree(proc: subprocess.Popen) -> None:
    """End `proc` and every process it started (Ray's daemons, workers), by pid; SIGKILL after 30 s."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no '{text}' after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(1)


# `ray start --address 127.0.0.1:P` for the second node. Ray 2.60's CLI turns a loopback head
# address into the machine's external IP (where the loopback head does not listen), and the switch
# that stops it (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) also refuses to start worker nodes; so this
# runs the same CLI with the address left as given. The node then takes the address it reaches the
# head from: 127.0.0.1.
LOOPBACK_WORKER_NODE = ("import sys; from ray._private import services; "
                        "services.resolve_ip_for_localhost = lambda host: host; "
                        "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


def test_two_node_cluster_spreads_a_trials_workers_and_survives_a_worker_failure(tiny_data, tmp_path):
    """`ray start --head` + `ray start --address` (both on 127.0.0.1, one rank slot each), then
    `trace-dist tune --address`: the trial's 2 workers must run on the 2 nodes; its last rank raises
    at report 2 and Ray Train restarts the group, on both nodes again, from report 1's checkpoint."""
    ray_cli = str(Path(sys.executable).parent / "ray")  # the head: Ray's own CLI
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    nodes: list[subprocess.Popen] = []
    try:
        for name, args, env in [
            ("head", ["--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
                      "--include-dashboard", "false", "--ray-client-server-port", str(free_port()), "--num-cpus", "2"],
             {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}),  # a loopback head (see tune/cli.py)
            ("worker", ["--address", f"127.0.0.1:{port}", "--num-cpus", "1"], {}),
        ]:
            log = tmp_path / f"{name}.log"
            ray_start = [ray_cli, "start"] if name == "head" else [sys.executable, "-c", LOOPBACK_WORKER_NODE, "start"]
            nodes.append(subprocess.Popen([*ray_start, "--block", "--disable-usage-stats", *args, *agent_ports(),
                                           "--resources", json.dumps({"rank_slot": 1})],
                                          stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **env}))
            wait_for(log, "Ray runtime started", nodes[-1], timeout=240)

        search = write_search(tmp_path, tiny_data, space={"kl.beta": {"grid": [0.5]}}, max_concurrency=1,
                              resources_per_worker={"CPU": 1, "rank_slot": 1}, env={"GLOO_SOCKET_IFNAME": "lo"},
                              fault_injection={"trial": 0, "at_report": 2})
        out = tmp_path / "out"
        proc = subprocess.run(tune_cmd(search, out, "--address", f"127.0.0.1:{port}"), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (trial,) = json.loads((out / "results.json").read_text())["trials"]
        assert trial["status"] == "completed"
        workers = [json.loads(line) for line in (out / "trials" / trial["trial"] / "workers.jsonl").read_text().splitlines()]
        assert sorted(w["rank"] for w in workers) == [0, 0, 1, 1]  # two groups: the first and its restart
        for group in (workers[:2], workers[2:]):
            assert len({w["node_id"] for w in group}) == 2 and {w["node_ip"] for w in group} == {"127.0.0.1"}
        # Steps 3-4 ran twice (after the restart from step 2), and are logged once.
        run = out / "trials" / trial["trial"]
        tried = attempts(run)
        assert len(tried) == 2 and tried[0]["resume"] is None and tried[1]["resume"].endswith("step00000002")
        assert steps(run) == [1, 2, 3, 4]
    finally:
        for node in reversed(nodes):
            stop_tree(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
