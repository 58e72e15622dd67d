"""Each benchmark runs end to end in its smallest mode and ends with one parseable JSON line holding the
promised figures (no timing assertions: only structure and exact byte accounting)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(script: str, *args: str, timeout: float = 300) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1]
    return json.loads(last)


def test_trainer_overhead_smoke():
    fig = run("trainer_overhead.py", "--smoke")
    assert fig["train_over_bare_ratio"] > 0
    assert fig["trainer_tokens_per_s"] > 0 and fig["bare_tokens_per_s"] > 0
    assert fig["bookkeeping_ms_per_step"] >= 0  # step wall time minus the trainer's own step timer
    assert fig["train_over_bare_ratio"] == pytest.approx(fig["trainer_tokens_per_s"] / fig["bare_tokens_per_s"],
                                                         rel=1e-2)


def test_compute_efficiency_smoke():
    from trace_dist.model.trace import TRACE
    from trace_dist.model.config import ModelConfig
    from trace_dist.vocab import Vocab

    fig = run("compute_efficiency.py", "--smoke")
    model = TRACE(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, latent_size=16, max_segments=4),
                  Vocab(size=512, bos=1, eos=2, pad=0, sep=3))
    assert fig["flops_per_token"] == model.flops_per_token()
    assert 0 < fig["mfu_pct"] == pytest.approx(100 * fig["achieved_gflops"] / fig["peak_matmul_gflops"], rel=1e-2)
    assert sum(fig["time_split_pct"].values()) == pytest.approx(100, abs=1)


@pytest.mark.slow
def test_zero_memory_smoke():
    fig = run("zero_memory.py", "--smoke", "--steps", "2", timeout=600)
    n = fig["n_params"]
    kinds = fig["state_bytes_by_kind"]
    # ZeRO-0, fp32 AdamW: params + grads 4 B each, exp_avg + exp_avg_sq 8 B (+ a 'step' scalar per tensor)
    assert kinds["zero0"]["params"] == kinds["zero0"]["grads"] == 4 * n
    assert kinds["zero0"]["optimizer"] == pytest.approx(8 * n, rel=1e-3)
    # ZeRO-3 on 2 ranks holds half the parameters and half the optimizer state
    assert kinds["zero3"]["params"] == pytest.approx(2 * n, rel=1e-3)
    assert kinds["zero3"]["optimizer"] == pytest.approx(4 * n, rel=1e-3)
    assert fig["zero3_over_zero0_bytes"] == pytest.approx(fig["zero3_state_bytes"] / fig["zero0_state_bytes"],
                                                          rel=1e-3)
    # ZeRO-0 all-reduces the gradients once; ZeRO-3 reduce-scatters them and all-gathers the parameters
    comm = fig["comm_bytes_by_op"]
    assert comm["zero0"]["all_reduce"] == pytest.approx(4 * n, rel=1e-3)
    assert comm["zero3"]["reduce_scatter_tensor"] == pytest.approx(4 * n, rel=1e-3)
    assert comm["zero3"]["all_gather_into_tensor"] >= 4 * n


def test_run_all_collects_results(tmp_path):
    summary = run("run_all.py", "--quick", "--only", "bench_self_bleu.py", "--out-dir", str(tmp_path))
    assert summary["benchmarks"] == 1 and summary["failed"] == []
    report = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "cores", "torch", "deepspeed"} <= set(report["machine"])
    assert "abs_diff" in report["benchmarks"]["bench_self_bleu.py"]["figures"]
    md = (tmp_path / "results.md").read_text()
    assert "| bench_self_bleu.py | abs_diff |" in md and ("| met |" in md or "| MISSED |" in md)


def test_latent_cost_smoke():
    fig = run("latent_cost.py", "--smoke")
    assert fig["trace_over_lm_step_ratio"] > 1  # the encoder and the latents cost something
