"""TRACE generation and the baseline switches: KV cache = no cache, segment switching, filters,
per-row stopping, reconstruction from the posterior, and every switch builds, trains and generates."""

import pytest
import torch

from model_batches import build, VOCAB, make_batch, random_batch, random_segments, tiny_config
from trace_dist.model.config import GenerationConfig
from trace_dist.model.trace import TRACE
from trace_dist.model.generation import filter_probs, next_token

GREEDY = GenerationConfig(greedy=True, max_new_tokens=14)


@pytest.mark.parametrize("overrides,segment", [
    ({}, "sentence"),
    ({}, "fixed:3"),
    ({"conditional": True, "prior": "context"}, "fixed:4"),
    ({"latent": "none"}, "sentence"),
])
def test_kv_cache_equals_no_cache(overrides, segment):
    model = build(**overrides)
    prompts = [[5, 6, 7, VOCAB.sep], [9, VOCAB.sep], [11, 12, VOCAB.sep]] if overrides.get("conditional") else None
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        runs.append(model.generate(num=3, prompts=prompts, gen=GREEDY, generator=g, segment=segment,
                                   use_cache=use_cache))
    assert runs[0] == runs[1]
    assert all(len(r) > 0 for r in runs[0])
    # sampling with the same generator also agrees
    sample = GenerationConfig(max_new_tokens=10, top_k=20, top_p=0.95, temperature=0.8, repetition_penalty=1.3)
    runs = [model.generate(num=3, prompts=prompts, gen=sample, generator=torch.Generator().manual_seed(4),
                           segment=segment, use_cache=c) for c in (True, False)]
    assert runs[0] == runs[1]


def test_left_padded_rows_equal_single_rows():
    model = build(conditional=True)
    prompts = [[5, 6, 7, 8, VOCAB.sep], [9, VOCAB.sep]]
    z = torch.randn(2, 6, 8)
    together = model.generate(z=z, prompts=prompts, gen=GREEDY)
    alone = [model.generate(z=z[i:i + 1], prompts=prompts[i:i + 1], gen=GREEDY)[0] for i in range(2)]
    assert together == alone


def test_latent_switches_at_segment_boundaries():
    model = build()
    z = torch.randn(1, 6, 8) * 3
    z2 = z.clone()
    z2[:, 1:] = torch.randn(1, 5, 8) * 3                      # same first latent, different later ones
    a = model.generate(z=z, gen=GREEDY, segment="fixed:4")[0]
    b = model.generate(z=z2, gen=GREEDY, segment="fixed:4")[0]
    assert a[:4] == b[:4] and a != b
    # z with a single segment: every token keeps using it (no index error past the last latent)
    assert len(model.generate(z=z[:, :1], gen=GREEDY, segment="fixed:2")[0]) > 2


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0]])
    hist = torch.tensor([[0, 3]])
    probs = filter_probs(logits, hist, GenerationConfig(repetition_penalty=2.0, top_p=1.0, temperature=0.5))
    # penalised logits [1.5, 2.0, 1.0, -2.0], then / temperature
    assert torch.allclose(probs, torch.softmax(torch.tensor([[3.0, 4.0, 2.0, -4.0]]), -1))
    probs = filter_probs(logits, hist, GenerationConfig(top_k=2, top_p=1.0))
    assert torch.allclose(probs, torch.softmax(torch.tensor([[3.0, 2.0, -torch.inf, -torch.inf]]), -1))
    # softmax = [.66, .24, .09, .01]: top_p 0.8 keeps the first two tokens
    probs = filter_probs(logits, hist, GenerationConfig(top_p=0.8))
    assert (probs[0, :2] > 0).all() and (probs[0, 2:] == 0).all()
    u = torch.rand(200, generator=torch.Generator().manual_seed(0))
    tiny_p = next_token(logits.expand(200, -1), hist.expand(200, -1), GenerationConfig(top_p=0.01), u)
    assert tiny_p.tolist() == [0] * 200
    hot = next_token(logits.expand(200, -1), hist.expand(200, -1), GenerationConfig(top_p=1.0, temperature=100.0), u)
    assert set(hot.tolist()) == {0, 1, 2, 3}


