"""GPT-2 building blocks: masked self-attention (with optional latent memory slots and a KV cache),
the GELU MLP, the pre-LN block and a stack of blocks.

Module and parameter names mirror Hugging Face's GPT-2 (`ln_1`, `attn.c_attn`, `mlp.c_fc`, ...) so
that `gpt2.py` maps weights one to one (HF's Conv1D stores [in, out]; we transpose on load).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trace_dist.model.recompute import wrap_block
from trace_dist.model.config import ModelConfig


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
    """Multi-head attention under an explicit boolean mask (True = may attend).

    `mem_k`/`mem_v` [B, M, C] are extra key/value slots (the latent memory) placed before the token
    keys; the mask's first M columns say which query may read which slot.
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mem_k: Optional[torch.Tensor] = None,
                mem_v: Optional[torch.Tensor] = None, cache: Optional[LayerCache] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (self._heads(t) for t in self.c_attn(x).split(self.n_embd, dim=2))
        if cache is not None:
            k, v = cache.extend(k, v)                                   # [B, nh, L, hd], L = past + T
        if mem_k is not None:
            k = torch.cat([self._heads(mem_k), k], dim=2)               # [B, nh, M + L, hd]
            v = torch.cat([self._heads(mem_v), v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,   # mask [B, 1, T, M + L]
                                           dropout_p=self.dropout if self.training else 0.0)
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mem_k: Optional[torch.Tensor] = None,
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, memory: Optional[torch.Tensor] = None,
                caches: Optional[list[LayerCache]] = None) -> torch.Tensor:
        """x [B, T, C]; mask [B, 1, T, M + L]; memory [B, M, n_layer, 2, C] (per-layer key, value)."""
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
