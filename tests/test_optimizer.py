"""train.adam: which AdamW kernel DeepSpeed is told to build (TraceConfig.adam_impl)."""

import pytest
import torch

from trace_dist.config import load_config


@pytest.mark.parametrize("adam, offload, cuda, torch_adam", [
    ("auto", False, False, True),      # CPU, no offload: torch AdamW (the stage-equivalence tests rely on it)
    ("auto", True, False, False),      # offloaded step: DeepSpeedCPUAdam
    ("auto", False, True, False),      # CUDA: FusedAdam
    ("torch", True, True, True),       # an explicit choice always wins
    ("deepspeed", False, False, False),
])
def test_adam_selection(adam, offload, cuda, torch_adam, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = load_config(["configs/tiny.yaml"], [f"train.adam={adam}", f"zero.offload_optimizer={str(offload).lower()}"])
    ds = cfg.deepspeed_config_dict(world_size=1)
    assert ds["optimizer"]["params"]["torch_adam"] is torch_adam
    assert cfg.adam_impl() == ("torch" if torch_adam else "deepspeed")


def test_only_adam_optimizers_get_the_switch(tmp_path):
    """A ds_config with another optimizer (SGD) must not receive Adam's `torch_adam` keyword."""
    import json

    from trace_dist.config import REPO_ROOT

    ds = json.loads((REPO_ROOT / "ds_config.json").read_text())
    ds["optimizer"] = {"type": "SGD", "params": {"lr": 0.1}}
    (tmp_path / "sgd.json").write_text(json.dumps(ds))
    cfg = load_config(["configs/tiny.yaml"], [f"deepspeed_config={tmp_path / 'sgd.json'}"])
    assert "torch_adam" not in cfg.deepspeed_config_dict()["optimizer"]["params"]


def test_deepspeeds_muon_module_is_imported_without_compiling_and_compiles_when_called():
    """engine._import_muon_without_compiling: DeepSpeed's ZeRO set-up imports its Muon module on every
    rank; imported this way, torch._inductor stays out of a run that does not use Muon, and a Muon
    function still compiles at its first call and computes what DeepSpeed's own decoration does."""
    import subprocess
    import sys

    code = """
import sys, torch
from trace_dist.engine import _import_muon_without_compiling
_import_muon_without_compiling()
from deepspeed.runtime.zero.muon import original_muon
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # as DeepSpeed imports it
assert "torch._inductor.compile_fx" not in sys.modules, "inductor imported"
g = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
ours = original_muon.zeropower_via_newtonschulz5(g, 5)
assert "torch._inductor.compile_fx" in sys.modules, "not compiled at the first call"
theirs = torch.compile(original_muon.zeropower_via_newtonschulz5.__wrapped__)(g, 5)  # DeepSpeed's decoration
assert torch.equal(ours, theirs)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
