"""TRACE model: output contract, masks, latent paths, KL floor, gradients, checkpointing, overfitting."""

import math

import pytest
import torch

from model_batches import build, VOCAB, make_batch, random_batch, random_segments, tiny_config
from trace_dist.model.trace import TRACE, TraceOutput
from trace_dist.model.latent import Latent, latent_path, layer_norm_fixed


# ---------------------------------------------------------------------------- output contract
def test_output_contract_and_padding_examples():
    model = build()
    batch = random_batch(seed=1, B=3, max_k=4)
    out = model(batch)
    assert isinstance(out, TraceOutput)
    K = model.cfg.max_segments
    assert out.kl_per_segment_sum.shape == (K,) and out.seg_count.shape == (K,)
    counts = torch.stack([(batch["num_segments"] > k).sum() for k in range(K)])
    assert torch.equal(out.seg_count, counts)
    assert out.num_tokens == batch["loss_mask"].sum() and out.num_examples == 3
    assert torch.allclose(out.kl_per_segment_sum.sum(), out.kl_sum)
    assert torch.allclose(out.loss, (out.rec_sum + out.kl_sum) / out.num_tokens)
    assert out.kl_floor == pytest.approx(8 * 0.5 ** 2 / 2)
    assert {"ln_var", "idempotency_gap"} <= set(out.aux)
    # beta and free bits act on the loss only
    torch.manual_seed(3)
    half = model(batch, beta=0.5)
    torch.manual_seed(3)
    fb = model(batch, free_bits=5.0)
    assert torch.allclose(half.loss, (half.rec_sum + 0.5 * half.kl_sum) / half.num_tokens)
    assert fb.loss > (fb.rec_sum + fb.kl_sum) / fb.num_tokens and torch.allclose(fb.kl_sum, half.kl_sum)
    # a padding example (example_mask False, K = 0) and extra pad columns change no sum
    padded = random_batch(seed=1, B=3, max_k=4, T=batch["tokens"].shape[1] + 5, padding_examples=1)
    out2 = model(padded)
    assert torch.allclose(out2.kl_sum, out.kl_sum, rtol=1e-5) and out2.num_tokens == out.num_tokens
    assert torch.equal(out2.seg_count, out.seg_count) and out2.num_examples == 3


def test_bad_batch_errors_name_the_field():
    model = build()
    batch = random_batch()
    with pytest.raises(KeyError, match="seg_ids"):
        model({k: v for k, v in batch.items() if k != "seg_ids"})
    too_many = dict(batch, num_segments=batch["num_segments"] + 10)
    with pytest.raises(ValueError, match="max_segments"):
        model(too_many)
    with pytest.raises(TypeError, match="loss_mask"):
        model(dict(batch, loss_mask=batch["loss_mask"].long()))
    with pytest.raises(ValueError, match="vocab_size"):
        model(dict(batch, tokens=batch["tokens"] + VOCAB.size))


# ---------------------------------------------------------------------------- masks
def test_decoder_is_causal_and_reads_only_its_segment_latent():
    model = build(inject="both").eval()
    gen = torch.Generator().manual_seed(2)
    batch = make_batch([random_segments(gen, 3), random_segments(gen, 3)])
    seg = batch["seg_ids"]
    inp = model.decoder_input(batch["tokens"])
    T = inp.shape[1]
    pos = torch.arange(T)
    z = torch.randn(2, 3, 8)
    base = model.decode(inp, pos, seg, z)
    t = 5
    changed = inp.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB.size
    out = model.decode(changed, pos, seg, z)
    assert torch.equal(out[:, :t], base[:, :t])                 # no token sees a later token
    assert not torch.allclose(out[:, t], base[:, t])
    z2 = z.clone()
    z2[:, 1] += 1.0                                              # segment 1's latent only
    out = model.decode(inp, pos, seg, z2)
    for b in range(2):
        first = int((seg[b] == 1).nonzero()[0])
        assert torch.equal(out[b, :first], base[b, :first])     # earlier segments never read z_1
        assert not torch.allclose(out[b, seg[b] == 1], base[b, seg[b] == 1])


