"""The DeepSpeed engine of a run: the model, the resume lookup, and the checkpoint loaded into it.

Every rank builds the same initial weights (one seed), looks up the same checkpoint and, when it
was written by another number of ranks under ZeRO 1-3, loads DeepSpeed's universal conversion of it.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable

import torch

from trace_dist import checkpoint, safe_load
from trace_dist.compile import compile_engine
from trace_dist.config import TraceConfig
from trace_dist.distributed import DistInfo


def fresh_state() -> dict:
    """What a run carries besides the engine's own state (saved in each checkpoint's client state)."""
    return {"step": 0, "data_position": 0, "nonfinite_total": 0, "skipped_steps": 0, "tokens": 0}


def build_engine(cfg: TraceConfig, dist: DistInfo, vocab, log: Callable[[str], None]) -> tuple[object, dict]:
    """-> (DeepSpeed engine, run state), resumed as `checkpoint.resume` says."""
    import deepspeed

    from trace_dist.data import check_same_tokenizer
    from trace_dist.model.trace import TRACE

    safe_load.install()  # every checkpoint read below (DeepSpeed's included) is weights-only
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = TRACE(cfg.model, vocab)
    resume = checkpoint.find_resume(cfg, warn=log)
    ds_config = cfg.deepspeed_config_dict(dist.world_size)
    load_tag = None
    if resume is not None:
        save_dir, load_tag, meta = resume
        check_same_tokenizer(cfg.data.path, save_dir / load_tag / "tokenizer.json", what=f"checkpoint {save_dir / load_tag}")
        checkpoint.require_matching_model(model, checkpoint.saved_shapes(save_dir / load_tag), save_dir / load_tag)
        if meta["world_size"] != dist.world_size and meta.get("zero_stage", 0) > 0:
            log(f"checkpoint {load_tag} was written by {meta['world_size']} ranks, resuming on "
                f"{dist.world_size}: converting it to DeepSpeed's universal format")
            load_tag = checkpoint.to_universal(save_dir, load_tag, dist.is_main)
            ds_config["checkpoint"] = {"load_universal": True}
    _import_muon_without_compiling()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    if engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        skip_nonfinite_updates(engine.optimizer)
    if cfg.train.compile:  # after initialize, so that ZeRO's hooks are traced (trace_dist/compile.py)
        compile_engine(engine)
    state = fresh_state()
    if resume is not None:
        _, client = engine.load_checkpoint(str(save_dir), tag=load_tag)
        state.update(client["trace"])
        log(f"resumed from {save_dir / resume[1]} at step {state['step']}")
    return engine, state


def _import_muon_without_compiling() -> None:
    """DeepSpeed's ZeRO set-up imports its Muon optimizer module on every rank, used or not, and that
    module applies `torch.compile` to three functions at import, which imports torch._inductor:
    2.3 s of CPU per rank process (measured; 8 ranks of a node pay it on shared cores). Import it
    once with a compile decorator that compiles each function at its first call instead, which is
    what torch.compile does anyway, so Muon runs as before where it is used."""
    from deepspeed.runtime import compiler

    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    eager = getattr(compiler, "compile", None)
    if eager is None or name in sys.modules:
        return

    def compile_at_first_call():
        def decorate(fn):
            compiled = functools.cache(lambda: eager()(fn))

            @functools.wraps(fn)
            def call(*args, **kwargs):
                return compiled()(*args, **kwargs)
            return call
        return decorate

    compiler.compile = compile_at_first_call
    try:
        importlib.import_module(name)
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        compiler.compile = eager


def skip_nonfinite_updates(optimizer: torch.optim.Optimizer) -> None:
    """Give a plain optimizer (ZeRO-0, fp32) the overflow check DeepSpeed's own optimizers have.

    DeepSpeed's ZeRO 1-3, bf16 and fp16 optimizers skip an update whose gradients are not finite and
    set `overflow`, which the engine reads after `optimizer.step()`: no learning-rate step,
    `skipped_steps` + 1, `was_step_applied()` False (the trainer counts it). A plain torch optimizer
    would write NaN into every weight instead. At ZeRO-0 each rank holds the same all-reduced
    gradients (clipped first: a non-finite norm makes them non-finite too), so all ranks skip alike."""
    step = optimizer.step

    def checked_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        optimizer.overflow = bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())
        return None if optimizer.overflow else step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = checked_step


def full_grad_norm(engine) -> float | None:
    """The global L2 norm of the gradients, read off the parameters, where DeepSpeed will not report
    one: at ZeRO-0 with a plain fp32 optimizer `get_global_grad_norm()` stays None (its clipping
    discards the norm it computes). Call after the last backward of a step and before
    `engine.step()`, which zeroes the gradients; at ZeRO-0 every rank holds the all-reduced full
    gradients, so every rank gets the same value. None where the gradients are partitioned (ZeRO >= 1:
    DeepSpeed reports the norm itself)."""
    if engine.zero_optimization_stage() > 0:
        return None
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None
