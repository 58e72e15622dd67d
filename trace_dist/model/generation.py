"""Sampling from TRACE: latents from the prior (or given), then autoregressive decoding that switches
latent at segment boundaries, with a KV cache so decoding cost is linear in length.

Layout matches training (docs/INTERFACES.md): the decoder input is [bos] + prompt + generated, and
the position that predicts a token reads z of that token's segment. The segment advances after a
generated `sep` ('sentence') or after every N generated tokens ('fixed:N'); past the last latent the
last one is kept. Prompts of different lengths are left-padded; positions count from each row's
own start and pad keys are masked, so every row sees exactly what it would see alone.
A document is at most model.block_size tokens, prompt included (the positions the model has), so
decoding stops there whatever max_new_tokens says; a prompt that fills the context is refused.
Each token is drawn by inverse CDF from one uniform per row and step, so a row can have its own
generator (its text then does not depend on its batch); a row that ends leaves the batch.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from trace_dist.model.config import GenerationConfig
from trace_dist.data.config import parse_segment
from trace_dist.model.blocks import LayerCache


BUCKETS, BUCKET_NATS = 1024, 24.0   # top-p histogram: 1024 log-probability buckets over 24 nats below the top


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [N, V] -> the same with the tokens outside each row's top-p nucleus zeroed: a token is
    kept when the mass of the tokens more likely than it is at most p (Holtzman et al.).

    Without sorting the vocabulary (sorting V was a quarter of generation time): a token's log-prob
    gap to the row's best picks one of BUCKETS buckets, one scatter_add sums each bucket's mass, and
    the bucket where the cumulative mass passes p is the only place the nucleus edge can be. Buckets
    above it are kept, below it dropped, and only its few tokens are sorted. Same kept set as a full
    sort, up to float rounding of the running sum at the edge."""
    N = probs.shape[0]
    gap = (probs.amax(-1, keepdim=True).log() - probs.log()) * (BUCKETS / BUCKET_NATS)    # [N, V], inf for p = 0
    bucket = gap.clamp_max(BUCKETS - 1).long()
    mass = torch.zeros(N, BUCKETS, dtype=probs.dtype, device=probs.device).scatter_add_(1, bucket, probs)
    cum = mass.cumsum(-1)                                                 # [N, BUCKETS] mass down to each bucket
    edge = (cum <= top_p).sum(-1, keepdim=True)                           # [N, 1] the bucket that passes p
    before = torch.where(edge > 0, cum.gather(1, (edge - 1).clamp_min(0)), 0.0)   # mass of the buckets above it
    out = torch.where(bucket < edge, probs, 0.0)
    band = (bucket == edge) & (probs > 0)
    vals, ids = torch.topk(torch.where(band, probs, -1.0), max(1, int(band.sum(-1).max())), dim=-1)
    vals = vals.clamp_min(0.0)                                            # [N, C] the edge bucket, sorted
    kept = before + vals.cumsum(-1) - vals <= top_p
    return out.scatter_add_(1, ids, torch.where(kept, vals, 0.0))


def filter_probs(logits: torch.Tensor, history: Optional[torch.Tensor], gen: GenerationConfig) -> torch.Tensor:
    """Repetition penalty (CTRL: divide positive / multiply negative logits of tokens in `history`),
    temperature, top-k (renormalised over the k, as HF does) and top-p on logits [N, V] ->
    sampling probabilities [N, V] (0 = excluded; unnormalised after top-p). Greedy: one-hot argmax."""
    logits = logits.float().clone()
    if gen.repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        logits.scatter_(1, history, torch.where(seen > 0, seen / gen.repetition_penalty,
                                                seen * gen.repetition_penalty))
    if gen.greedy:
        return torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / gen.temperature
    if gen.top_k > 0:
        vals, ids = torch.topk(logits, min(gen.top_k, logits.shape[-1]), dim=-1)
        probs = torch.zeros_like(logits).scatter_(1, ids, torch.softmax(vals, dim=-1))
    else:
        probs = torch.softmax(logits, dim=-1)
    return nucleus(probs, gen.top_p) if gen.top_p < 1.0 else probs


def context_room(block_size: int, prompt_tokens: int) -> int:
    """Tokens that can still be generated after a prompt: the document, prompt included, is at most
    block_size tokens (the decoder reads [bos] + all but the last of them, block_size positions)."""
    return block_size - prompt_tokens