@pytest.mark.parametrize("scope", ["segment_causal", "bidirectional"])
def test_encoder_scope(scope):
    model = build(encoder_scope=scope, conditional=True).eval()
    gen = torch.Generator().manual_seed(4)
    batch = make_batch([random_segments(gen, 4), random_segments(gen, 2)], prompts=[[5, 6, 7], [8, 9]])
    h, hp, _ = model.features(batch)
    b, j = 0, 2
    t = int((batch["seg_ids"][b] == j).nonzero()[0])
    changed = dict(batch, tokens=batch["tokens"].clone())
    changed["tokens"][b, t] = (changed["tokens"][b, t] + 1) % VOCAB.size
    h2, hp2, _ = model.features(changed)
    assert torch.equal(hp2, hp)                                  # the prompt never sees the target
    assert torch.equal(h2[1], h[1])                              # other examples untouched
    assert not torch.allclose(h2[b, j], h[b, j])
    if scope == "segment_causal":
        assert torch.equal(h2[b, :j], h[b, :j]) and not torch.allclose(h2[b, j + 1], h[b, j + 1])
    else:
        assert not torch.allclose(h2[b, :j], h[b, :j])
    # pad tokens are invisible
    pad = dict(batch, tokens=batch["tokens"].clone())
    pad["tokens"][batch["seg_ids"] < 0] = 7
    pad["tokens"][batch["prompt_mask"]] = batch["tokens"][batch["prompt_mask"]]
    h3, hp3, _ = model.features(pad)
    assert torch.equal(h3, h) and torch.equal(hp3, hp)
    # a prompt token changes every segment's features
    changed = dict(batch, tokens=batch["tokens"].clone())
    changed["tokens"][b, 0] = (changed["tokens"][b, 0] + 1) % VOCAB.size
    h4, hp4, _ = model.features(changed)
    assert not torch.allclose(hp4[b], hp[b]) and not torch.allclose(h4[b, 0], h[b, 0])


# ---------------------------------------------------------------------------- latent paths
def _latent(dtype, **overrides) -> Latent:
    torch.manual_seed(0)
    return Latent(tiny_config(**overrides)).to(dtype)


@pytest.mark.parametrize("kind", ["projector", "oblique"])
def test_paths_agree_for_exact_idempotent_w(kind):
    # fp64: absolute 1e-10; fp32: 1e-5 relative to the largest latent (elementwise relative error is
    # meaningless for entries near 0)
    for dtype, rel in [(torch.float64, None), (torch.float32, 1e-5)]:
        lat = _latent(dtype, idempotent=kind, conditional=True)
        with torch.no_grad():  # make W far from the initial orthogonal projector
            for p in lat.transition.parameters():
                p.add_(torch.randn_like(p))
        g = torch.Generator().manual_seed(1)
        h = torch.randn(3, 16, 32, generator=g, dtype=dtype)
        hp = torch.randn(3, 32, generator=g, dtype=dtype)
        eps = torch.randn(3, 16, 8, generator=g, dtype=dtype)
        mask = torch.arange(16)[None] < torch.tensor([16, 9, 1])[:, None]
        outs = {p: lat(h, mask, hp, eps=eps, path=p) for p in ("sequential", "parallel", "scan")}
        ref = outs["sequential"]
        assert ref.z.dtype == dtype
        assert (ref.z.abs() > 1).any()                               # a non-trivial recurrence
        for p in ("parallel", "scan"):
            for a, b in ((outs[p].z, ref.z), (outs[p].kl, ref.kl)):
                err = (a - b).abs().max()
                assert err <= (1e-10 if rel is None else rel * b.abs().max()), (p, dtype, err.item())


def test_full_model_loss_equal_across_paths():
    losses = {}
    for path in ("sequential", "parallel", "scan"):
        model = build(latent_path=path, conditional=True).double()
        torch.manual_seed(5)
        losses[path] = model(random_batch(seed=5, conditional=True)).loss
    assert abs(losses["parallel"] - losses["sequential"]) < 1e-10
    assert abs(losses["scan"] - losses["sequential"]) < 1e-10


