"""`trace-dist tune` end to end on a real local Ray instance: 2-worker DeepSpeed ZeRO-2 trials on
tiny data, an injected worker failure retried from its checkpoint, Ctrl-C and --resume."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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


def test_grid_search_survives_a_worker_failure_and_its_best_config_trains(tiny_data, tmp_path):
    search = write_search(tmp_path, tiny_data,
                          space={"data.segment": {"grid": ["fixed:8", "fixed:16"]}, "kl.beta": {"grid": [0.5, 1.0]}},
                          max_concurrency=2, fault_injection={"trial": 1, "at_report": 2})
    out = tmp_path / "out"
    proc = subprocess.run(tune_cmd(search, out), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    assert {(r["data.segment"], float(r["kl.beta"])) for r in rows} == \
        {(s, b) for s in ("fixed:8", "fixed:16") for b in (0.5, 1.0)}
    for r in rows:  # the objective is val_ppl_bound, exp of the per-token negative ELBO
        assert float(r["objective"]) == float(r["val_ppl_bound"]) == pytest.approx(2.718281828 ** float(r["val_loss"]),
                                                                                     rel=1e-4)
    best = min(rows, key=lambda r: float(r["objective"]))
    assert json.loads((out / "results.json").read_text())["best_trial"] == best["trial"]
    assert any(line.split()[:3] == ["trial", "status", "step"] for line in proc.stdout.splitlines())  # the table
    assert f"best trial {best['trial']}" in proc.stdout
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    # The injected failure: trial 1's last rank raised at report 2 (step 4); Ray Train restarted the
    # worker group from report 1's checkpoint (step 2), so steps 3-4 ran twice, steps 1-2 once.
    trials = {r["trial"].rsplit("_", 1)[1]: out / "trials" / r["trial"] for r in rows}
    failed = attempts(trials["00001"])
    assert len(failed) == 2 and failed[0]["resume"] is None and failed[1]["resume"].endswith("step00000002")
    assert steps(trials["00001"]) == [1, 2, 3, 4, 3, 4]
    for index in ("00000", "00002", "00003"):
        assert len(attempts(trials[index])) == 1 and steps(trials[index]) == [1, 2, 3, 4]
    assert list((trials["00000"] / "tensorboard").glob("events.out.tfevents.*"))

    # best.yaml is the best trial's full config, ready for `trace-dist train`.
    from trace_dist.config import load_config

    cfg = load_config(out / "best.yaml")
    assert (cfg.data.segment, cfg.kl.beta) == (best["data.segment"], float(best["kl.beta"]))
    assert cfg.train.output_dir == str(out / "best") and cfg.zero.stage == 2
    train = subprocess.run([sys.executable, "-m", "trace_dist.train", "--config", str(out / "best.yaml"),
                            "train.max_steps=2"], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (out / "best" / "checkpoints" / "latest").read_text() == "step00000002"


def test_interrupted_search_resumes_without_redoing_finished_trials(tiny_data, tmp_path):
    # One worker per trial: what is tested here is Tune's experiment state, not the worker group.
    search = write_search(tmp_path, tiny_data, space={"kl.beta": {"grid": [0.5, 1.0]}}, max_concurrency=1, workers=1)
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
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["kl.beta"]) for r in rows) == [0.5, 1.0] and {r["status"] for r in rows} == {"completed"}
    assert len(attempts(done)) == 1 and steps(done) == [1, 2, 3, 4]  # the finished trial did not run again
    (resumed,) = list((out / "trials").glob("*_00001"))
    assert len(attempts(resumed)) >= 2 and steps(resumed)[-1] == 4

