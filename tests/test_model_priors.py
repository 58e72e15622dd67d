"""The literature's baselines and the paper's prior, each tested on the part that makes it what it is:
CGD's prior network learns from the KL, IND's prior ignores the data, the Optimus-style VAE's KL is
KL(q(z|x) || N(0, I)), BN-VAE's shift is learned, the paper prior reads only earlier segments, and
generation draws every prior's latents as the prior defines them."""

from pathlib import Path

import pytest
import torch
from model_batches import VOCAB, build, random_batch, tiny_config
from torch.distributions import Normal, kl_divergence

from trace_dist.config import load_config
from trace_dist.model.config import GenerationConfig, ModelConfig
from trace_dist.model.latent import Latent

ROOT = Path(__file__).resolve().parents[1]
CGD = dict(prior="context", posterior="standard", prior_variance="learned", posterior_norm="none")
IND = dict(prior="independent", posterior="standard", posterior_norm="none")


def _inputs(seed=0, B=3, K=4, C=32, d=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, K, C, generator=g), torch.randn(B, C, generator=g),
            torch.randn(B, K, d, generator=g), torch.ones(B, K, dtype=torch.bool))


def test_cgd_prior_network_learns_from_the_kl_only_with_a_standard_posterior():
    h, hp, eps, mask = _inputs()
    grads = {}
    for posterior in ("standard", "residual"):
        torch.manual_seed(0)
        lat = Latent(tiny_config(**dict(CGD, posterior=posterior)))
        lat(h, mask, eps=eps).kl.sum().backward()
        grads[posterior] = [lat.context.weight.grad, lat.context_logvar.weight.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads["standard"])
    # residual form: q and p share the mean, so the KL never reaches the mean network P
    assert grads["residual"][0] is None or grads["residual"][0].abs().sum() == 0


def test_ind_prior_is_data_independent():
    torch.manual_seed(0)
    lat = Latent(tiny_config(conditional=True, **IND))
    assert lat.transition is None and lat.context is None
    h, hp, eps, mask = _inputs(1)
    h2, hp2, _, _ = _inputs(2)
    s, s2 = lat(h, mask, hp, eps=eps), lat(h2, mask, hp2, eps=eps)
    for x in (s, s2):
        assert torch.equal(x.prior_mean, torch.zeros_like(x.prior_mean))
        assert torch.equal(x.prior_logvar, torch.zeros_like(x.prior_logvar))
        assert torch.equal(x.z, x.innov_mean + torch.exp(0.5 * x.innov_logvar) * eps)   # standard posterior
    assert not torch.allclose(s.z, s2.z)
    assert torch.equal(lat.sample_prior(eps, hp), eps) and torch.equal(lat.sample_prior(eps, hp2), eps)
    assert lat.kl_floor == 0.0


def test_optimus_single_latent_kl_is_to_the_standard_normal():
    model = build(latent="single", **IND).double()
    batch = random_batch(seed=3, B=3, max_k=4)
    torch.manual_seed(0)
    out = model(batch)
    post = model.posterior(batch)
    assert torch.equal(post["seg_mask"].sum(1), torch.ones(3, dtype=torch.long))    # one latent per document
    q = Normal(post["innov_mean"][:, 0], torch.exp(0.5 * post["innov_logvar"][:, 0]))
    p = Normal(torch.zeros(3, 8, dtype=torch.float64), 1.0)
    torch.testing.assert_close(out.kl_sum, kl_divergence(q, p).sum(), rtol=0, atol=1e-10)
    assert out.kl_floor == 0.0


def test_bn_vae_shift_is_learned_and_sets_the_batch_mean():
    torch.manual_seed(0)
    lat = Latent(tiny_config(**dict(IND, posterior_norm="bn_vae")))
    h, _, eps, mask = _inputs(3, B=6)
    with torch.no_grad():
        lat.batch_norm.shift.fill_(0.3)
    s = lat(h, mask, eps=eps)
    # fixed gain gamma: each dimension has mean beta and variance gamma^2 over the batch
    torch.testing.assert_close(s.innov_mean.mean((0, 1)), torch.full((8,), 0.3), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.innov_mean.var((0, 1), unbiased=False), torch.full((8,), 0.25), rtol=1e-3, atol=0)
    s.kl.sum().backward()
    assert lat.batch_norm.shift.grad.abs().sum() > 0                    # the KL pulls on beta
    assert not any(n.endswith("shift") for n, _ in Latent(tiny_config(posterior_norm="batchnorm")).named_parameters())


def test_paper_prior_reads_only_earlier_segments():
    model = build(prior="paper", conditional=True).double().eval()
    batch = random_batch(seed=5, B=2, max_k=4, conditional=True)
    eps = torch.randn(2, 4, 8, dtype=torch.float64)

    def prior_mean(batch):
        h, hp, mask = model.features(batch)
        return model.latent(h, mask, hp, eps=eps).prior_mean

    base = prior_mean(batch)
    k = 2
    t = int((batch["seg_ids"][0] == k).nonzero()[0])
    changed = dict(batch, tokens=batch["tokens"].clone())
    changed["tokens"][0, t] = (changed["tokens"][0, t] + 1) % VOCAB.size
    m = prior_mean(changed)
    assert torch.equal(m[0, :k + 1], base[0, :k + 1])                   # p(z_k | .) does not see x_k
    assert not torch.allclose(m[0, k + 1], base[0, k + 1])              # p(z_{k+1} | .) does
    assert torch.equal(m[1], base[1])


