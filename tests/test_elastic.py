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
def test_torchrun_restarts_after_a_rank_is_killed_and_reproduces_the_curve(tiny_data, tmp_path):
    reference = tmp_path / "reference"
    r = subprocess.run(torchrun(tiny_data, reference), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "elastic"
    log = (tmp_path / "elastic.log").open("w+")
    proc = subprocess.Popen(torchrun(tiny_data, out, "--max-restarts", "1"), stdout=log, stderr=subprocess.STDOUT)
    try:
        latest, deadline = out / "checkpoints" / "latest", time.time() + 300
        while not latest.exists():                            # the first checkpoint (step 2) is complete
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the deadline"
            time.sleep(0.05)
        rank_process(psutil.Process(proc.pid), 1).kill()      # SIGKILL one rank mid-run
        killed_at = len(curve(out))
        assert proc.wait(600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    text = log.read()
    assert killed_at < 8, "the run finished before the kill"
    assert "resumed from" in text, text[-3000:]                # the restarted group resumed, not restarted cold
    assert curve(out) == curve(reference)                      # fp32, ZeRO-2: exact
