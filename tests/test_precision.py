"""bf16 executed: 2 CPU ranks train and resume under DeepSpeed bf16 at ZeRO-2 and ZeRO-3.

fp16 is GPU-only (DeepSpeed refuses it on CPU); bf16 is what GPUs train in, so the CPU suite runs it:
losses finite and falling, ZeRO-2 and ZeRO-3 on the same trajectory (a few bf16 ulps), a resume
from the middle checkpoint reproduces the rest, and the latent maths stay fp32 inside a bf16 engine
(the KL is fp32 and never below the LayerNorm floor).
"""

import json
import os
import shutil

import pytest

from dist_utils import run_ranks
from test_train import _barrier_via_files, _train, curve

STEPS = ["train.max_steps=6", "checkpoint.interval=3", "train.eval_interval=6", "train.samples_to_log=0",
         "precision=bf16"]


def _bf16_runs(data, root):
    for stage in (2, 3):
        _train(data, root / f"z{stage}", [f"zero.stage={stage}", *STEPS])
        if int(os.environ["RANK"]) == 0:
            shutil.copytree(root / f"z{stage}", root / f"z{stage}resumed")
            (root / f"z{stage}resumed" / "checkpoints" / "latest").write_text("step00000003")
        _barrier_via_files(root, f"copied{stage}")
        _train(data, root / f"z{stage}resumed", [f"zero.stage={stage}", *STEPS])
    return _latent_dtypes_in_a_bf16_engine(data)


def _latent_dtypes_in_a_bf16_engine(data):
    import deepspeed
    import torch

    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer, train_loader
    from trace_dist.model.trace import TRACE

    cfg = load_config(["configs/tiny.yaml"], [f"data.path={data}", "precision=bf16", "data.num_workers=0"])
    _, vocab = load_tokenizer(data)
    torch.manual_seed(0)
    model = TRACE(cfg.model, vocab)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg.deepspeed_config_dict(int(os.environ["WORLD_SIZE"])))
    out = engine(next(iter(train_loader(cfg.data, vocab, 4, int(os.environ["RANK"]), 2, 0))))
    per_segment = out.kl_per_segment_sum / out.seg_count.clamp_min(1)
    return {"param_dtype": str(engine.module.wte.weight.dtype), "kl_dtype": str(out.kl_sum.dtype),
            "min_kl_over_floor": float(per_segment[out.seg_count > 0].min() / out.kl_floor)}


@pytest.mark.slow
def test_bf16_trains_and_resumes_at_zero2_and_zero3(tiny_data, tmp_path):
    ranks = run_ranks(_bf16_runs, 2, tiny_data, tmp_path, tmp_path=tmp_path)
    z = {k: curve(tmp_path / k) for k in ("z2", "z3", "z2resumed", "z3resumed")}
    assert len(z["z2"]) == 6
    for k, losses in z.items():
        assert all(x == x and abs(x) < float("inf") for x in losses), k
        assert sum(losses[3:]) < sum(losses[:3]), f"{k}: loss not falling {losses}"
    assert z["z3"] == pytest.approx(z["z2"], rel=2e-2)                # bf16: a few ulps apart
    for stage in ("z2", "z3"):                                         # steps 4-6 re-run from step 3
        assert z[f"{stage}resumed"][3:] == pytest.approx(z[stage][3:], rel=1e-3)
        resumed_log = (tmp_path / f"{stage}resumed" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in resumed_log][-3:] == [4, 5, 6]
    for r in ranks:
        assert r["param_dtype"] == "torch.bfloat16" and r["kl_dtype"] == "torch.float32"
        assert r["min_kl_over_floor"] >= 1 - 1e-4                     # the floor d*gamma^2/2 holds