@pytest.mark.parametrize("switch", [dict(prior="paper"), dict(prior="paper", posterior="standard"), CGD])
def test_full_model_loss_equal_across_paths(switch):
    losses = {}
    for path in ("sequential", "parallel", "scan"):
        model = build(latent_path=path, conditional=True, **switch).double()
        torch.manual_seed(5)
        losses[path] = model(random_batch(seed=5, conditional=True)).loss
    assert abs(losses["parallel"] - losses["sequential"]) < 1e-10
    assert abs(losses["scan"] - losses["sequential"]) < 1e-10


@pytest.mark.parametrize("switch", [CGD, IND, dict(prior="paper"), dict(prior="paper", posterior="standard"),
                                    dict(latent="single", **dict(IND, posterior_norm="bn_vae"))],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_every_latent_parameter_learns(switch):
    """No new module is dead weight: the loss reaches every parameter of the latent part."""
    model = build(**switch)
    model(random_batch(seed=6)).loss.backward()
    dead = [n for n, p in model.latent.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


# ---------------------------------------------------------------------------- generation
GENERATION_SWITCHES = [
    dict(), dict(latent_path="sequential"), dict(posterior="standard"), IND, dict(prior="context"),
    dict(latent="single", **IND), dict(posterior_norm="bn_vae"),
    dict(prior="paper"), CGD,
]


@pytest.mark.parametrize("switch", GENERATION_SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_generation_draws_latents_from_the_prior(switch):
    """The latents each generated segment was decoded with equal Latent.sample_prior given the noise
    generate() drew and the features of the text generated before it."""
    model = build(conditional=True, **switch).eval()
    with torch.no_grad():  # a prior offset that visibly depends on the text
        for p in model.latent.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompts = [[5, 6, VOCAB.sep], [7, VOCAB.sep]]
    used = {}
    decode = model.decode

    def spy(inp, pos, seg_ids, z, **kw):
        used["z"] = z                                  # generate() updates z in place as segments begin
        return decode(inp, pos, seg_ids, z, **kw)
    model.decode = spy
    every = 3
    texts = model.generate(prompts=prompts, gen=GenerationConfig(max_new_tokens=12, top_p=1.0),
                           generator=torch.Generator().manual_seed(0), segment=f"fixed:{every}")
    K = used["z"].shape[1]
    eps = torch.randn(2, K, 8, generator=torch.Generator().manual_seed(0))
    # the generated text as a batch: generated token i is in segment i // every (the last latent is kept)
    T = max(len(p) + len(t) for p, t in zip(prompts, texts))
    tokens = torch.full((2, T), VOCAB.pad)
    seg_ids = torch.full((2, T), -1)
    prompt_mask = torch.zeros(2, T, dtype=torch.bool)
    for r, (p, t) in enumerate(zip(prompts, texts)):
        tokens[r, :len(p) + len(t)] = torch.tensor(p + t)
        seg_ids[r, len(p):len(p) + len(t)] = (torch.arange(len(t)) // every).clamp(max=K - 1)
        prompt_mask[r, :len(p)] = True
    batch = dict(tokens=tokens, seg_ids=seg_ids, loss_mask=seg_ids >= 0, prompt_mask=prompt_mask,
                 num_segments=seg_ids.amax(1) + 1, example_mask=torch.ones(2, dtype=torch.bool))
    with torch.no_grad():
        h, hp, _ = model.features(batch)
        expect = model.latent.sample_prior(eps, hp, h=h)
    for r, t in enumerate(texts):
        n = min(K, (len(t) + every - 1) // every)                      # segments that hold generated tokens
        assert n >= min(2, K)
        torch.testing.assert_close(used["z"][r, :n], expect[r, :n], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- configuration
def test_config_rules_and_old_configs_keep_their_meaning():
    with pytest.raises(ValueError, match="prior_variance 'learned' needs a prior that reads the text"):
        ModelConfig(prior="recurrent", prior_variance="learned")
    for prior in ("context", "paper"):
        with pytest.raises(ValueError, match="segment_causal"):
            ModelConfig(prior=prior, encoder_scope="bidirectional")
    with pytest.raises(ValueError, match="latent_path 'parallel' needs an idempotent W"):
        ModelConfig(prior="paper", idempotent="free")
    ModelConfig(prior="paper", idempotent="free", posterior="standard")   # no path under a standard posterior
    configs = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs/paper").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        m = load_config([path]).model
        assert (m.posterior, m.prior_variance) == ("residual", "fixed"), path    # TRACE's residual form, as before
