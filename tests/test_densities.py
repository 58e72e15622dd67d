"""Pinned densities: for every prior x posterior switch, the latent module's sample, per-segment KL,
log p(z) - log q(z|x) and prior samples equal a segment-by-segment reference built here from
torch.distributions (float64, 1e-10), and the importance-weighted bound of a tiny model equals a
brute-force computation.

The references read the model's parameters (W, P, Q, g, the posterior heads) but none of its
density code: each prior and posterior is written out from its definition in docs/model.md.
"""

import math

import pytest
import torch
from model_batches import build, random_batch, tiny_config
from torch.distributions import Normal, kl_divergence

from trace_dist.model.latent import LOGVAR_BOUND, Latent

SWITCHES = [dict(prior=p, posterior=q) for p in ("recurrent", "independent", "context", "paper")
            for q in ("residual", "standard")]
SWITCHES += [dict(prior=p, posterior=q, prior_variance="learned") for p in ("context", "paper")
             for q in ("residual", "standard")]


def _id(switch: dict) -> str:
    return "-".join(switch.values())


def _linear(layer, x):
    return x @ layer.weight.T + layer.bias


def reference(lat: Latent, h, h_prompt, mu, logvar_q, eps, num_segments, from_prior=False):
    """Segment-by-segment z ~ q (from_prior: z ~ p), KL and log p(z) - log q(z|x) per dimension, [B, K, d]
    each (0 past K_b)."""
    cfg = lat.cfg
    B, K, d = mu.shape
    w = lat.weight(torch.float64) if lat.transition is not None else None
    z_init = _linear(lat.prompt_init, h_prompt)
    z, kl, ratio = (torch.zeros(B, K, d, dtype=torch.float64) for _ in range(3))
    for b in range(B):
        prev = z_init[b]
        for k in range(int(num_segments[b])):
            if cfg.prior == "independent":
                prior_mean = torch.zeros(d, dtype=torch.float64)
            elif cfg.prior == "recurrent":
                prior_mean = w @ prev
            elif cfg.prior == "context":
                prior_mean = z_init[b] if k == 0 else _linear(lat.context, h[b, k - 1])
            else:  # paper
                prior_mean = w @ prev + (0.0 if k == 0 else _linear(lat.context, h[b, k - 1]))
            prior_logvar = torch.zeros(d, dtype=torch.float64)
            if cfg.prior_variance == "learned" and k > 0:
                prior_logvar = _linear(lat.context_logvar, h[b, k - 1]).clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
            post_mean = prior_mean + mu[b, k] if cfg.posterior == "residual" else mu[b, k]
            p = Normal(prior_mean, torch.exp(0.5 * prior_logvar))
            q = Normal(post_mean, torch.exp(0.5 * logvar_q[b, k]))
            z[b, k] = (p if from_prior else q).loc + (p if from_prior else q).scale * eps[b, k]
            kl[b, k] = kl_divergence(q, p)
            ratio[b, k] = p.log_prob(z[b, k]) - q.log_prob(z[b, k])
            prev = z[b, k]
    return z, kl, ratio


@pytest.mark.parametrize("switch", SWITCHES, ids=_id)
def test_latent_densities_equal_torch_distributions(switch):
    torch.manual_seed(0)
    lat = Latent(tiny_config(conditional=True, posterior_norm="none", **switch)).double()
    with torch.no_grad():  # far from init: W away from the first projector, large prior offsets
        for p in lat.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    B, K, C, d = 3, 5, 32, 8
    h = torch.randn(B, K, C, generator=g, dtype=torch.float64)
    hp = torch.randn(B, C, generator=g, dtype=torch.float64)
    eps = torch.randn(B, K, d, generator=g, dtype=torch.float64)
    num = torch.tensor([5, 3, 1])
    mask = torch.arange(K)[None] < num[:, None]
    # the posterior heads, read off the parameters: mu_k = f(h_k) (no norm), log sigma^2 clamped
    raw = _linear(lat.heads, h)
    mu, logvar_q = raw[..., :d], raw[..., d:].clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
    z, kl, ratio = reference(lat, h, hp, mu, logvar_q, eps, num)
    assert kl[mask].sum(-1).min() > 1e-3 and (z.abs() > 1).any()     # nothing degenerate
    for path in ("sequential", "parallel", "scan"):
        s = lat(h, mask, hp, eps=eps, path=path)
        torch.testing.assert_close(s.z[mask], z[mask], rtol=0, atol=1e-10, msg=f"z, {path}")
        torch.testing.assert_close(s.kl, kl, rtol=0, atol=1e-10, msg=f"KL, {path}")
        torch.testing.assert_close(s.log_ratio, ratio, rtol=0, atol=1e-10, msg=f"log p - log q, {path}")
        # prior samples (generation) given the same text features
        z_prior = reference(lat, h, hp, mu, logvar_q, eps, num, from_prior=True)[0]
        torch.testing.assert_close(lat.sample_prior(eps, hp, path, h=h)[mask], z_prior[mask], rtol=0, atol=1e-10,
                                   msg=f"prior sample, {path}")


@pytest.mark.parametrize("switch", [dict(), dict(prior="context", posterior="standard", prior_variance="learned"),
                                    dict(prior="paper"), dict(prior="independent", posterior="standard")], ids=_id)
def test_iw_bound_equals_brute_force(switch):
    model = build(conditional=True, **switch).double().eval()
    with torch.no_grad():
        for p in model.latent.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = random_batch(seed=4, B=3, max_k=4, conditional=True)
    S = 3
    torch.manual_seed(9)
    lw = model.log_weights(batch, num_samples=S)                           # [B, S]
    bound = torch.logsumexp(lw, 1) - math.log(S)

    # brute force: the same noise (log_weights draws one [B, K, d] normal per sample), densities by hand
    torch.manual_seed(9)
    B, K, d = 3, int(batch["num_segments"].max()), model.cfg.latent_size
    eps = [torch.randn(B, K, d, dtype=torch.float64) for _ in range(S)]
    with torch.no_grad():
        h, hp, _ = model.features(batch)
        post = model.posterior(batch)
    mu, logvar_q = post["innov_mean"][:, :K], post["innov_logvar"][:, :K]
    tokens, target = batch["tokens"], batch["loss_mask"]
    T = tokens.shape[1]
    brute = torch.zeros(B, S, dtype=torch.float64)
    for s in range(S):
        z, _, ratio = reference(model.latent, h, hp, mu, logvar_q, eps[s], batch["num_segments"])
        with torch.no_grad():
            logits = model.decode(model.decoder_input(tokens), torch.arange(T), batch["seg_ids"], z)
        log_px = torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0]   # [B, T]
        for b in range(B):
            brute[b, s] = log_px[b][target[b]].sum() + ratio[b].sum()
    expect = torch.logsumexp(brute, 1) - math.log(S)
    torch.testing.assert_close(bound, expect, rtol=0, atol=1e-10)
    assert not torch.allclose(lw[:, 0], lw[:, 1])                         # the samples differ
