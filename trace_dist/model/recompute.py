"""Activation checkpointing of one Transformer block, behind one switch.

`torch.utils.checkpoint.checkpoint(use_reentrant=False)` (also for `auto`), or
`fairscale.nn.checkpoint_wrapper` when requested. fairscale's wrapper is reentrant: it runs each
use of a block's backward separately, so blocks shared by encoder and decoder (`model.share_blocks`)
hand their gradients to ZeRO twice, which DeepSpeed refuses ("Gradient computed twice"); the config
refuses that combination up front (`TraceConfig`). Both patch the block's `forward` in place,
so parameter names (and therefore checkpoints and GPT-2 loading) do not depend on the switch, and
both fall back to the plain forward when autograd is off (evaluation, generation with a KV cache).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def resolve_impl(impl: str) -> str:
    """'auto' -> 'torch' (non-reentrant: shared blocks work); 'fairscale' must be importable."""
    if impl == "auto":
        return "torch"
    if impl == "fairscale" and importlib.util.find_spec("fairscale") is None:
        raise ImportError("model.checkpoint_impl='fairscale' but fairscale is not installed "
                          "(pip install fairscale, or use 'torch')")
    if impl not in ("fairscale", "torch"):
        raise ValueError(f"model.checkpoint_impl must be auto, fairscale or torch, got {impl!r}")
    return impl


def _torch_checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def wrap_block(block: nn.Module, impl: str) -> nn.Module:
    """Recompute `block`'s activations in the backward pass instead of storing them."""
    if resolve_impl(impl) == "fairscale":
        from fairscale.nn import checkpoint_wrapper
        return checkpoint_wrapper(block)
    block.forward = functools.partial(_torch_checkpointed, block.forward)
    return block