def next_token(logits: torch.Tensor, history: Optional[torch.Tensor], gen: GenerationConfig, u: torch.Tensor) -> torch.Tensor:
    """One token per row [N] from logits [N, V], by inverse CDF with the row's uniform u [N] in [0, 1):
    the token whose cumulative probability interval holds u (a multinomial draw that needs one
    number per row, so a row's draw can come from its own generator)."""
    probs = filter_probs(logits, history, gen)
    if gen.greedy:
        return probs.argmax(-1)
    cdf = probs.cumsum(-1)                                                  # [N, V]
    pick = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True)
    return pick.clamp_max(cdf.shape[1] - 1).squeeze(1)


Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def random_draws(generator: Generators, N: int, K: int, d: int, steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prior noise [N, K, d], one uniform per row and decoding step [N, steps]).

    One generator: all rows draw from it (noise first, then the uniforms), so a row depends on the
    batch. A sequence of N generators: row r draws only from generator[r] (its noise [K, d], then its
    uniforms [steps]), so a row's draws are the same in any batch (the prior samples of eval/generate)."""
    if generator is None or isinstance(generator, torch.Generator):
        eps = torch.randn(N, K, d, generator=generator, device=device)
        return eps, torch.rand(N, steps, generator=generator, device=device)
    if len(generator) != N:
        raise ValueError(f"got {len(generator)} generators for {N} samples")
    eps = [torch.randn(K, d, generator=g, device=g.device) for g in generator]
    u = [torch.rand(steps, generator=g, device=g.device) for g in generator]
    return torch.stack(eps).to(device), torch.stack(u).to(device)


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

    def keep(self, rows: torch.Tensor) -> None:
        self.seg, self.count = self.seg[rows], self.count[rows]


@torch.no_grad()
def generate(model, num: int = 1, z: Optional[torch.Tensor] = None, prompts: Optional[list[list[int]]] = None,
             gen: GenerationConfig = GenerationConfig(), generator: Generators = None,
             latent_path: Optional[str] = None, segment: str = "sentence", use_cache: bool = True
             ) -> list[list[int]]:
    """Token ids per sample (no bos, stopping before eos).

    num: samples when neither z nor prompts fix the count; z [N, K, d]: fixed latents
    (reconstruction, interpolation); prompts: token ids per sample (conditional mode: each ends with
    `sep`); generator: one for the whole batch, or one per sample (each sample's text then depends
    on its own generator only: see `random_draws`); latent_path: how prior latents are drawn
    (default model.latent_path; the recurrent prior draws all K at once); segment: 'sentence' |
    'fixed:N'; use_cache: False recomputes the whole prefix each step (the reference the KV cache is
    tested against)."""
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
    steps = min(gen.max_new_tokens, context_room(cfg.block_size, longest))
    K = 0 if z is not None or not model.has_latent else 1 if cfg.latent == "single" else cfg.max_segments
    eps, uniforms = random_draws(generator, N, K, cfg.latent_size, steps, device)
    was_training = model.training
    model.eval()
    try:
        latents = _Latents(model, z, eps, prompts, latent_path, device)
        return _decode_loop(model, latents, prompts, gen, uniforms, segment, use_cache, device)
    finally:
        model.train(was_training)


