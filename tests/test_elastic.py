"""A rank that dies does not end the job: torchrun's elastic restarts (`--max-restarts`) bring the
whole group back, it resumes from the newest complete checkpoint, and the loss curve equals the
uninterrupted run's exactly (batches and noise are functions of (seed, rank, position))."""

import subprocess
import sys
import time

import psutil
import pytest

from test_train import curve, overrides
from trace_dist.distributed import free_port

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
@pytest.mark.xfail(strict=False, reason="OPEN (docs/STATUS.md): the restarted group often fails in DeepSpeed's "
                                        "start-up (gloo connectFullMesh refused, a late rank); under investigation")
def test_torchrun_restarts_after_a_rank_is_killed_and_reproduces_the_curve(tiny_data, tmp_path):
    reference = tmp_path / "reference"
    r = subprocess.run(torchrun(tiny_data, reference), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    # Known flake (docs/STATUS.md): on the loaded 2-core box the restarted group sometimes fails in
    # DeepSpeed's start-up (gloo connectFullMesh refused: one new rank is late). The scenario runs at
    # most twice; one clean restart with the exact curve is required.
    failures = []
    for attempt in range(2):
        ok, detail = _kill_one_rank_and_restart(tiny_data, tmp_path / f"elastic{attempt}")
        if ok:
            assert curve(tmp_path / f"elastic{attempt}") == curve(reference)   # fp32, ZeRO-2: exact
            return
        failures.append(detail)
    pytest.fail("the restarted job failed twice:\n" + "\n---\n".join(failures))


def _kill_one_rank_and_restart(data, out) -> tuple[bool, str]:
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
    if rc != 0:
        return False, f"exit {rc}: " + text[-2000:]
    assert "resumed from" in text, text[-3000:]                # the restarted group resumed, not restarted cold
    return True, ""


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
