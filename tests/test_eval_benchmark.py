"""benchmarks/eval_throughput.py runs end to end at its smoke size and prints its figures as JSON
(no timing assertions: the box is shared)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_eval_throughput_smoke():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_throughput.py"), "--smoke", "--threads", "1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads([ln for ln in proc.stdout.splitlines() if ln.strip()][-1])
    assert fig["documents"] == 8 and fig["same_figures"] is True and fig["prior_texts_differing"] == 0
    assert fig["train_tokens_per_s"] > 0 and fig["eval_seconds"] > 0
    assert fig["eval_iw_token_forwards_per_s"] == pytest.approx(
        fig["tokens"] * fig["iw_samples"] / fig["likelihood_seconds_batched"], rel=1e-2)
    assert fig["eval_over_train_token_ratio"] == pytest.approx(
        fig["eval_iw_token_forwards_per_s"] / fig["train_tokens_per_s"], rel=1e-2)
    assert list(fig)[-1] == "eval_over_train_token_ratio"