class _Latents:
    """z [N, K, d] for decoding: given, from the prior noise eps [N, K, d], or (priors that read the
    text: context, paper) drawn segment by segment from the encoder features of the text generated so far."""

    def __init__(self, model, z, eps, prompts, latent_path, device) -> None:
        self.model, self.prompts = model, prompts
        cfg = model.cfg
        self.z, self.lazy = None, False
        if not model.has_latent:
            return
        if z is not None:
            self.z = z.to(device=device, dtype=torch.float32)
            return
        h_prompt = _prompt_features(model, prompts, device) if cfg.conditional else None
        self.eps, self.h_prompt, self.path = eps, h_prompt, latent_path
        self.lazy = model.latent.reads_text
        no_text = eps.new_zeros(eps.shape[0], 0, cfg.n_embd) if self.lazy else None   # z_0 reads the prompt only
        self.z = model.latent.sample_prior(eps, h_prompt, latent_path, h=no_text).float()

    @property
    def num(self) -> int:
        return 1 if self.z is None else self.z.shape[1]

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows go on decoding."""
        if self.z is None:
            return
        self.z = self.z[rows]
        if self.lazy:
            self.eps = self.eps[rows]
            self.h_prompt = None if self.h_prompt is None else self.h_prompt[rows]
            self.prompts = [self.prompts[r] for r in rows.tolist()]

    def update(self, rows: torch.Tensor, seg: torch.Tensor, generated: list[list[int]],
               gen_segs: list[list[int]]) -> None:
        """Priors that read the text (context, paper): z[r, s] for rows that just entered segment s, drawn
        from the prior given the features of the text generated so far."""
        batch = _text_batch(self.model, self.prompts, generated, gen_segs, self.z.device)
        h, _, _ = self.model.features(batch)
        z = self.model.latent.sample_prior(self.eps, self.h_prompt, self.path, h=h)
        for r in rows.nonzero().flatten().tolist():
            s = int(seg[r])
            self.z[r, s] = z[r, s].float()


def _decode_loop(model, latents: _Latents, prompts, gen, uniforms, segment, use_cache, device):
    """uniforms [N, steps]: row r's draw at step t. Token, validity and segment buffers are allocated
    once for the longest document (growing them by concatenation each step cost ~10%), and a row
    that ends (eos) leaves the batch, so the decoder only runs the rows still generating."""
    vocab = model.vocab
    N, steps = uniforms.shape
    # Left-padded decoder prefix [bos] + prompt; the last prefix position predicts segment 0.
    P = 1 + max(len(p) for p in prompts)
    seqs = torch.full((N, P + steps), vocab.pad, dtype=torch.long, device=device)
    valid = torch.zeros(N, P + steps, dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):
        seqs[r, P - 1 - len(p):P] = torch.tensor([vocab.bos] + list(p), dtype=torch.long)
        valid[r, P - 1 - len(p):P] = True
    # segs[:, j]: the latent position j reads, i.e. the segment of the token at j + 1
    segs = torch.full((N, P + steps), -1, dtype=torch.long, device=device)
    segs[:, P - 1] = 0
    start = (~valid[:, :P]).sum(1, keepdim=True)           # each row's first real position
    segmenter = _Segmenter(segment, N, latents.num, vocab.sep, device)
    caches = [LayerCache() for _ in model.decoder.h] if use_cache else None
    length = torch.zeros(N, dtype=torch.long, device=device)      # tokens generated before eos
    rows = list(range(N))                                    # the sample each remaining row is
    out: list[list[int]] = [[] for _ in range(N)]
    fed = 0                                                  # positions already in the KV cache
    for t in range(steps):
        L = P + t
        lo = fed if use_cache else 0
        pos = (torch.arange(lo, L, device=device)[None] - start).clamp_min(0)
        logits = model.decode(seqs[:, lo:L], pos, segs[:, lo:L], latents.z, key_valid=valid[:, :L], caches=caches)
        fed = L
        history = torch.where(valid[:, :L], seqs[:, :L], vocab.bos) if gen.repetition_penalty != 1.0 else None
        token = next_token(logits[:, -1], history, gen, uniforms[:, t])
        seqs[:, L] = token
        ended = token == vocab.eos
        length += ~ended
        if ended.all() or t == steps - 1:
            break
        valid[:, L] = True
        moved = segmenter.advance(token) & ~ended
        if latents.lazy and moved.any():
            gen_ids = [seqs[r, P:P + n].tolist() for r, n in enumerate(length.tolist())]
            gen_segs = [segs[r, P - 1:P - 1 + n].tolist() for r, n in enumerate(length.tolist())]
            latents.update(moved, segmenter.seg, gen_ids, gen_segs)
        segs[:, L] = segmenter.seg
        if ended.any():                                      # finished rows leave the batch
            for r in ended.nonzero().flatten().tolist():
                out[rows[r]] = seqs[r, P:P + int(length[r])].tolist()
            keep = (~ended).nonzero().flatten()
            rows = [rows[r] for r in keep.tolist()]
            seqs, valid, segs, start, length, uniforms = (x[keep] for x in (seqs, valid, segs, start, length, uniforms))
            segmenter.keep(keep)
            latents.keep(keep)
            for c in caches or []:
                c.k, c.v = c.k[keep], c.v[keep]
    for r, n in enumerate(length.tolist()):
        out[rows[r]] = seqs[r, P:P + n].tolist()
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
