"""Claimed features run end to end (issue 12): the quickstart at reduced size, gradient clipping,
and universal-checkpoint resume restoring exactly what the 2-rank run saved."""

import json
import math
import subprocess
import sys

import pytest
import torch

from dist_utils import run_ranks
from test_train import curve

TINY = "configs/tiny.yaml"


@pytest.mark.slow
def test_quickstart_end_to_end_at_reduced_size(tmp_path):
    """`trace-dist quickstart` exactly as documented (prepare builtin:pydoc, 2-rank training, 2-rank eval,
    prior samples), at the tiny model size and 4 steps through its --config and overrides."""
    data, run = tmp_path / "pydoc", tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "trace_dist.cli", "quickstart", "--data", str(data), "--output", str(run),
                        "--config", TINY, "train.max_steps=4", "checkpoint.interval=2", "train.eval_interval=4",
                        "eval.iw_samples=2", "eval.num_samples=4"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (data / "manifest.json").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step00000004"
    report = json.loads((run / "eval_test.json").read_text())
    m = report["metrics"]
    for key in ("ppl_iw", "nll_iw", "elbo", "rec", "kl", "mi", "bleu_4", "self_bleu_4", "distinct_2"):
        assert math.isfinite(m[key]), key
    assert m["ppl_iw"] > 1 and m["kl"] >= m["kl_floor"] > 0 and report["world_size"] == 2
    samples = [json.loads(line) for line in (run / "samples_prior.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["mode"] == "prior" for s in samples)
    assert "=== test metrics" in r.stdout and "ppl_iw" in r.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    logged = {e.step: e.value for e in ea.Scalars("train/loss")}
    losses = curve(run)                                                 # metrics.jsonl, steps 1..4
    assert len(losses) == 4 and 4 in logged
    assert all(v == pytest.approx(losses[s - 1], rel=1e-6) for s, v in logged.items())
    ev = EventAccumulator(str(run / "tensorboard" / "eval"), size_guidance={"scalars": 0})
    ev.Reload()
    assert ev.Scalars("eval/test/ppl_iw")[0].value == pytest.approx(m["ppl_iw"], rel=1e-6)


# ------------------------------------------------------------------ gradient clipping
LR = 0.1


def _one_sgd_step(data, root, ds_config, clip):
    """One optimizer step of the real trainer with plain SGD (no momentum, no decay, constant lr), so the
    update is exactly -lr * (clipped) gradient. Returns (update norm, pre-clip gradient norm)."""
    from trace_dist.checkpoint import load_for_inference
    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer
    from trace_dist.model.trace import TRACE
    from trace_dist.train import run_training

    out = root / f"clip{clip}"
    cfg = load_config([TINY], [f"data.path={data}", f"train.output_dir={out}", f"deepspeed_config={ds_config}",
                               f"train.lr={LR}", "train.max_steps=1", "checkpoint.interval=1", f"train.gradient_clipping={clip}",
                               "train.log_interval=1", "train.samples_to_log=1"])
    run_training(cfg)
    torch.manual_seed(cfg.train.seed)                  # the trainer's initial weights
    before = dict(TRACE(cfg.model, load_tokenizer(data)[1]).named_parameters())
    after, *_ = load_for_inference(out)
    update = torch.cat([(p.detach() - before[n].detach()).flatten() for n, p in after.named_parameters()])
    grad_norm = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    return update, grad_norm


def _free_then_clipped(data, root, ds_config):
    """The step without clipping, then with a clip far below that step's gradient norm (clipping must act)."""
    free = _one_sgd_step(data, root, ds_config, 0.0)
    clip = free[1] / 100
    return free, _one_sgd_step(data, root, ds_config, clip), clip


@pytest.mark.slow
def test_gradient_clipping_bounds_the_update(tiny_data, tmp_path):
    ds = json.loads(open("ds_config.json").read())
    ds["optimizer"] = {"type": "SGD", "params": {"momentum": 0.0, "weight_decay": 0.0}}   # lr: train.lr
    ds.pop("scheduler")
    ds["zero_allow_untested_optimizer"] = True          # ZeRO-2 with a torch optimizer it does not list
    ds_config = tmp_path / "ds_sgd.json"
    ds_config.write_text(json.dumps(ds))

    (free, grad_norm), (clipped, grad_norm_again), clip = run_ranks(_free_then_clipped, 1, tiny_data, tmp_path,
                                                                    ds_config, tmp_path=tmp_path)[0]
    assert grad_norm_again == grad_norm                 # same seed, same batch, same gradient
    assert free.norm().item() == pytest.approx(LR * grad_norm, rel=1e-4)     # clip 0: the raw gradient
    assert clipped.norm().item() == pytest.approx(LR * clip, rel=1e-4)       # clipped to norm `clip`
    # clipping rescales the gradient as a whole: the same direction (up to fp32 rounding of w1 - w0)
    assert torch.nn.functional.cosine_similarity(clipped, free, dim=0).item() > 0.999


# ------------------------------------------------------------------ universal checkpoint resume
def _engine_state(data, out, world_size):
    """The trainer's engine after it resumed from `out` (on 2 ranks: the checkpoint as saved; on 1 rank:
    through the universal conversion). Full fp32 weights and Adam moments by name, and the step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from trace_dist.config import load_config
    from trace_dist.train import Trainer

    cfg = load_config([TINY], [f"data.path={data}", f"train.output_dir={out}", "train.max_steps=2",
                               "checkpoint.interval=2", "train.samples_to_log=1", "train.eval_interval=100"])
    if world_size == 2:
        from trace_dist.train import run_training

        run_training(cfg)                               # 2 steps on 2 ranks, saved at step 2
    trainer = Trainer(cfg)                              # resume from latest (step 2)
    # DeepSpeed links each parameter's view of the Adam moments lazily, at the first step; link them now
    trainer.engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, p in trainer.engine.module.named_parameters():
        state[name] = {"fp32": safe_get_full_fp32_param(p).clone(),
                       **{k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}}
    return state, trainer.state["step"], trainer.engine.global_steps


@pytest.mark.slow
def test_universal_resume_restores_exactly_the_saved_weights_and_adam_moments(tiny_data, tmp_path):
    out = tmp_path / "run"
    saved, step2, global2 = run_ranks(_engine_state, 2, tiny_data, out, 2, tmp_path=tmp_path)[0]
    resumed, step1, global1 = run_ranks(_engine_state, 1, tiny_data, out, 1, tmp_path=tmp_path)[0]
    assert (step1, global1) == (step2, global2) == (2, 2)
    assert (out / "checkpoints" / "step00000002_universal").is_dir()      # really went through the conversion
    assert saved.keys() == resumed.keys()
    for name in saved:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[name][key], resumed[name][key]), (name, key)
    assert any(saved[n]["exp_avg"].abs().sum() > 0 for n in saved)        # moments are not trivially zero
