"""The trainer on real DeepSpeed engines and gloo ranks (spawned in-process, no launcher)."""

import json

import pytest

from dist_utils import run_ranks


def overrides(data, out, *extra):
    return [f"data.path={data}", f"train.output_dir={out}", *extra]


def curve(run_dir, key="loss"):
    """The last value logged for each step (a resumed run logs re-run steps again)."""
    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        values[rec["step"]] = rec[key]
    return [values[s] for s in sorted(values)]


def _train(data, out, extra):
    from trace_dist.config import load_config
    from trace_dist.train import run_training

    cfg = load_config(["configs/tiny.yaml"], overrides(data, out, *extra))
    return run_training(cfg)


def _train_stages(data, root, ds_config):
    """One process group, four engines: ZeRO 0, 1, 2, 3 on the same data and seed."""
    for stage in (0, 1, 2, 3):
        _train(data, root / f"z{stage}", [f"zero.stage={stage}", "train.max_steps=4", "train.samples_to_log=1",
                                          f"deepspeed_config={ds_config}"])


@pytest.mark.slow
def test_zero_stages_give_the_same_losses(tiny_data, tmp_path):
    # every parameter really partitioned under ZeRO-3 (the default keeps small ones whole)
    ds = json.loads(open("ds_config.json").read())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run_ranks(_train_stages, 2, tiny_data, tmp_path, tmp_path / "ds.json", tmp_path=tmp_path)
    z = {s: curve(tmp_path / f"z{s}") for s in (0, 1, 2, 3)}
    assert len(z[0]) == 4
    assert z[0] == z[1] == z[2]  # fp32, torch AdamW: bitwise
    assert z[3] == pytest.approx(z[0], rel=1e-5)
    val = [json.loads((tmp_path / f"z{s}" / "val_metrics.jsonl").read_text().splitlines()[-1])
           for s in (0, 3)]
    assert val[0]["val_loss"] == pytest.approx(val[1]["val_loss"], rel=1e-5)


def test_activation_checkpointing_gives_identical_losses(tiny_data, tmp_path):
    runs = {}
    for name, extra in {"off": [], "torch": ["model.activation_checkpointing=true", "model.checkpoint_impl=torch"],
                        "fairscale": ["model.activation_checkpointing=true",
                                      "model.checkpoint_impl=fairscale"]}.items():
        run_ranks(_train, 1, tiny_data, tmp_path / name, ["train.max_steps=3", "train.samples_to_log=0"],
                  tmp_path=tmp_path)
        runs[name] = curve(tmp_path / name)
    assert runs["off"] == runs["torch"] == runs["fairscale"]


def test_nonfinite_loss_is_skipped_and_counted(tiny_data, tmp_path):
    result, = run_ranks(_train, 1, tiny_data, tmp_path / "run",
                        ["train.max_steps=4", "train.fault_nonfinite_at=[2]", "train.samples_to_log=0"],
                        tmp_path=tmp_path)
    assert result["status"] == "completed" and result["nonfinite_total"] == 1
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["loss"] == r["loss"] for r in records)  # no NaN reached a step
    assert records[-1]["nonfinite_total"] == 1


def test_nonfinite_streak_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="non-finite steps in a row"):
        run_ranks(_train, 1, tiny_data, run,
                  ["train.max_steps=8", "checkpoint.interval=2", "train.max_nonfinite_in_row=3",
                   "train.samples_to_log=0", "train.fault_nonfinite_at=[5,6,7,8,9,10]"], tmp_path=tmp_path)
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000004"
    meta = json.loads((ckpt / "step00000004" / "trace_meta.json").read_text())
    assert meta["step"] == 4 and meta["nonfinite_total"] == 0
    from trace_dist.checkpoint import load_for_inference

    model, *_ = load_for_inference(run)  # the kept checkpoint still loads
    assert all(p.isfinite().all() for p in model.parameters())
