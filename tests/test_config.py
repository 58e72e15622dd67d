"""Typed config: extends/merge, dotted overrides, errors that name the field, ds_config patching."""

from pathlib import Path

import pytest

from trace_dist.config import ConfigError, load_config, parse_overrides
from trace_dist.config import KLConfig
from trace_dist.schedule import kl_beta


def test_extends_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 7\n  seed: 3\nkl:\n  beta: 0.5\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  seed: 9\n")
    cfg = load_config([tmp_path / "child.yaml"], ["kl.beta=0.25", "model.latent=none", "zero.stage=3"])
    assert (cfg.train.max_steps, cfg.train.seed) == (7, 9)  # parent kept, child wins
    assert cfg.kl.beta == 0.25 and cfg.model.latent == "none" and cfg.zero.stage == 3


def test_later_files_win(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {max_steps: 1, seed: 1}\n")
    (tmp_path / "b.yaml").write_text("train: {max_steps: 2}\n")
    cfg = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"])
    assert (cfg.train.max_steps, cfg.train.seed) == (2, 1)


@pytest.mark.parametrize("override, field", [
    ("train.max_stpes=3", "train.max_stpes: unknown key (did you mean 'max_steps'?)"),
    ("model.latent=foo", "model.latent"),
    ("kl.beta=-1", "kl.beta"),
    ("zero.stage=4", "zero.stage"),
    ("precision=fp8", "precision"),
    ("data.segment=fixed:0", "data.segment"),
    ("model.n_head=3", "n_embd (128) must be divisible by n_head (3)"),
    ("generation.max_new_tokens=600", "generation.max_new_tokens (600) exceeds model.block_size (512)"),
])
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert field in str(e.value)


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["kl.beta"])
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])
    (tmp_path / "cyc.yaml").write_text("extends: cyc.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config([tmp_path / "cyc.yaml"])
    (tmp_path / "long.yaml").write_text("extends: " + "x" * 300 + ".yaml\n")   # fault matrix C4: ENAMETOOLONG
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config([tmp_path / "long.yaml"])
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not a text"):
        load_config([tmp_path / "binary.yaml"])
    with pytest.raises(ConfigError, match="cannot read it"):                   # a directory
        load_config([tmp_path])


def test_deepspeed_config_is_patched_by_typed_keys():
    cfg = load_config(["configs/tiny.yaml"], ["zero.stage=3", "precision=bf16", "train.grad_accum=2",
                                             "train.lr=0.01", "zero.offload_optimizer=true",
                                             "train.gradient_clipping=0.5"])
    ds = cfg.deepspeed_config_dict(world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 2 * 2
    assert ds["optimizer"]["params"]["lr"] == 0.01 and not ds["optimizer"]["params"]["torch_adam"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.max_steps


def test_shipped_configs_validate():
    for path in ["configs/tiny.yaml", "configs/quickstart.yaml"]:
        load_config([path])


def test_kl_schedules():
    assert kl_beta(KLConfig(beta=0.7), 123, 1000) == 0.7
    lin = KLConfig(beta=1.0, schedule="linear", warmup_steps=10)
    assert [kl_beta(lin, s, 100) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    cyc = KLConfig(beta=1.0, schedule="cyclical", cycles=2, ratio_zero=0.25, ratio_increase=0.5)
    # period 50: zero for 12.5 steps, rising until 37.5, then flat; repeats
    assert [kl_beta(cyc, s, 100) for s in (0, 12, 25, 40, 50, 75)] == [0.0, 0.0, 0.5, 1.0, 0.0, 0.5]


def test_fairscale_recompute_of_shared_blocks_under_zero_is_refused():
    on = ["model.activation_checkpointing=true", "model.checkpoint_impl=fairscale"]
    with pytest.raises(ConfigError, match="fairscale's reentrant recompute"):
        load_config([], on)
    load_config([], on + ["model.share_blocks=false"])
    load_config([], on + ["zero.stage=0"])


def test_resolved_config_has_absolute_paths_and_embeds_ds_config(tmp_path, monkeypatch):
    import json

    cfg = load_config(["configs/tiny.yaml"], ["data.path=rel/data", "train.output_dir=rel/run",
                                             "checkpoint.resume=rel/ckpt"])
    resolved = cfg.resolved()
    assert resolved.data.path == str(Path.cwd() / "rel/data") and resolved.train.output_dir == str(Path.cwd() / "rel/run")
    assert resolved.checkpoint.resume == str(Path.cwd() / "rel/ckpt")
    assert resolved.deepspeed_config == json.loads(Path("ds_config.json").read_text())
    # what the ranks read back: the same config, from any directory, with the file gone
    (tmp_path / "config.yaml").write_text(resolved.to_yaml())
    monkeypatch.chdir(tmp_path)
    again = load_config([tmp_path / "config.yaml"])
    assert again == resolved and again.deepspeed_config_dict(2) == cfg.deepspeed_config_dict(2)


def test_choices_come_from_the_config():
    from trace_dist.config import EvalConfig, ModelConfig, choices

    assert choices(ModelConfig, "latent_path") == ("sequential", "parallel", "scan")
    assert choices(EvalConfig, "split") == ("valid", "test")


def test_commands_validate_their_input_without_importing_torch():
    """`trace-dist train`/`tune` check configs, data and searches before any process starts; none of
    that needs torch (2.3 s to import), and a Ray worker running the search's setup hook must not pay
    for it either (tune/rendezvous.py)."""
    import subprocess
    import sys

    code = ("import sys; import trace_dist.launch, trace_dist.tune.cli, trace_dist.tune.rendezvous; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'ray') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