def test_scan_is_exact_for_any_w_and_parallel_is_not():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 13, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 5, generator=g, dtype=torch.float64) / 3
    z0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    z_seq, m_seq = latent_path(u, w, z0, "sequential")
    z_scan, m_scan = latent_path(u, w, z0, "scan")
    torch.testing.assert_close(z_scan, z_seq, rtol=0, atol=1e-10)
    torch.testing.assert_close(m_scan, m_seq, rtol=0, atol=1e-10)
    torch.testing.assert_close(z_seq, m_seq + u)
    assert (latent_path(u, w, z0, "parallel")[0] - z_seq).abs().max() > 1e-2


def test_penalty_mode_logs_gaps_and_adds_penalty():
    model = build(idempotent="penalty", idempotent_penalty=2.0)
    with torch.no_grad():
        model.latent.transition.W.add_(0.1 * torch.randn(8, 8))
    batch = random_batch()
    out = model(batch)
    w = model.latent.transition.W
    gap = torch.linalg.matrix_norm(w @ w - w)
    assert out.aux["idempotency_gap"] == pytest.approx(gap.item(), rel=1e-5)
    assert out.aux["latent_path_gap"] > 0
    assert torch.allclose(out.loss, (out.rec_sum + out.kl_sum) / out.num_tokens + 2.0 * gap ** 2, rtol=1e-5)
    out.loss.backward()
    assert w.grad.abs().sum() > 0


def test_latent_module_runs_in_fp32_under_bf16():
    model = build().to(torch.bfloat16)
    out = model(random_batch())
    assert torch.isfinite(out.loss) and out.kl_sum.dtype == torch.float32
    h = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    s = model.latent(h, torch.ones(2, 3, dtype=torch.bool))
    assert s.z.dtype == torch.float32 and s.kl.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = build().latent(h.float(), torch.ones(2, 3, dtype=torch.bool))
    assert s.z.dtype == torch.float32


# ---------------------------------------------------------------------------- KL floor
@pytest.mark.parametrize("prior", ["recurrent", "independent", "context"])
def test_kl_floor_holds_per_example_and_segment_even_for_adversarial_features(prior):
    lat = _latent(torch.float32, prior=prior, ln_gamma=0.7)
    floor = 8 * 0.7 ** 2 / 2
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, 32, generator=g)
    feats = {"random": base, "huge": base * 1e8, "tiny": base * 1e-12, "zero": torch.zeros_like(base),
             "constant": torch.full_like(base, 3.0), "nearly_constant": 1.0 + 1e-7 * base}
    with torch.no_grad():
        lat.heads.bias.zero_()                               # f(0) = 0: the LN input is exactly constant
    mask = torch.ones(4, 5, dtype=torch.bool)
    for name, h in feats.items():
        s = lat(h, mask)
        kl = s.kl.sum(-1)
        assert torch.isfinite(kl).all(), name
        assert (kl >= floor * (1 - 1e-6)).all(), (name, kl.min().item())
        assert torch.allclose(s.innov_mean.square().sum(-1), torch.full_like(kl, 2 * floor), rtol=1e-5), name


def test_layer_norm_floor_for_odd_dimension():
    out, var = layer_norm_fixed(torch.zeros(2, 7), gamma=1.0)
    assert torch.allclose(out.square().sum(-1), torch.full((2,), 7.0)) and torch.all(var == 0)
    assert abs(out.sum()) < 1e-5


def test_model_kl_per_segment_is_above_floor():
    model = build(ln_gamma=0.6)
    out = model(random_batch(seed=7, B=4, max_k=5))
    valid = out.seg_count > 0
    assert (out.kl_per_segment_sum[valid] >= out.kl_floor * out.seg_count[valid] * (1 - 1e-6)).all()
    assert (out.kl_per_segment_sum[~valid] == 0).all()


@pytest.mark.parametrize("path", ["sequential", "parallel", "scan"])
def test_gradcheck_latent_module(path):
    torch.manual_seed(0)
    lat = Latent(tiny_config(n_embd=8, n_head=2, latent_size=4, conditional=True)).double()
    eps = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])

    h = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    hp = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)

    def latents(h, hp):
        s = lat(h, mask, hp, eps=eps, path=path)
        return s.z, s.kl
    assert torch.autograd.gradcheck(latents, (h, hp))
    # and through W: z as a function of W's parameter A
    a = lat.transition.A.detach().clone().requires_grad_(True)  # gradcheck through QR too

    def through_w(a):
        w_q = torch.linalg.qr(a).Q
        return latent_path(eps, w_q @ w_q.T, None, path)[0]
    assert torch.autograd.gradcheck(through_w, (a,))


