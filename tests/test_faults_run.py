"""Run-lifecycle faults (fault matrix 2026-11, cases T7-T10, R1, R2, R6, R8, R9, C8): each reproduced
with real processes and files; the message is one clear line, the exit code is 2 for the user's
mistakes, and nothing that was written before is lost."""

import json
import subprocess
import sys

import pytest

from dist_utils import run_ranks
from test_train import _train, curve, overrides


def run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def train_cmd(data, out, *extra):
    return [sys.executable, "-m", "trace_dist.cli", "train", "--config", "configs/tiny.yaml", "--nproc", "1",
            *overrides(data, out, *extra)]


@pytest.fixture(scope="module")
def conditional_data(tmp_path_factory):
    """A prepared prompt -> target dataset (jsonl input), built like tiny_data."""
    from conftest import tiny_corpus
    from trace_dist.data.prepare import main as prepare

    root = tmp_path_factory.mktemp("cond_data")
    docs = tiny_corpus(200, seed=1)
    lines = [json.dumps({"prompt": a.split(".")[0] + ".", "target": b}) for a, b in zip(docs, docs[1:])]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    rc = prepare(["--input", str(root / "pairs.jsonl"), "--output", str(root / "data"), "--conditional",
                  "--vocab-size", "512", "--shard-samples", "64", "--valid-fraction", "0.1", "--test-fraction", "0.1"])
    assert rc == 0
    return root / "data"


# ------------------------------------------------------------------ T9, T10: validation of what is trained
def test_max_new_tokens_beyond_block_size_is_refused_before_start(tiny_data, tmp_path):
    r = run(train_cmd(tiny_data, tmp_path / "run", "generation.max_new_tokens=300"))
    assert r.returncode == 2 and "generation.max_new_tokens (300) exceeds model.block_size (128)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_conditional_model_trains_through_validation_and_checkpoint(conditional_data, tmp_path):
    out = tmp_path / "run"
    result, = run_ranks(_train, 1, conditional_data, out,
                        ["model.conditional=true", "train.max_steps=2", "train.eval_interval=2", "checkpoint.interval=2",
                         "generation.max_new_tokens=128"], tmp_path=tmp_path)
    assert result["status"] == "completed" and result["last_checkpoint"] == 2
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["step"] == 2 and "prompt" in s for s in samples)
