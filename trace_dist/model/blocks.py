"""GPT-2 building blocks: masked self-attention (with optional latent memory slots and a KV cache),
the GELU MLP, the pre-LN block and a stack of blocks.

Module and parameter names mirror Hugging Face's GPT-2 (`ln_1`, `attn.c_attn`, `mlp.c_fc`, ...) so
that `gpt2.py` maps weights one to one (HF's Conv1D stores [in, out]; we transpose on load).

Attention takes an `AttentionMask`, built once per forward pass and shared by every layer, that picks
the kernel (see `AttentionMask.path`): plain causal layouts call SDPA with `is_causal=True` and no
mask, which is what lets PyTorch take its FlashAttention kernel (it refuses any `attn_mask`);
segment-structured masks (memory slots, the segment-causal encoder, prompts, padded keys) are a
`mask_mod` predicate that FlexAttention compiles into a block-sparse kernel on CUDA, and that the
dense-mask SDPA fallback evaluates into a boolean tensor elsewhere. One predicate, two kernels, so
the two cannot disagree about who sees what.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trace_dist.model.recompute import wrap_block
from trace_dist.model.config import ModelConfig

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: dense-mask SDPA only
    create_block_mask = flex_attention = None

# (b, h, q_idx, kv_idx) -> bool (True = may attend): FlexAttention's mask_mod signature. It must be
# elementwise over broadcastable index tensors, since the dense fallback calls it on whole grids.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_flex_preference: Optional[bool] = None  # None: FlexAttention on CUDA only (see use_flex)


@contextlib.contextmanager
def use_flex(enabled: Optional[bool]) -> Iterator[None]:
    """Force FlexAttention on (True) or off (False) for structured masks, or back to the default
    (None: on CUDA when torch has it). On CPU FlexAttention runs forward only, unfused (torch 2.13
    refuses its backward there), so tests use this to check it against the dense path."""
    global _flex_preference
    previous, _flex_preference = _flex_preference, enabled
    try:
        yield
    finally:
        _flex_preference = previous


def flex_wanted(device: torch.device) -> bool:
    if flex_attention is None:
        return False
    return device.type == "cuda" if _flex_preference is None else _flex_preference


@functools.cache
def _compiled_flex():
    # flex_attention is only fast compiled (eager materialises the whole score matrix); compiled
    # once per process, recompiled by dynamo when shapes change.
    return torch.compile(flex_attention)


@dataclass
class AttentionMask:
    """Which keys each of Tq queries may read among S keys ([memory slots] + tokens), one batch.

    `mask_mod` always says who sees whom; `kind` says when a mask-free kernel computes the same:
    'causal': query i reads keys <= i (Tq == S, no slots, every key real);
    'all': every query reads every key (a single decoding query, no slots, every key real);
    'structured': only the mask_mod does (segments, slots, prompts, padded keys).
    """
    kind: str
    mask_mod: MaskMod
    B: int
    Tq: int
    S: int
    device: torch.device
    _dense: Optional[torch.Tensor] = field(default=None, init=False, repr=False)
    _block: object = field(default=None, init=False, repr=False)

    def path(self, dropout_p: float) -> str:
        """The kernel this mask takes: 'sdpa_causal' (is_causal=True, no mask: flash-capable),
        'sdpa' (no mask), 'flex' (FlexAttention block mask: structured masks with more than one
        query, when wanted, no attention dropout: flex has none) or 'sdpa_mask' (dense boolean mask)."""
        if self.kind == "causal":
            return "sdpa_causal"
        if self.kind == "all":
            return "sdpa"
        if flex_wanted(self.device) and self.Tq > 1 and dropout_p == 0.0:
            return "flex"
        return "sdpa_mask"

    def dense(self) -> torch.Tensor:
        """[B, 1, Tq, S] bool: the mask_mod evaluated on the whole index grid (cached)."""
        if self._dense is None:
            ar = functools.partial(torch.arange, device=self.device)
            b, q, kv = ar(self.B)[:, None, None], ar(self.Tq)[None, :, None], ar(self.S)[None, None, :]
            self._dense = self.mask_mod(b, torch.zeros_like(b), q, kv).expand(self.B, self.Tq, self.S)[:, None]
        return self._dense

    def block_mask(self):
        """FlexAttention's BlockMask (cached): which 128 x 128 tiles are empty, full or partial."""
        if self._block is None:
            self._block = create_block_mask(self.mask_mod, self.B, None, self.Tq, self.S, device=self.device)
        return self._block


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout_p: float) -> torch.Tensor:
    """q [B, nh, Tq, hd], k/v [B, nh, S, hd] -> [B, nh, Tq, hd] through the kernel mask.path picks."""
    path = mask.path(dropout_p)
    if path == "flex":
        flex = _compiled_flex() if q.device.type == "cuda" else flex_attention
        return flex(q, k, v, block_mask=mask.block_mask())
    if path == "sdpa_mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=path == "sdpa_causal")


class LayerCache:
    """Keys and values of the tokens decoded so far, for one layer: [B, nh, L, hd] each."""

    def __init__(self) -> None:
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class SelfAttention(nn.Module):
    """Multi-head attention under an AttentionMask.

    `mem_k`/`mem_v` [B, M, C] are extra key/value slots (the latent memory) placed before the token
    keys; the mask's first M keys say which query may read which slot.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, nh, L, hd]
        B, L, C = x.shape
        return x.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: AttentionMask, mem_k: Optional[torch.Tensor] = None,
                mem_v: Optional[torch.Tensor] = None, cache: Optional[LayerCache] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (self._heads(t) for t in self.c_attn(x).split(self.n_embd, dim=2))
        if cache is not None:
            k, v = cache.extend(k, v)                                   # [B, nh, L, hd], L = past + T
        if mem_k is not None:
            k = torch.cat([self._heads(mem_k), k], dim=2)               # [B, nh, M + L, hd]
            v = torch.cat([self._heads(mem_v), v], dim=2)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)   # [B, nh, T, hd]
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation; matching it keeps init_from exact.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN Transformer block. Memory slots are separate tensor arguments (not a tuple) so that
    activation checkpointing sees them as tensors and back-propagates into the latent projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: AttentionMask, mem_k: Optional[torch.Tensor] = None,
                mem_v: Optional[torch.Tensor] = None, cache: Optional[LayerCache] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, mem_k, mem_v, cache)
        return x + self.mlp(self.ln_2(x))


class Stack(nn.Module):
    """n_layer blocks + final LayerNorm. Used as decoder and (shared or separate) encoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        if cfg.activation_checkpointing:
            for block in self.h:
                wrap_block(block, cfg.checkpoint_impl)

    def forward(self, x: torch.Tensor, mask: AttentionMask, memory: Optional[torch.Tensor] = None,
                caches: Optional[list[LayerCache]] = None) -> torch.Tensor:
        """x [B, T, C]; mask over M + L keys; memory [B, M, n_layer, 2, C] (per-layer key, value)."""
        for i, block in enumerate(self.h):
            mem_k, mem_v = (None, None) if memory is None else (memory[:, :, i, 0], memory[:, :, i, 1])
            x = block(x, mask, mem_k, mem_v, None if caches is None else caches[i])
        return self.ln_f(x)


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