def test_top_p_nucleus_equals_the_full_sort_nucleus():
    """The histogram top-p nucleus = the nucleus of the whole sorted vocabulary, for peaked and flat
    rows, and the inverse-CDF draw follows the filtered probabilities."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * torch.tensor([[8.0], [4.0], [1.0], [0.3], [0.05], [0.01]])
    full = torch.softmax(logits, -1)
    sorted_p, order = full.sort(-1, descending=True)
    for p in (0.5, 0.9, 0.99):
        probs = filter_probs(logits, None, GenerationConfig(top_p=p))
        keep = torch.zeros_like(full, dtype=torch.bool).scatter_(1, order, sorted_p.cumsum(-1) - sorted_p <= p)
        assert torch.equal(probs > 0, keep) and torch.allclose(probs[keep], full[keep])
    # frequencies of the inverse-CDF draw match the renormalised top-k probabilities
    row = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    u = torch.rand(20000, generator=g)
    drawn = next_token(row.expand(20000, -1), None, GenerationConfig(top_k=3, top_p=1.0), u)
    freq = torch.bincount(drawn, minlength=4).float() / 20000
    assert torch.allclose(freq[:3], torch.softmax(row[0, :3], -1), atol=0.015) and freq[3] == 0


def test_per_sample_generators_make_a_sample_batch_independent():
    """With one generator per sample, a sample's text does not depend on the others in its batch
    (how eval/generate can decode any number of prior samples together; float rounding of the
    batch size could flip a token, which does not happen here)."""
    model = build()
    gen = GenerationConfig(max_new_tokens=12, top_p=0.9)
    seeded = lambda i: torch.Generator().manual_seed(100 + i)    # noqa: E731
    together = model.generate(num=4, gen=gen, generator=[seeded(i) for i in range(4)], segment="fixed:3")
    alone = [model.generate(num=1, gen=gen, generator=[seeded(i)], segment="fixed:3")[0] for i in (2, 0)]
    assert [together[2], together[0]] == alone
    assert len({tuple(t) for t in together}) == 4


def test_overfit_model_stops_on_eos_and_reconstructs_from_posterior():
    torch.manual_seed(0)
    model = TRACE(tiny_config(n_embd=48, latent_size=8, ln_gamma=0.3), VOCAB)
    gen = torch.Generator().manual_seed(1)
    texts = [random_segments(gen, 2, 3, 5) for _ in range(4)]
    batch = make_batch(texts)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    post = model.posterior(batch)
    recon = model.generate(z=post["mean"], gen=GenerationConfig(greedy=True, max_new_tokens=30))
    expect = [b[0] + [VOCAB.sep] + b[1] for b in texts]
    assert sum(r == e for r, e in zip(recon, expect)) >= 3, (recon, expect)
    assert all(VOCAB.eos not in r and len(r) < 30 for r in recon)   # each row stopped on its own eos


BASELINES = [
    dict(latent="none"), dict(latent="single"), dict(prior="independent"), dict(prior="context"),
    dict(posterior_norm="batchnorm"), dict(posterior_norm="none"), dict(idempotent="penalty"),
    dict(idempotent="free", latent_path="scan"), dict(idempotent="oblique", latent_path="sequential"),
    dict(inject="memory"), dict(inject="embedding"), dict(share_blocks=False, pooling="last"),
    dict(encoder_scope="bidirectional"), dict(conditional=True), dict(conditional=True, latent="single"),
]


@pytest.mark.parametrize("overrides", BASELINES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_switch_builds_trains_and_generates(overrides):
    model = build(**overrides)
    cond = overrides.get("conditional", False)
    batch = random_batch(seed=2, B=3, max_k=3, conditional=cond)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        out = model(batch)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    trained = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "decoder.h.0.mlp.c_fc.weight" in trained
    if model.has_latent:
        assert "latent.heads.weight" in trained
    assert (out.kl_sum == 0) == (overrides.get("latent") == "none")
    prompts = [[5, 6, VOCAB.sep], [7, VOCAB.sep]] if cond else None
    texts = model.generate(num=2, prompts=prompts, gen=GenerationConfig(max_new_tokens=8),
                           generator=torch.Generator().manual_seed(0))
    assert len(texts) == 2 and all(0 <= t < VOCAB.size and t != VOCAB.eos for r in texts for t in r)
    assert model.training                                          # generate() restores the mode


def test_conditional_model_requires_prompts():
    with pytest.raises(ValueError, match="prompts"):
        build(conditional=True).generate(num=2)


def test_generation_stops_at_the_context_and_refuses_prompts_that_fill_it():
    import dataclasses

    gen = GenerationConfig(greedy=True, max_new_tokens=100)           # far beyond block_size 16
    model = build(block_size=16)
    model.vocab = dataclasses.replace(VOCAB, eos=-1)                  # never stops on its own
    assert [len(o) for o in model.generate(num=2, gen=gen)] == [16, 16]
    cond = build(conditional=True, block_size=16)
    cond.vocab = dataclasses.replace(VOCAB, eos=-1)
    prompts = [[5, 6, 7, VOCAB.sep], [9, VOCAB.sep]]
    for use_cache in (True, False):                                   # the longest prompt bounds the batch
        assert [len(o) for o in cond.generate(prompts=prompts, gen=gen, use_cache=use_cache)] == [12, 12]
    with pytest.raises(ValueError, match="a prompt of 16 tokens leaves no room in model.block_size"):
        cond.generate(prompts=[[5] * 15 + [VOCAB.sep]], gen=gen)
