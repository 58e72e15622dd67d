"""TRACE: a GPT-2 encoder-decoder VAE with one latent per text segment (docs/model.md).

Read top to bottom: output contract, masks, pooling, latent injection, the model (encode -> latents
-> decode -> loss), then the evaluation entry points (log_weights, posterior) and FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trace_dist.model.config import GenerationConfig
from trace_dist.model.blocks import AttentionMask, LayerCache, Stack, init_weights
from trace_dist.model.config import ModelConfig
from trace_dist.model.latent import Latent, compute_dtype
from trace_dist.vocab import Vocab

BATCH_KEYS = ("tokens", "seg_ids", "loss_mask", "prompt_mask", "num_segments", "example_mask")


@dataclass
class TraceOutput:
    """Per-micro-batch sums (all-reduce them across ranks) plus the local loss (docs/INTERFACES.md)."""
    loss: torch.Tensor                # objective / num_tokens + penalty: this micro-batch's per-token loss
    objective: torch.Tensor           # rec_sum + beta * KL with free bits, with grad (train.micro_batch_loss)
    penalty: torch.Tensor             # idempotency penalty (with grad; 0 without): per step, not per token
    rec_sum: torch.Tensor             # sum of token cross-entropies (nats)
    kl_sum: torch.Tensor              # sum over examples, segments, dims (no free bits)
    num_tokens: torch.Tensor          # int64, predicted tokens
    num_examples: torch.Tensor        # int64, real (non-padding) examples
    kl_per_segment_sum: torch.Tensor  # [max_segments] KL summed over examples at each segment index
    seg_count: torch.Tensor           # [max_segments] int64, examples having that segment
    kl_floor: float                   # analytic per-segment floor d * gamma^2 / 2 where it holds, else 0
    aux: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- masks (True = attend)
def decoder_mask(seg_ids: torch.Tensor, key_valid: Optional[torch.Tensor], num_keys: int,
                 num_slots: int) -> AttentionMask:
    """seg_ids [B, Tq] (segment of the token each query predicts, -1: none); the queries are the last
    Tq of num_keys token keys, of which key_valid [B, num_keys] are real (None: all) -> a mask over
    num_slots + num_keys keys. Causal over tokens; a query reads only the memory slot of its own segment.
    Without slots and padding this is plain causal attention (or, for one query, attention to all)."""
    B, Tq = seg_ids.shape
    M, offset = num_slots, num_keys - Tq

    def mask_mod(b, h, q, kv):
        j, q_pos = kv - M, q + offset                               # token key index, query position
        real = True if key_valid is None else key_valid[b, j.clamp_min(0)]
        token = (j >= 0) & (((j <= q_pos) & real) | (j == q_pos))    # self always: no empty rows
        return token | ((kv < M) & (seg_ids[b, q] == kv))

    kind = "structured"
    if M == 0 and (key_valid is None or bool(key_valid.all())):
        kind = "causal" if Tq == num_keys else "all" if Tq == 1 else "structured"
    return AttentionMask(kind, mask_mod, B, Tq, M + num_keys, seg_ids.device)


def encoder_mask(seg_ids: torch.Tensor, prompt_mask: torch.Tensor, scope: str) -> AttentionMask:
    """[B, T] -> a [T, T] mask per example. Target tokens see the prompt plus segments <= their own
    ('segment_causal') or all segments ('bidirectional'); prompt tokens see the prompt only, so g(prompt)
    is computable at generation time; pad tokens see themselves only."""
    B, T = seg_ids.shape

    def mask_mod(b, h, q, kv):
        qs, ks = seg_ids[b, q], seg_ids[b, kv]
        target_q = qs >= 0
        see_target = (ks >= 0) & ((ks <= qs) if scope == "segment_causal" else True)
        allowed = (prompt_mask[b, kv] & (target_q | prompt_mask[b, q])) | (target_q & see_target)
        return allowed | (q == kv)

    return AttentionMask("structured", mask_mod, B, T, T, seg_ids.device)


# ---------------------------------------------------------------------------- pooling
class Pooling(nn.Module):
    """Group features [B, T, C] + group membership [B, G, T] -> [B, G, C].
    'attention': softmax over the group's tokens of a learned score (DELLA's AverageSelfAttention);
    'last': the group's last token. Empty groups give zeros."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.pooling
        self.score = nn.Linear(cfg.n_embd, 1) if cfg.pooling == "attention" else None

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        if self.kind == "attention":
            scores = self.score(x).squeeze(-1)[:, None, :]                        # [B, 1, T]
        else:  # the largest position of the group wins the softmax outright
            scores = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)[None, None] * 1e4
        scores = scores.masked_fill(~groups, -torch.inf)
        weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(x.dtype)  # [B, G, T]
        return weights @ x


