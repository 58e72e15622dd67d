"""Attention kernels: which path each layout takes, and that every path computes the same thing.

The kernels are spied on at the call (F.scaled_dot_product_attention with its is_causal/attn_mask,
blocks.flex_attention), so the path asserted is the one that ran. FlexAttention runs on CPU in
torch 2.13 forward-only (unfused), so its agreement is checked without gradients; its backward is
CUDA-only and is exercised by benchmarks/gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_batches import build, random_batch
from trace_dist.model import blocks
from trace_dist.model.trace import decoder_mask, encoder_mask

pytestmark = [pytest.mark.skipif(blocks.flex_attention is None, reason="torch without FlexAttention"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


@pytest.fixture
def kernels(monkeypatch):
    """Records one entry per attention call: 'sdpa_causal', 'sdpa', 'sdpa_mask' or 'flex'."""
    calls: list[str] = []
    sdpa, flex = F.scaled_dot_product_attention, blocks.flex_attention

    def spy_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append("sdpa_causal" if is_causal else "sdpa" if attn_mask is None else "sdpa_mask")
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    def spy_flex(*args, **kw):
        calls.append("flex")
        return flex(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(blocks, "flex_attention", spy_flex)
    return calls


# model overrides -> (encoder path, decoder path) of a training forward on CPU by default
LAYOUTS = {
    "plain_lm": (dict(latent="none"), None, "sdpa_causal"),
    "embedding": (dict(inject="embedding"), "sdpa_mask", "sdpa_causal"),
    "memory": (dict(inject="memory"), "sdpa_mask", "sdpa_mask"),
    "both_conditional": (dict(inject="both", conditional=True, prior="context"), "sdpa_mask", "sdpa_mask"),
}


def _forward(model, batch):
    with torch.no_grad():
        return model(batch)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_training_forward_takes_the_expected_kernels(name, kernels):
    overrides, enc, dec = LAYOUTS[name]
    model = build(**overrides).eval()
    n = model.cfg.n_layer
    _forward(model, random_batch(conditional=model.cfg.conditional))
    assert kernels == ([] if enc is None else [enc] * n) + [dec] * n
    # The same structured masks go to FlexAttention when it is wanted (the CUDA default).
    kernels.clear()
    with blocks.use_flex(True):
        _forward(model, random_batch(conditional=model.cfg.conditional))
    flexed = [p.replace("sdpa_mask", "flex") for p in ([] if enc is None else [enc] * n) + [dec] * n]
    assert kernels == flexed


def test_default_policy_on_cuda_and_with_dropout():
    """Flex is the default for structured masks on CUDA (no GPU needed: the policy reads the device);
    never for a single query (nothing to tile) or under attention dropout (flex has none)."""
    seg = torch.zeros(2, 8, dtype=torch.long)
    cuda = torch.device("cuda")
    enc = encoder_mask(seg, torch.zeros(2, 8, dtype=torch.bool), "segment_causal")
    enc.device = cuda
    assert enc.path(0.0) == "flex" and enc.path(0.1) == "sdpa_mask"
    enc.device = torch.device("cpu")
    assert enc.path(0.0) == "sdpa_mask"
    one = decoder_mask(seg[:, :1], None, 9, num_slots=3)
    one.device = cuda
    assert one.path(0.0) == "sdpa_mask"
    assert decoder_mask(seg, None, 8, num_slots=0).path(0.0) == "sdpa_causal"
    assert decoder_mask(seg[:, :1], torch.ones(2, 9, dtype=torch.bool), 9, num_slots=0).path(0.0) == "sdpa"
    padded = torch.ones(2, 9, dtype=torch.bool)
    padded[0, 0] = False
    assert decoder_mask(seg[:, :1], padded, 9, num_slots=0).path(0.0) == "sdpa_mask"


def _reference_decoder_mask(seg_ids, key_valid, num_slots):
    """The explicit construction the mask_mod replaced: [B, 1, Tq, M + L]."""
    B, Tq = seg_ids.shape
    L = key_valid.shape[1]
    q_pos, k_pos = torch.arange(L - Tq, L), torch.arange(L)
    tokens = ((k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]) | (k_pos[None, :] == q_pos[:, None])[None]
    slots = seg_ids[:, :, None] == torch.arange(num_slots)
    return torch.cat([slots, tokens], dim=2)[:, None]


def _reference_encoder_mask(seg_ids, prompt_mask, scope):
    qs, ks = seg_ids[:, :, None], seg_ids[:, None, :]
    target_q = qs >= 0
    see_target = (ks >= 0) & ((ks <= qs) if scope == "segment_causal" else True)
    allowed = (prompt_mask[:, None, :] & (target_q | prompt_mask[:, :, None])) | (target_q & see_target)
    return (allowed | torch.eye(seg_ids.shape[1], dtype=torch.bool))[:, None]


@pytest.mark.parametrize("scope", ["segment_causal", "bidirectional"])
def test_masks_say_who_sees_whom(scope):
    batch = random_batch(seed=3, B=4, conditional=True, padding_examples=1)
    seg, prompt = batch["seg_ids"], batch["prompt_mask"]
    assert torch.equal(encoder_mask(seg, prompt, scope).dense(), _reference_encoder_mask(seg, prompt, scope))
    B, T = seg.shape
    valid = torch.rand(B, T + 3, generator=torch.Generator().manual_seed(0)) > 0.2   # left-padding-like holes
    for Tq in (T + 3, 5, 1):                      # prefill, a chunk after a cache, one decoding step
        q_seg = torch.randint(-1, 4, (B, Tq))
        for slots in (0, 4):
            got = decoder_mask(q_seg, valid, T + 3, slots).dense()
            assert torch.equal(got, _reference_decoder_mask(q_seg, valid, slots)), (Tq, slots)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_path_computes_the_same_loss(name, monkeypatch):
    """Default kernels vs all-dense vs FlexAttention (fp32, 1e-5): loss and IW log-weights."""
    overrides = LAYOUTS[name][0]
    model = build(**overrides).eval()
    batch = random_batch(seed=1, conditional=model.cfg.conditional, padding_examples=1)

    def run():
        torch.manual_seed(0)                                        # same posterior noise each run
        out = _forward(model, batch)
        torch.manual_seed(0)
        return torch.stack([out.loss, out.rec_sum]), model.log_weights(batch, 2)

    default = run()
    with blocks.use_flex(True):
        flex = run()
    monkeypatch.setattr(blocks.AttentionMask, "path", lambda self, dropout_p: "sdpa_mask")
    dense = run()
    for other in (flex, dense):
        for a, b in zip(default, other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(inject="embedding"), dict(inject="both"), dict(latent="none")])
def test_cached_generation_is_the_same_on_every_path(overrides, kernels):
    """KV-cached greedy decoding with left-padded prompts (padded keys) and without (causal prefill,
    then single-query steps with no mask): dense SDPA and FlexAttention pick the same tokens."""
    from trace_dist.model.config import GenerationConfig

    model = build(**overrides)
    gen = GenerationConfig(max_new_tokens=12, greedy=True)
    z = torch.randn(2, model.cfg.max_segments, model.cfg.latent_size) if model.has_latent else None
    for prompts in (None, [[5, 6, 7, 3], [8, 3]]):
        kernels.clear()
        default = model.generate(z=z, prompts=prompts, gen=gen, num=2)
        used = set(kernels)
        with blocks.use_flex(True):
            flex = model.generate(z=z, prompts=prompts, gen=gen, num=2)
        assert default == flex
        if prompts is None and overrides.get("inject") != "both":
            assert used == {"sdpa_causal", "sdpa"}            # mask-free: prefill causal, then one query
        else:
            assert used == {"sdpa_mask"}
