"""Hand-built batches that follow the batch contract in docs/INTERFACES.md (helpers for the model
tests; pytest collects no tests here)."""

from __future__ import annotations

import torch

from trace_dist.model.config import ModelConfig
from trace_dist.vocab import Vocab

VOCAB = Vocab(size=50, bos=1, eos=2, pad=0, sep=3)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, latent_size=8, max_segments=6)
    return ModelConfig(**{**base, **overrides})


def random_segments(gen: torch.Generator, num_segments: int, lo: int = 2, hi: int = 6,
                    vocab: Vocab = VOCAB) -> list[list[int]]:
    """Segment bodies of random length in [lo, hi) with ids above the special tokens."""
    lengths = torch.randint(lo, hi, (num_segments,), generator=gen).tolist()
    return [torch.randint(4, vocab.size, (n,), generator=gen).tolist() for n in lengths]


def make_batch(examples: list[list[list[int]]], prompts: list[list[int]] | None = None,
               vocab: Vocab = VOCAB, T: int | None = None, padding_examples: int = 0) -> dict:
    """examples[b] = segment bodies; each segment gets `sep` appended, the last one `eos`.
    prompts[b] = prompt bodies (get `sep` appended). Padding examples are all pad, K = 0."""
    rows, segs, prompt_flags = [], [], []
    for b, example in enumerate(examples):
        toks, ids = [], []
        if prompts is not None:
            toks += prompts[b] + [vocab.sep]
            ids += [-1] * (len(prompts[b]) + 1)
        for k, body in enumerate(example):
            seg = body + [vocab.eos if k == len(example) - 1 else vocab.sep]
            toks += seg
            ids += [k] * len(seg)
        rows.append(toks)
        segs.append(ids)
        prompt_flags.append(0 if prompts is None else len(prompts[b]) + 1)
    T = T or max(len(r) for r in rows)
    B = len(rows) + padding_examples
    tokens = torch.full((B, T), vocab.pad, dtype=torch.long)
    seg_ids = torch.full((B, T), -1, dtype=torch.long)
    prompt_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (toks, ids, p) in enumerate(zip(rows, segs, prompt_flags)):
        tokens[b, :len(toks)] = torch.tensor(toks)
        seg_ids[b, :len(ids)] = torch.tensor(ids)
        prompt_mask[b, :p] = True
    num_segments = torch.tensor([len(e) for e in examples] + [0] * padding_examples)
    return dict(tokens=tokens, seg_ids=seg_ids, loss_mask=seg_ids >= 0, prompt_mask=prompt_mask,
                num_segments=num_segments,
                example_mask=torch.arange(B) < len(examples), bad_samples=torch.tensor(0))


def random_batch(seed: int = 0, B: int = 3, max_k: int = 4, conditional: bool = False, **kw) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ks = [max_k] + torch.randint(1, max_k + 1, (B - 1,), generator=gen).tolist()   # ragged K
    examples = [random_segments(gen, k) for k in ks]
    prompts = [torch.randint(4, VOCAB.size, (int(torch.randint(1, 4, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in ks] if conditional else None
    return make_batch(examples, prompts, **kw)


def build(seed: int = 0, **overrides):
    """A tiny TRACE whose latent injection is non-zero, as after training: it starts at zero (the
    model starts as the plain LM), and the structural tests must see z reach the decoder."""
    from trace_dist.model.trace import TRACE

    torch.manual_seed(seed)
    model = TRACE(tiny_config(**overrides), VOCAB)
    if model.injection is not None:
        for p in model.injection.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return model
