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


@pytest.mark.slow
def test_conditional_model_trains_through_validation_and_checkpoint(conditional_data, tmp_path):
    out = tmp_path / "run"
    result, = run_ranks(_train, 1, conditional_data, out,
                        ["model.conditional=true", "train.max_steps=2", "train.eval_interval=2", "checkpoint.interval=2",
                         "generation.max_new_tokens=128"], tmp_path=tmp_path)
    assert result["status"] == "completed" and result["last_checkpoint"] == 2
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["step"] == 2 and "prompt" in s for s in samples)


# ------------------------------------------------------------------ R6, R8, 10: one run per run directory
def test_second_run_on_a_locked_run_directory_refuses_and_changes_nothing(tiny_data, tmp_path):
    import os
    import socket

    from trace_dist.runlock import RunLock

    out = tmp_path / "run"
    lock = RunLock.acquire(out)  # this test process is the running first run
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    try:
        for cmd in (train_cmd(tiny_data, out),
                    [sys.executable, "-m", "trace_dist.train", "--config", "configs/tiny.yaml", *overrides(tiny_data, out)]):
            r = run(cmd)
            assert r.returncode == 2, r.stderr[-2000:]
            assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in r.stderr
            assert "Traceback" not in r.stderr
        assert sorted(p.name for p in out.iterdir()) == [".run.lock", "metrics.jsonl"]
        assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    finally:
        lock.release()


def descendants(pid):
    import psutil

    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
