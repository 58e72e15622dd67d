"""`trace-dist train` through the real `deepspeed` launcher: multi-process, multi-node, kills, resume,
TensorBoard read back. CPU/gloo, tiny config."""

import glob
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from test_train import curve, overrides
from trace_dist.ports import free_port

STEPS = ["train.max_steps=8", "checkpoint.interval=2", "train.eval_interval=4"]


def train_cmd(data, out, *args, extra=()):
    return [sys.executable, "-m", "trace_dist.cli", "train", "--config", "configs/tiny.yaml", *args,
            *overrides(data, out, *STEPS, *extra)]


def run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def wait_for_step(proc, run_dir, step, timeout=300):
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted 2-process run: the curve every other launch must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    r = run(train_cmd(tiny_data, out, "--nproc", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ------------------------------------------------------------------ fast: nothing is launched
def test_bad_config_fails_before_any_process(tiny_data, tmp_path):
    out = tmp_path / "run"
    r = run(train_cmd(tiny_data, out, "--nproc", "2", extra=["model.latent=foo"]))
    assert r.returncode == 2 and "model.latent" in r.stderr
    assert not out.exists()
    r = run(train_cmd(tiny_data, out, extra=["precision=fp16"]))
    assert r.returncode == 2 and "fp16 is not supported" in r.stderr
    r = run(train_cmd(tmp_path / "nodata", out))
    assert r.returncode == 2 and "trace-dist prepare" in r.stderr
    r = run(train_cmd(tiny_data, out, "--no-ssh"))
    assert r.returncode == 2 and "--node-rank" in r.stderr


def test_dry_run_prints_the_launcher_command(tiny_data, tmp_path):
    r = run(train_cmd(tiny_data, tmp_path, "--hostfile", "launch/hostfile.example", "--no-ssh", "--node-rank", "1",
                      "--master-addr", "10.1.2.3", "--nproc", "8", "--dry-run"))
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    for flag, value in [("--hostfile", "launch/hostfile.example"), ("--node_rank", "1"),
                        ("--master_addr", "10.1.2.3"), ("--num_gpus", "8"), ("--module", "trace_dist.train")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--no_ssh" in cmd and "deepspeed.launcher.runner" in cmd


# ------------------------------------------------------------------ slow: real launcher processes
@pytest.mark.slow
def test_two_process_run_writes_checkpoints_and_tensorboard(reference):
    assert (reference / "checkpoints" / "latest").read_text() == "step00000008"
    assert len(curve(reference)) == 8
    assert (reference / "config.yaml").exists() and (reference / "samples.jsonl").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(reference / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in ["train/loss", "train/rec", "train/kl", "train/beta", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "train/samples_per_s", "train/kl_floor",
                "train/tokens_per_s_per_device", "train/mfu",
                "train/kl_per_segment/00", "train/nonfinite_total", "train/bad_samples",
                "val/loss", "val/kl", "val/ppl_bound", "val/kl_floor", "val/kl_per_segment/00",
                "val/distinct_2", "val/self_bleu_4", "val/sample_len_mean"]:
        assert tag in scalars, tag
    assert not any(t.startswith("val/val_") or "kl_floor_per_segment" in t for t in scalars)  # one name each
    mfu = [e.value for e in ea.Scalars("train/mfu")]
    assert all(0 < m < 1 for m in mfu), mfu  # a fraction of the CPU's probed peak
    assert {"samples/text_summary", "config/text_summary"} <= set(ea.Tags()["tensors"])
    assert "hparams/val_loss" in scalars  # the resolved config as hparams, with the final val metrics
    from tensorboard.plugins.hparams import plugin_data_pb2

    hp = [plugin_data_pb2.HParamsPluginData.FromString(ea.PluginTagToContent("hparams")[tag])
          for tag in ea.PluginTagToContent("hparams")]
    starts = [p.session_start_info.hparams for p in hp if p.HasField("session_start_info")]
    assert starts and starts[0]["model.latent"].string_value == "segments"
    assert starts[0]["zero.stage"].number_value == 2
    logged = {e.step: e.value for e in ea.Scalars("train/loss")}
    jsonl = dict(zip(range(1, 9), curve(reference)))
    assert logged and all(v == pytest.approx(jsonl[s], rel=1e-6) for s, v in logged.items())


@pytest.mark.slow
def test_tensorboard_server_serves_the_scalars(reference):
    port = free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(reference / "tensorboard"),
                           "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?tag=train%2Floss&run=."
        deadline, points = time.time() + 60, None
        while time.time() < deadline:
            try:
                points = json.loads(urllib.request.urlopen(url, timeout=5).read())
                if points:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert points, "tensorboard served no train/loss points"
        jsonl = dict(zip(range(1, 9), curve(reference)))
        for _, step, value in points:
            assert value == pytest.approx(jsonl[step], rel=1e-6)
    finally:
        tb.terminate()
        tb.wait(10)


@pytest.mark.slow
def test_simulated_two_nodes_match_one_node(tiny_data, reference, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out, port = tmp_path / "run", str(free_port())
    node = [train_cmd(tiny_data, out, "--hostfile", str(hostfile), "--no-ssh", "--node-rank", str(k),
                      "--master-addr", "127.0.0.1", "--master-port", port, "--nproc", "1") for k in (1, 0)]
    second = subprocess.Popen(node[0], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = run(node[1])
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.wait(120) == 0
    assert curve(out) == curve(reference)


@pytest.mark.slow
def test_preempted_then_killed_run_resumes_on_the_same_curve(tiny_data, reference, tmp_path):
    """SIGTERM (a scheduler's notice): the ranks checkpoint at the next step and the command exits 0.
    The restart is then SIGKILLed with its ranks (no notice at all) after its first new step. The
    second restart resumes from the last complete checkpoint and finishes on the uninterrupted curve."""
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny_data, out, "--nproc", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted at step" in err
    stopped = len(curve(out))
    assert stopped <= 5 and (out / "checkpoints" / "latest").read_text() == f"step{stopped:08d}"  # acted on promptly

    shm_before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    proc = subprocess.Popen(train_cmd(tiny_data, out, "--nproc", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(proc, out, stopped + 1)
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.kill()
    proc.wait()
    # DeepSpeed's CPU comm op (and its 69 MB /dev/shm buffer per rank) is never started: even SIGKILL leaks no RAM
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shm_before
    assert len(curve(out)) < 8

    r = run(train_cmd(tiny_data, out, "--nproc", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert curve(out) == curve(reference)  # fp32, ZeRO-2: exact


@pytest.mark.slow
def test_resume_on_fewer_ranks_via_universal_checkpoint(tiny_data, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shm_before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    r = run(train_cmd(tiny_data, out, "--nproc", "1", extra=["train.max_steps=10"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shm_before  # 1 rank leaks none either
    assert "written by 2 ranks, resuming on 1" in r.stderr and "at step 8" in r.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step00000010"
    # the conversion is a one-resume cache: pruned once the newer checkpoint is complete
    assert not (out / "checkpoints" / "step00000008_universal").exists()
    losses = curve(out)
    assert len(losses) == 10 and losses[:8] == curve(reference)
    # that the 1-rank engine resumes with exactly the saved weights and Adam moments is
    # tests/test_claims.py::test_universal_resume_restores_exactly_the_saved_weights_and_adam_moments


@pytest.mark.slow
def test_torchrun_matches_the_deepspeed_launcher(tiny_data, reference, tmp_path):
    out = tmp_path / "run"
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), "-m", "trace_dist.train", "--config", "configs/tiny.yaml",
             *overrides(tiny_data, out, *STEPS)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert curve(out) == curve(reference)


@pytest.mark.slow
def test_plain_python_single_process(tiny_data, tmp_path):
    out = tmp_path / "run"
    r = run([sys.executable, "-m", "trace_dist.train", "--config", "configs/tiny.yaml",
             *overrides(tiny_data, out, "train.max_steps=2", "train.eval_interval=2")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(curve(out)) == 2 and (out / "checkpoints" / "latest").read_text() == "step00000002"


@pytest.mark.slow
def test_export_loads_without_deepspeed_and_gives_the_same_logits(reference, tmp_path):
    import torch

    from trace_dist.checkpoint import load_for_inference

    r = run([sys.executable, "-m", "trace_dist.cli", "export", str(reference), str(tmp_path / "export")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"model.safetensors", "config.yaml", "tokenizer.json", "export.json"} <= \
        {p.name for p in (tmp_path / "export").iterdir()}
    from_ckpt, cfg, _, vocab = load_for_inference(reference)
    from_export, *_ = load_for_inference(tmp_path / "export")
    tokens = torch.tensor([[5, 6, 7, vocab.sep, 8, 9, vocab.eos]])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    batch = {"tokens": tokens, "seg_ids": seg, "loss_mask": seg >= 0, "prompt_mask": torch.zeros_like(seg, dtype=bool),
             "num_segments": torch.tensor([2]), "example_mask": torch.tensor([True]),
             "bad_samples": torch.tensor(0)}
    torch.manual_seed(0)
    a = from_ckpt(batch).loss
    torch.manual_seed(0)
    b = from_export(batch).loss
    assert torch.equal(a, b)
    params = dict(from_export.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in from_ckpt.named_parameters())
