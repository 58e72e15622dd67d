"""A rank that dies does not end the job: torchrun's elastic restarts (`--max-restarts`) bring the
whole group back, it resumes from the newest complete checkpoint, and the loss curve equals the
uninterrupted run's exactly (batches and noise are functions of (seed, rank, position))."""

import subprocess
import sys
import time

import psutil
import pytest

from test_train import curve, overrides
from trace_dist.ports import free_port

STEPS = ["train.max_steps=8", "checkpoint.interval=2", "train.eval_interval=4"]


def torchrun(data, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), *extra, "-m", "trace_dist.train", "--config", "configs/tiny.yaml",
            *overrides(data, out, *STEPS)]


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    for p in launcher.children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    raise LookupError(f"no rank {rank} under pid {launcher.pid}")


@pytest.mark.slow
def test_torchrun_restarts_after_a_rank_is_killed_and_reproduces_the_curve(tiny_data, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "elastic"
    r = subprocess.run(torchrun(tiny_data, reference), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _kill_one_rank_and_restart(tiny_data, out)
    assert curve(out) == curve(reference)   # fp32, ZeRO-2: exact


def _join_attempt(rank: int, port: int, attempt: int, late: float, result: str) -> None:
    """One worker of torchrun attempt `attempt` (the agent's store is the test's): attempt 0 joins as
    torch's env:// rendezvous does, a later one through init_distributed; rank 1 comes `late`."""
    import os

    import torch
    import torch.distributed as dist

    from trace_dist import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                      TORCHELASTIC_RESTART_COUNT=str(attempt))
    if attempt > 0:
        import deepspeed  # noqa: F401  (imported before the wait, so that `late` is the only skew)
    time.sleep(late * rank)
    if attempt == 0:
        dist.init_process_group("gloo")
    else:
        distributed.init_distributed()
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()  # exiting with a live gloo group may abort in its destructor
    with open(f"{result}.{rank}", "w") as f:
        f.write(str(t.item()))


@pytest.mark.slow
def test_a_restarted_group_does_not_read_the_previous_attempts_addresses(tmp_path):
    """torchrun's agent keeps one store across restarts and torch's env:// join reuses its keys, so a
    restarted group could read the dead group's gloo addresses (the flake this file once had:
    "connectFullMesh ... Connection refused", or both ranks waiting 30 minutes). Whether a stale
    read fails depends on which side of each pair gloo makes connect, so the test checks the cause
    itself: every attempt joins on keys of its own (the store grows), and its group works."""
    import multiprocessing as mp
    from datetime import timedelta

    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))  # the agent's, kept across attempts
    ctx = mp.get_context("spawn")
    keys = [store.num_keys()]
    for attempt, late in ((0, 0.0), (1, 2.0), (2, 2.0)):
        procs = [ctx.Process(target=_join_attempt, args=(r, port, attempt, late, str(tmp_path / f"a{attempt}")))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            if p.is_alive():
                for q in procs:
                    q.kill()
                pytest.fail(f"attempt {attempt}: the group did not form within 60 s")
        assert [p.exitcode for p in procs] == [0, 0], f"attempt {attempt} failed"
        assert [(tmp_path / f"a{attempt}.{r}").read_text() for r in range(2)] == ["2.0", "2.0"]
        keys.append(store.num_keys())
    assert keys[1] < keys[2] < keys[3], f"a restart reused the previous attempt's keys (store sizes {keys})"


def _kill_one_rank_and_restart(data, out) -> None:
    log = (out.parent / f"{out.name}.log").open("w+")
    proc = subprocess.Popen(torchrun(data, out, "--max-restarts", "1"), stdout=log, stderr=subprocess.STDOUT)
    try:
        latest, deadline = out / "checkpoints" / "latest", time.time() + 300
        while not latest.exists():                            # the first checkpoint (step 2) is complete
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the deadline"
            time.sleep(0.05)
        rank_process(psutil.Process(proc.pid), 1).kill()      # SIGKILL one rank mid-run
        killed_at = len(curve(out))
        rc = proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    text = log.read()
    assert killed_at < 8, "the run finished before the kill"
    assert rc == 0, text[-3000:]
    assert "resumed from" in text, text[-3000:]                # the restarted group resumed, not restarted cold


FAKE_TRAIN = """#!/usr/bin/env bash
echo "$*" >> "$ATTEMPTS"
n=$(wc -l < "$ATTEMPTS")
[ "$n" -ge "$SUCCEED_AT" ] && exit 0
exit "$FAIL_CODE"
"""


@pytest.mark.parametrize("fail_code,succeed_at,retries,expect_rc,expect_attempts", [
    (1, 2, 2, 0, 2),        # a rank died: rerun, and the rerun finishes
    (1, 9, 2, 1, 3),        # keeps failing: 1 + RETRIES attempts, then the failure
    (2, 2, 2, 2, 1),        # a user error is not retried
    (3, 2, 2, 3, 1),        # nor a non-finite stop
])
def test_multinode_script_retries_failed_runs_only(tmp_path, fail_code, succeed_at, retries, expect_rc,
                                                   expect_attempts):
    """launch/multinode.sh around a stand-in `trace-dist` (the deepspeed launcher has no restarts)."""
    import os

    (tmp_path / "trace-dist").write_text(FAKE_TRAIN)
    (tmp_path / "trace-dist").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", ATTEMPTS=str(tmp_path / "attempts"),
               SUCCEED_AT=str(succeed_at), FAIL_CODE=str(fail_code), RETRIES=str(retries), RETRY_DELAY="0",
               NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    r = subprocess.run(["bash", "launch/multinode.sh", "hostfile", "cfg.yaml", "zero.stage=3"], env=env,
                       capture_output=True, text=True, timeout=60)
    attempts = (tmp_path / "attempts").read_text().splitlines()
    assert (r.returncode, len(attempts)) == (expect_rc, expect_attempts), r.stderr
    assert attempts[0] == ("train --config cfg.yaml --hostfile hostfile --no-ssh --node-rank 1 "
                           "--master-addr 10.0.0.1 --master-port 29500 zero.stage=3")