def test_sigkill_of_the_wrapper_takes_its_ranks_along_and_a_restart_takes_over(tiny_data, tmp_path):
    import signal
    import time

    import psutil

    out = tmp_path / "run"
    args = ["train.max_steps=60", "checkpoint.interval=2", "train.samples_to_log=0"]
    cmd = train_cmd(tiny_data, out, *args)
    cmd[cmd.index("--nproc") + 1] = "2"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training did not reach step 3"
        time.sleep(0.1)
    tree = descendants(proc.pid)
    assert sum("trace_dist.train" in " ".join(p.cmdline()) for p in tree) >= 2  # the launcher and its ranks
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    # The dead wrapper's lock is taken over; the run resumes from its last complete checkpoint
    # (wherever the ranks got to before they followed the wrapper) and trains two more steps.
    last = int((out / "checkpoints" / "latest").read_text().removeprefix("step"))
    r = run(train_cmd(tiny_data, out, *args[:-1], "train.samples_to_log=0", f"train.max_steps={last + 2}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "taking over" in r.stderr and f"resumed from {out / 'checkpoints' / f'step{last:08d}'}" in r.stderr
    assert (out / "checkpoints" / "latest").read_text() == f"step{last + 2:08d}"


# ------------------------------------------------------------------ R1, R2, R9: resume falls back, logs do not repeat
def plain_train(data, out, *extra):
    return run([sys.executable, "-m", "trace_dist.train", "--config", "configs/tiny.yaml",
                *overrides(data, out, "checkpoint.interval=2", "train.samples_to_log=0", *extra)])


def steps(run_dir):
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_complete_checkpoint_and_logs_each_step_once(tiny_data, tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    r = plain_train(tiny_data, out, "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    first4 = (out / "metrics.jsonl").read_text()
    # R1: `latest` names a tag that is not there
    (ckpt / "latest").write_text("step00000009")
    r = plain_train(tiny_data, out, "train.max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "names step00000009, which is incomplete (missing)" in r.stderr
    assert "resumed from" in r.stderr and "at step 4" in r.stderr
    assert steps(out) == [1, 2, 3, 4, 5, 6] and (out / "metrics.jsonl").read_text().startswith(first4)
    losses = curve(out)
    # R2: a rank's optimizer shard of the newest checkpoint is lost
    shard, = (ckpt / "step00000006").glob("*optim_states.pt")
    shard.unlink()
    r = plain_train(tiny_data, out, "train.max_steps=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{shard.name} is missing" in r.stderr and "at step 4" in r.stderr
    # R9: steps 5 and 6 ran twice but are logged once, the earlier lines untouched, the re-run exact
    assert steps(out) == list(range(1, 9)) and (out / "metrics.jsonl").read_text().startswith(first4)
    assert curve(out)[:6] == losses
    assert (ckpt / "latest").read_text() == "step00000008"


# ------------------------------------------------------------------ T2, T7, T8, C8: refused before any process starts
def _broken_inputs(tiny_data, tmp):
    """(overrides, expected message) for each input the pre-launch check must refuse."""
    import shutil

    def data_with(name, edit):
        d = tmp / name
        shutil.copytree(tiny_data, d)
        (d / "manifest.json").write_text(edit((d / "manifest.json").read_text()))
        return d

    def no_valid(text):
        m = json.loads(text)
        m["splits"]["valid"].update(samples=0, shards=[])
        return json.dumps(m)

    def run_trained_on_other_text():
        """A run directory whose (complete) checkpoint carries the tokenizer of another corpus (R4)."""
        from conftest import tiny_corpus
        from trace_dist.data.prepare import main as prepare

        (tmp / "other.txt").write_text("\n".join(tiny_corpus(seed=1)) + "\n")
        assert prepare(["--input", str(tmp / "other.txt"), "--output", str(tmp / "other"), "--vocab-size", "512"]) == 0
        tag = tmp / "other_run" / "checkpoints" / "step00000001"
        tag.mkdir(parents=True)
        shutil.copyfile(tmp / "other" / "tokenizer.json", tag / "tokenizer.json")
        (tag / "trace_meta.json").write_text(json.dumps({"step": 1, "files": {}}))
        (tag.parent / "latest").write_text(tag.name)
        return tag.parent.parent

    (tmp / "a_file").write_text("not a directory")
    (tmp / "bad.json").write_text("{ not json")
    (tmp / "list.json").write_text("[1, 2]")
    return [
        ([f"data.path={data_with('novalid', no_valid)}"], "the valid split is empty"),
        ([f"data.path={data_with('badmanifest', lambda t: t[:40])}"], "manifest.json: not valid JSON"),
        ([f"data.path={tiny_data}", f"train.output_dir={tmp / 'a_file'}"], "a_file is a file, not a directory"),
        ([f"data.path={tiny_data}", f"train.output_dir={tmp / 'a_file' / 'run'}"], "a_file is a file, not a directory"),
        ([f"data.path={tiny_data}", f"deepspeed_config={tmp / 'bad.json'}"], "bad.json is not valid JSON"),
        ([f"data.path={tiny_data}", f"deepspeed_config={tmp / 'list.json'}"], "must hold a JSON object, not list"),
        ([f"data.path={tiny_data}", f"checkpoint.resume={tmp / 'nowhere'}"], "no complete TRACE checkpoint at"),
        ([f"data.path={tiny_data}", f"train.output_dir={run_trained_on_other_text()}"], "with another tokenizer"),
    ]


def test_broken_inputs_are_refused_before_anything_starts(tiny_data, tmp_path, capsys):
    from trace_dist.cli import main as cli

    cases = _broken_inputs(tiny_data, tmp_path)
    capsys.readouterr()  # what preparing the inputs printed
    for extra, message in cases:
        out = tmp_path / "run"
        args = [f"train.output_dir={out}", *extra]
        assert cli(["train", "--config", "configs/tiny.yaml", "--nproc", "1", *args]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("trace-dist train: "), err
        assert not out.exists()
    assert not (tmp_path / "other_run" / "config.yaml").exists()  # refused before the resolved config is written


def test_log_truncation_and_checkpoint_completeness_on_real_files(tmp_path):
    from trace_dist.checkpoint import META, incomplete
    from trace_dist.runlog import drop_records_after

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # killed mid-line
    drop_records_after(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2}\n'
    tag = tmp_path / "step00000002"
    tag.mkdir()
    assert incomplete(tag) == f"no {META} (the save did not finish)" and incomplete(tmp_path / "nope") == "missing"
    (tag / "shard.pt").write_bytes(b"12345")
    (tag / META).write_text(json.dumps({"step": 2, "files": {"shard.pt": 5}}))
    assert incomplete(tag) is None
    (tag / "shard.pt").write_bytes(b"123")
    assert incomplete(tag) == "shard.pt is truncated"