# ---------------------------------------------------------------------------- latent -> decoder
class Injection(nn.Module):
    """z_k into the decoder: 'memory' = one key/value slot per layer and segment (Optimus-style, read
    through the segment-level mask); 'embedding' = a projection added to the token embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, C, L = cfg.latent_size, cfg.n_embd, cfg.n_layer
        self.n_layer, self.n_embd = L, C
        self.memory = nn.Linear(d, L * 2 * C) if cfg.inject in ("memory", "both") else None
        self.embedding = nn.Linear(d, C) if cfg.inject in ("embedding", "both") else None
        # Zero init: the model starts as the plain LM, so latents that carry no information yet
        # (pure noise at first) cannot perturb the decoder; d loss/dW = grad (x) z still lets the
        # coupling grow as soon as z says something about the text.
        for layer in (self.memory, self.embedding):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def slots(self, z: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, K, d] -> per-layer key and value [B, K, n_layer, 2, C]."""
        if self.memory is None:
            return None
        B, K, _ = z.shape
        return self.memory(z).view(B, K, self.n_layer, 2, self.n_embd)

    def token_embedding(self, z: torch.Tensor, seg_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """z [B, K, d], seg_ids [B, T] -> [B, T, C] (0 where seg_ids = -1)."""
        if self.embedding is None:
            return None
        idx = seg_ids.clamp_min(0)[..., None].expand(-1, -1, z.shape[-1])
        z_tok = torch.gather(z, 1, idx)                                          # [B, T, d]
        return self.embedding(z_tok) * (seg_ids >= 0)[..., None].to(z_tok.dtype)


class TiedEmbedding(nn.Embedding):
    """Token embedding that is also the LM head (GPT-2 ties them). The head is a call of this module
    (`unembed=True`), so the shared weight is only read inside its forward: ZeRO-3 gathers it."""

    def forward(self, x: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight) if unembed else super().forward(x)


# ---------------------------------------------------------------------------- the model
class TRACE(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocab) -> None:
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.vocab_size = cfg.vocab_size or vocab.size
        _check_config(cfg, vocab, self.vocab_size)
        C = cfg.n_embd
        self.wte = TiedEmbedding(self.vocab_size, C)
        self.wpe = nn.Embedding(cfg.block_size, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = Stack(cfg)
        self.has_latent = cfg.latent != "none"
        # share_blocks: the decoder's blocks also encode (DELLA); they are not registered twice.
        self.encoder = Stack(cfg) if self.has_latent and not cfg.share_blocks else None
        self.pooling = Pooling(cfg) if self.has_latent else None
        init_weights(self, cfg.n_layer)
        # after init_weights: these two initialise themselves
        self.injection = Injection(cfg) if self.has_latent else None
        self.latent = Latent(cfg) if self.has_latent else None
        if cfg.init_from:
            from trace_dist.model.gpt2 import load_gpt2
            load_gpt2(self, cfg.init_from)

    # ------------------------------------------------------------ batch plumbing
    def check_batch(self, batch: dict) -> None:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing} (see docs/INTERFACES.md)")
        B, T = batch["tokens"].shape
        if T > self.cfg.block_size:
            raise ValueError(f"batch tokens length {T} exceeds model.block_size ({self.cfg.block_size})")
        for k, dtype in (("seg_ids", torch.long), ("loss_mask", torch.bool), ("prompt_mask", torch.bool)):
            if batch[k].shape != (B, T):
                raise ValueError(f"batch {k} has shape {tuple(batch[k].shape)}, expected {(B, T)}")
            if batch[k].dtype != dtype:
                raise TypeError(f"batch {k} has dtype {batch[k].dtype}, expected {dtype}")
        if int(batch["num_segments"].max()) > self.cfg.max_segments:
            raise ValueError(f"batch num_segments max {int(batch['num_segments'].max())} exceeds "
                             f"model.max_segments ({self.cfg.max_segments})")
        if int(batch["tokens"].max()) >= self.vocab_size or int(batch["tokens"].min()) < 0:
            raise ValueError(f"batch tokens outside [0, {self.vocab_size}) (model.vocab_size)")

    def _segments(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment ids and valid-segment mask [B, K] as the latents see them ('single': one segment)."""
        seg_ids, num = batch["seg_ids"], batch["num_segments"]
        if self.cfg.latent == "single":
            seg_ids, num = torch.where(seg_ids >= 0, 0, -1), num.clamp(max=1)
        K = max(1, int(num.max()))
        seg_mask = (torch.arange(K, device=num.device)[None] < num[:, None]) & batch["example_mask"][:, None]
        return seg_ids, seg_mask

    def decoder_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """[bos] + tokens[:, :-1]: position t predicts tokens[:, t]."""
        bos = torch.full_like(tokens[:, :1], self.vocab.bos)
        return torch.cat([bos, tokens[:, :-1]], dim=1)

    # ------------------------------------------------------------ encoder
    def features(self, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Encoder pass + pooling: h [B, K, C] per segment, h_prompt [B, C] (conditional), seg_mask [B, K]."""
        tokens = batch["tokens"]
        seg_ids, seg_mask = self._segments(batch)
        T = tokens.shape[1]
        x = self.drop(self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device)))
        encoder = self.decoder if self.encoder is None else self.encoder
        x = encoder(x, encoder_mask(seg_ids, batch["prompt_mask"], self.cfg.encoder_scope))
        groups = seg_ids[:, None, :] == torch.arange(seg_mask.shape[1], device=tokens.device)[None, :, None]
        h = self.pooling(x, groups)
        h_prompt = self.pooling(x, batch["prompt_mask"][:, None])[:, 0] if self.cfg.conditional else None
        return h, h_prompt, seg_mask

    # ------------------------------------------------------------ decoder
    def decode(self, inp: torch.Tensor, pos: torch.Tensor, seg_ids: torch.Tensor, z: Optional[torch.Tensor],
               key_valid: Optional[torch.Tensor] = None, caches: Optional[list[LayerCache]] = None
               ) -> torch.Tensor:
        """Logits [B, Tq, V] for decoder inputs inp [B, Tq] at positions pos [B, Tq] (or [Tq]).
        seg_ids [B, Tq]: the latent each position reads (-1: none); z [B, K, d] or None;
        key_valid [B, L]: which of all L keys so far are real (default: all); caches: KV cache."""
        x = self.wte(inp) + self.wpe(pos)
        memory = None
        if z is not None:
            z = z.to(x.dtype)
            emb = self.injection.token_embedding(z, seg_ids)
            x = x if emb is None else x + emb
            memory = self.injection.slots(z)
        past = 0 if caches is None or caches[0].k is None else caches[0].k.shape[2]
        mask = decoder_mask(seg_ids, key_valid, past + inp.shape[1], 0 if memory is None else memory.shape[1])
        x = self.decoder(self.drop(x), mask, memory, caches)
        return self.wte(x, unembed=True)                                       # tied LM head

    def reconstruction(self, batch: dict, seg_ids: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        """Teacher-forced -log p(x|z) per example, summed over predicted tokens: [B]."""
        tokens = batch["tokens"]
        B, T = tokens.shape
        logits = self.decode(self.decoder_input(tokens), torch.arange(T, device=tokens.device), seg_ids, z)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
        ce = F.cross_entropy(logits.reshape(B * T, -1), tokens.reshape(-1), reduction="none")
        return (ce.view(B, T) * _loss_mask(batch)).sum(1)

    # ------------------------------------------------------------ training forward
    def forward(self, batch: dict, beta: float = 1.0, free_bits: float = 0.0,
                eps: Optional[torch.Tensor] = None) -> TraceOutput:
        """eps [B, K, d]: the posterior sample's standard-normal noise (default: drawn here)."""
        self.check_batch(batch)
        B = batch["tokens"].shape[0]
        seg_ids, seg_mask = self._segments(batch)
        sample = None
        if self.has_latent:
            h, h_prompt, seg_mask = self.features(batch)
            sample = self.latent(h, seg_mask, h_prompt, eps=eps)
        rec_sum = self.reconstruction(batch, seg_ids, None if sample is None else sample.z).sum()
        num_tokens = predicted_tokens(batch)

        K_max = self.cfg.max_segments
        if sample is None:
            kl_seg = rec_sum.new_zeros(B, 1)
            kl_fb_sum, aux = rec_sum.new_zeros(()), {}
        else:
            kl_seg = sample.kl.sum(-1)                                         # [B, K]
            kl_fb = sample.kl.clamp_min(free_bits) if free_bits > 0 else sample.kl
            kl_fb_sum = (kl_fb * seg_mask[..., None]).sum()
            aux = dict(sample.aux)
        kl_sum = kl_seg.sum()
        objective = rec_sum + beta * kl_fb_sum
        penalty = None if self.latent is None else self.latent.penalty()
        if penalty is not None:
            aux["idempotency_penalty"] = penalty.detach()
        else:
            penalty = rec_sum.new_zeros(())
        return TraceOutput(
            loss=objective / num_tokens.clamp_min(1) + penalty, objective=objective, penalty=penalty,
            rec_sum=rec_sum.detach(), kl_sum=kl_sum.detach(), num_tokens=num_tokens,
            num_examples=batch["example_mask"].sum(),
            kl_per_segment_sum=_pad(kl_seg.detach().sum(0), K_max),
            seg_count=_pad(seg_mask.sum(0), K_max),
            kl_floor=0.0 if self.latent is None else self.latent.kl_floor, aux=aux)

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def log_weights(self, batch: dict, num_samples: int, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, S]: log p(x|z_s) + log p(z_s) - log q(z_s|x), summed over segments; z_s ~ q(z|x) with
        noise eps [B, S, K, d] (default: drawn here, sample by sample). The encoder runs once; the
        S samples of every example decode as one batch of B * S rows."""
        self.check_batch(batch)
        B, S = batch["tokens"].shape[0], num_samples
        seg_ids, _ = self._segments(batch)
        if not self.has_latent:  # z-free: every sample is the exact log p(x)
            return -self.reconstruction(batch, seg_ids, None)[:, None].expand(B, S)
        h, h_prompt, seg_mask = self.features(batch)
        if eps is None:
            shape = (*seg_mask.shape, self.cfg.latent_size)
            eps = torch.stack([torch.randn(shape, device=h.device, dtype=compute_dtype(h)) for _ in range(S)], dim=1)
        rows = lambda x: x.repeat_interleave(S, dim=0)       # noqa: E731  [B, ...] -> [B * S, ...], b-major
        sample = self.latent(rows(h), rows(seg_mask), None if h_prompt is None else rows(h_prompt),
                             eps=eps.flatten(0, 1))
        big = {k: rows(v) for k, v in batch.items() if k in BATCH_KEYS}
        lw = -self.reconstruction(big, rows(seg_ids), sample.z)
        return (lw + (sample.log_ratio.sum(-1) * rows(seg_mask)).sum(1)).view(B, S)

    @torch.no_grad()
    def posterior(self, batch: dict) -> dict[str, torch.Tensor]:
        """E_q[z_k|x] and the innovation's Gaussian, padded to [B, model.max_segments, d]."""
        if not self.has_latent:
            raise ValueError("posterior() needs a latent model (model.latent is 'none')")
        self.check_batch(batch)
        h, h_prompt, seg_mask = self.features(batch)
        # z is linear in the innovations, so the mean latent is the path applied to eps = 0.
        s = self.latent(h, seg_mask, h_prompt, eps=torch.zeros(*seg_mask.shape, self.cfg.latent_size,
                                                               device=h.device, dtype=torch.float32))
        K, valid = self.cfg.max_segments, seg_mask[..., None]
        return dict(mean=_pad(s.z * valid, K, dim=1), innov_mean=_pad(s.innov_mean * valid, K, dim=1),
                    innov_logvar=_pad(s.innov_logvar * valid, K, dim=1), seg_mask=_pad(seg_mask, K, dim=1))

    def generate(self, num: int = 1, z: Optional[torch.Tensor] = None, prompts: Optional[list[list[int]]] = None,
                 gen: GenerationConfig = GenerationConfig(), generator: Optional[torch.Generator] = None,
                 latent_path: Optional[str] = None, segment: str = "sentence", use_cache: bool = True
                 ) -> list[list[int]]:
        """Sample texts; see trace_dist.model.generation.generate."""
        from trace_dist.model.generation import generate
        return generate(self, num=num, z=z, prompts=prompts, gen=gen, generator=generator,
                        latent_path=latent_path, segment=segment, use_cache=use_cache)

    # ------------------------------------------------------------ cost
    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3 x forward, matmuls only):
            6 * (P_stack + C * V) + 12 * n_layer * C * T                    decoder (PaLM-style)
          + 6 * P_stack + 12 * n_layer * C * T                              encoder (latent models)
        P_stack = n_layer * 12 C^2 (the stack's matmul weights; shared or not, each stack runs once
        per token), C V = the tied LM head, T = block_size (attention: QK^T and AV, 2 * 2 * C * T per
        layer forward). Latent heads, pooling and memory slots are O(C d) per token and are left out."""
        c = self.cfg
        p_stack = c.n_layer * 12 * c.n_embd ** 2
        attention = 12 * c.n_layer * c.n_embd * c.block_size
        flops = 6 * (p_stack + c.n_embd * self.vocab_size) + attention
        if self.has_latent:
            flops += 6 * p_stack + attention
        return int(flops)


def predicted_tokens(batch: dict) -> torch.Tensor:
    """int64 scalar: the tokens a batch's loss predicts (the per-token loss's denominator)."""
    return _loss_mask(batch).sum()


def _loss_mask(batch: dict) -> torch.Tensor:
    """Predicted tokens of real examples, [B, T]."""
    return batch["loss_mask"] & batch["example_mask"][:, None]


def _pad(x: torch.Tensor, size: int, dim: int = 0) -> torch.Tensor:
    """Zero-pad (False-pad) x along dim to `size`."""
    shape = list(x.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _check_config(cfg: ModelConfig, vocab: Vocab, vocab_size: int) -> None:
    if vocab_size < vocab.size:
        raise ValueError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's ({vocab.size})")
    bad = {n: i for n, i in vars(vocab).items() if n != "size" and not 0 <= i < vocab_size}
    if bad:
        raise ValueError(f"vocab special ids {bad} outside [0, {vocab_size}) (model.vocab_size)")
