"""Sampling from TRACE: latents from the prior (or given), then autoregressive decoding that switches
latent at segment boundaries, with a KV cache so decoding cost is linear in length.

Layout matches training (docs/INTERFACES.md): the decoder input is [bos] + prompt + generated, and
the position that predicts a token reads z of that token's segment. The segment advances after a
generated `sep` ('sentence') or after every N generated tokens ('fixed:N'); past the last latent the
last one is kept. Prompts of different lengths are left-padded; positions count from each row's
own start and pad keys are masked, so every row sees exactly what it would see alone.
A document is at most model.block_size tokens, prompt included (the positions the model has), so
decoding stops there whatever max_new_tokens says; a prompt that fills the context is refused.
"""

from __future__ import annotations

from typing import Optional

import torch

from trace_dist.model.config import GenerationConfig
from trace_dist.data.config import parse_segment
from trace_dist.model.blocks import LayerCache


def filter_logits(logits: torch.Tensor, history: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """Repetition penalty (CTRL: divide positive / multiply negative logits of tokens in `history`),
    temperature, top-k and top-p (nucleus) on logits [N, V] -> filtered logits (-inf = excluded)."""
    logits = logits.float().clone()
    if gen.repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        logits.scatter_(1, history, torch.where(seen > 0, seen / gen.repetition_penalty,
                                                seen * gen.repetition_penalty))
    if gen.greedy:
        return logits
    logits = logits / gen.temperature
    if gen.top_k > 0:
        kth = torch.topk(logits, min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if gen.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > gen.top_p           # the mass before a token already exceeds p
        logits = logits.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    return logits


def context_room(block_size: int, prompt_tokens: int) -> int:
    """Tokens that can still be generated after a prompt: the document, prompt included, is at most
    block_size tokens (the decoder reads [bos] + all but the last of them, block_size positions)."""
    return block_size - prompt_tokens


def next_token(logits: torch.Tensor, history: torch.Tensor, gen: GenerationConfig,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    logits = filter_logits(logits, history, gen)
    if gen.greedy:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


class _Segmenter:
    """Per-row segment index of the next predicted token, advanced after each generated token."""

    def __init__(self, spec: str, num_rows: int, num_latents: int, sep: int, device: torch.device) -> None:
        self.kind, self.every = parse_segment(spec)
        self.sep, self.last = sep, num_latents - 1
        self.seg = torch.zeros(num_rows, dtype=torch.long, device=device)
        self.count = torch.zeros_like(self.seg)  # tokens generated in the current segment

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """Returns the rows whose *latent* changes (a boundary before the last latent)."""
        self.count += 1
        boundary = token == self.sep if self.kind == "sentence" else self.count == self.every
        self.count = torch.where(boundary, 0, self.count)
        moved = boundary & (self.seg < self.last)
        self.seg = torch.where(moved, self.seg + 1, self.seg)
        return moved


@torch.no_grad()
def generate(model, num: int = 1, z: Optional[torch.Tensor] = None, prompts: Optional[list[list[int]]] = None,
             gen: GenerationConfig = GenerationConfig(), generator: Optional[torch.Generator] = None,
             latent_path: Optional[str] = None, segment: str = "sentence", use_cache: bool = True
             ) -> list[list[int]]:
    """Token ids per sample (no bos, stopping before eos).

    num: samples when neither z nor prompts fix the count; z [N, K, d]: fixed latents
    (reconstruction, interpolation); prompts: token ids per sample (conditional mode: each ends with
    `sep`); latent_path: how prior latents are drawn (default model.latent_path; the recurrent prior
    draws all K at once); segment: 'sentence' | 'fixed:N'; use_cache: False recomputes the whole
    prefix each step (the reference the KV cache is tested against)."""
    cfg = model.cfg
    device = model.wte.weight.device
    if cfg.conditional and prompts is None:
        raise ValueError("a conditional model (model.conditional) generates from prompts: pass prompts=")
    N = z.shape[0] if z is not None else len(prompts) if prompts is not None else num
    if prompts is not None and len(prompts) != N:
        raise ValueError(f"got {len(prompts)} prompts for {N} samples (z has {N} rows)")
    prompts = prompts or [[] for _ in range(N)]
    longest = max(len(p) for p in prompts)
    if context_room(cfg.block_size, longest) < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in model.block_size ({cfg.block_size})")
    was_training = model.training
    model.eval()
    try:
        latents = _Latents(model, N, z, prompts, generator, latent_path, device)
        return _decode_loop(model, latents, prompts, gen, generator, segment, use_cache, device)
    finally:
        model.train(was_training)


class _Latents:
    """z [N, K, d] for decoding: given, pre-sampled from the prior, or (priors that read the text:
    context, paper) drawn segment by segment from the encoder features of the text generated so far."""

    def __init__(self, model, N, z, prompts, generator, latent_path, device) -> None:
        self.model, self.prompts = model, prompts
        cfg = model.cfg
        self.z, self.lazy = None, False
        if not model.has_latent:
            return
        if z is not None:
            self.z = z.to(device=device, dtype=torch.float32)
            return
        h_prompt = _prompt_features(model, prompts, device) if cfg.conditional else None
        K = 1 if cfg.latent == "single" else cfg.max_segments
        self.eps = torch.randn(N, K, cfg.latent_size, generator=generator, device=device)
        self.h_prompt, self.path = h_prompt, latent_path
        self.lazy = model.latent.reads_text
        no_text = self.eps.new_zeros(N, 0, cfg.n_embd) if self.lazy else None   # z_0 reads the prompt only
        self.z = model.latent.sample_prior(self.eps, h_prompt, latent_path, h=no_text).float()

    @property
    def num(self) -> int:
        return 1 if self.z is None else self.z.shape[1]

    def update(self, rows: torch.Tensor, seg: torch.Tensor, generated: list[list[int]],
               gen_segs: list[list[int]]) -> None:
        """Priors that read the text (context, paper): z[r, s] for rows that just entered segment s, drawn
        from the prior given the features of the text generated so far."""
        if not self.lazy or not rows.any():
            return
        batch = _text_batch(self.model, self.prompts, generated, gen_segs, self.z.device)
        h, _, _ = self.model.features(batch)
        z = self.model.latent.sample_prior(self.eps, self.h_prompt, self.path, h=h)
        for r in rows.nonzero().flatten().tolist():
            s = int(seg[r])
            self.z[r, s] = z[r, s].float()


def _decode_loop(model, latents: _Latents, prompts, gen, generator, segment, use_cache, device):
    vocab = model.vocab
    N = len(prompts)
    # Left-padded decoder prefix [bos] + prompt; the last prefix position predicts segment 0.
    P = 1 + max(len(p) for p in prompts)
    seqs = torch.full((N, P), vocab.pad, dtype=torch.long, device=device)
    valid = torch.zeros(N, P, dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):
        seqs[r, P - 1 - len(p):] = torch.tensor([vocab.bos] + list(p), dtype=torch.long)
        valid[r, P - 1 - len(p):] = True
    segs = torch.full((N, P), -1, dtype=torch.long, device=device)
    segs[:, -1] = 0
    start = (~valid).sum(1, keepdim=True)                  # each row's first real position
    segmenter = _Segmenter(segment, N, latents.num, vocab.sep, device)
    caches = [LayerCache() for _ in model.decoder.h] if use_cache else None
    done = torch.zeros(N, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(N)]
    gen_segs: list[list[int]] = [[] for _ in range(N)]
    fed = 0                                                  # positions already in the KV cache
    for _ in range(min(gen.max_new_tokens, context_room(model.cfg.block_size, P - 1))):
        L = seqs.shape[1]
        lo = fed if use_cache else 0
        pos = (torch.arange(lo, L, device=device)[None] - start).clamp_min(0)
        logits = model.decode(seqs[:, lo:], pos, segs[:, lo:], latents.z, key_valid=valid, caches=caches)
        fed = L
        history = torch.where(valid, seqs, vocab.bos)
        token = next_token(logits[:, -1], history, gen, generator)
        token = torch.where(done, vocab.pad, token)
        finished = ~done & (token == vocab.eos)
        for r in (~done & ~finished).nonzero().flatten().tolist():
            out[r].append(int(token[r]))
            gen_segs[r].append(int(segmenter.seg[r]))
        done |= finished
        if done.all():
            break
        moved = segmenter.advance(token) & ~done
        latents.update(moved, segmenter.seg, out, gen_segs)
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones_like(done)[:, None]], dim=1)
        segs = torch.cat([segs, segmenter.seg[:, None]], dim=1)
    return out


def _prompt_features(model, prompts: list[list[int]], device) -> torch.Tensor:
    """Pooled encoder features of the prompts alone, [N, C] (prompt tokens only see the prompt in
    training too, so this equals the training-time g input)."""
    return model.features(_text_batch(model, prompts, [[] for _ in prompts], [[] for _ in prompts], device))[1]


def _text_batch(model, prompts, generated, gen_segs, device) -> dict:
    """A contract batch (right-padded) of prompt + generated tokens with their segment ids."""
    vocab = model.vocab
    rows = [list(p) + list(g) for p, g in zip(prompts, generated)]
    T = max(1, max(len(r) for r in rows))
    N = len(rows)
    tokens = torch.full((N, T), vocab.pad, dtype=torch.long)
    seg_ids = torch.full((N, T), -1, dtype=torch.long)
    prompt_mask = torch.zeros(N, T, dtype=torch.bool)
    for r, (p, g, s) in enumerate(zip(prompts, generated, gen_segs)):
        tokens[r, :len(p) + len(g)] = torch.tensor(list(p) + list(g), dtype=torch.long)
        seg_ids[r, len(p):len(p) + len(s)] = torch.tensor(s, dtype=torch.long)
        prompt_mask[r, :len(p)] = True
    num_segments = (seg_ids.amax(1) + 1).clamp_min(0)
    batch = dict(tokens=tokens, seg_ids=seg_ids, loss_mask=seg_ids >= 0, prompt_mask=prompt_mask,
                 num_segments=num_segments, example_mask=torch.ones(N, dtype=torch.bool))
    return {k: v.to(device) for k, v in batch.items()}