# ---------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("impl", ["torch", "fairscale"])
def test_activation_checkpointing_identical(impl):
    batch = random_batch(seed=3)
    results = []
    for on in (False, True):
        model = build(seed=0, activation_checkpointing=on, checkpoint_impl=impl)
        calls = []
        model.decoder.h[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(11)
        out = model(batch)
        forward_calls = len(calls)
        out.loss.backward()
        assert len(calls) == (2 if on else 1) * forward_calls     # recomputed in backward when on
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=n)
    assert g1["injection.memory.weight"].abs().sum() > 0     # memory slots back-propagate through the wrapper


# ---------------------------------------------------------------------------- evaluation API, cost
def test_log_weights_and_posterior():
    none = build(latent="none").eval()
    batch = random_batch(seed=8)
    lw = none.log_weights(batch, num_samples=3)
    out = none(batch)
    assert lw.shape == (3, 3) and torch.allclose(lw, lw[:, :1].expand(-1, 3))
    torch.testing.assert_close(-lw[:, 0].sum(), out.rec_sum)                # IW-NLL = exact NLL

    model = build().eval()
    lw = model.log_weights(batch, num_samples=4)
    assert lw.shape == (3, 4) and torch.isfinite(lw).all()
    post = model.posterior(batch)
    K = model.cfg.max_segments
    assert post["mean"].shape == (3, K, 8) and post["seg_mask"].shape == (3, K)
    assert torch.equal(post["seg_mask"].sum(1), batch["num_segments"])
    w = model.latent.weight(torch.float32)
    expect, _ = latent_path(post["innov_mean"], w, None, "sequential")
    valid = post["seg_mask"][..., None]
    torch.testing.assert_close(post["mean"], expect * valid, rtol=1e-5, atol=1e-6)


def test_flops_per_token_matches_parameter_count():
    model = build(latent="none", n_layer=3, n_embd=64, block_size=32)
    n_matmul = sum(p.numel() for n, p in model.named_parameters()
                   if p.dim() == 2 and n != "wpe.weight")                  # stack matmuls + tied head
    attention = 12 * 3 * 64 * 32
    assert model.flops_per_token() == pytest.approx(6 * n_matmul + attention, rel=0.01)
    assert build(n_layer=3, n_embd=64, block_size=32).flops_per_token() > model.flops_per_token()


# ---------------------------------------------------------------------------- learning
def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model = TRACE(tiny_config(n_embd=48, latent_size=4, ln_gamma=0.3), VOCAB)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch([random_segments(gen, 3, 4, 7) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(120):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    rec_per_token = (out.rec_sum / out.num_tokens).item()
    assert first > math.log(30)                   # starts near uniform over the vocabulary
    assert rec_per_token < 0.5, rec_per_token     # memorised (uniform would be ~3.9 nats)
    assert out.kl_sum / 12 >= model.latent.kl_floor * (1 - 1e-6)  # and the KL floor survived training


def test_latent_model_starts_as_the_plain_lm():
    """Zero-initialised injection: before training, z (noise until the encoder learns) cannot move the
    decoder, so a fresh latent model predicts exactly like a fresh LM with the same backbone. (With
    `memory` injection the zero slot still takes a share of attention, as an attention sink would.)"""
    torch.manual_seed(0)
    lm = TRACE(tiny_config(latent="none"), VOCAB)
    torch.manual_seed(0)
    vae = TRACE(tiny_config(inject="embedding"), VOCAB)
    vae.load_state_dict(lm.state_dict(), strict=False)
    batch = random_batch(seed=3, B=2, max_k=3)
    inp = lm.decoder_input(batch["tokens"])
    pos = torch.arange(inp.shape[1])
    z = torch.randn(2, 3, vae.cfg.latent_size) * 5
    assert torch.equal(vae.decode(inp, pos, batch["seg_ids"], z), lm.decode(inp, pos, batch["seg_ids"], None))
    grads = torch.autograd.grad(vae(batch).loss, [vae.injection.embedding.weight])
    assert grads[0].abs().sum() > 0  # ... but the coupling can grow
