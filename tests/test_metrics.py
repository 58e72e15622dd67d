"""trace_dist.metrics against independent computations on small cases."""

import math
import random

import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from trace_dist import metrics


# ------------------------------------------------------------------------------ IW-NLL
def _gaussian_logpdf(x, mean, cov):
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


def _linear_gaussian(n=5, dz=2, dx=4, noise=0.5, seed=0):
    """z ~ N(0, I), x = A z + N(0, noise^2 I): exact p(x) = N(0, A A^T + noise^2 I)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dx, dz, generator=g, dtype=torch.float64)
    x = A @ torch.randn(dz, n, generator=g, dtype=torch.float64) + noise * torch.randn(dx, n, generator=g,
                                                                                         dtype=torch.float64)
    x = x.T                                                                   # [n, dx]
    exact = _gaussian_logpdf(x, torch.zeros(dx, dtype=torch.float64), A @ A.T + noise ** 2 * torch.eye(dx))
    # exact posterior q(z|x) = N(S A^T x / noise^2, S), S = (I + A^T A / noise^2)^-1
    post_cov = torch.linalg.inv(torch.eye(dz) + A.T @ A / noise ** 2)
    post_mean = x @ (post_cov @ A.T / noise ** 2).T                           # [n, dz]
    return A, x, exact, post_mean, post_cov, noise


def _log_weights(A, x, noise, q_mean, q_cov, num_samples, seed):
    """log p(x|z_s) + log p(z_s) - log q(z_s|x), z_s ~ q: [n, S]."""
    g = torch.Generator().manual_seed(seed)
    n, dz = q_mean.shape
    chol = torch.linalg.cholesky(q_cov)
    z = q_mean[:, None, :] + torch.randn(n, num_samples, dz, generator=g, dtype=torch.float64) @ chol.T
    dx = x.size(1)
    log_lik = _gaussian_logpdf(x[:, None, :], z @ A.T, noise ** 2 * torch.eye(dx, dtype=torch.float64))
    log_prior = _gaussian_logpdf(z, torch.zeros(dz, dtype=torch.float64), torch.eye(dz, dtype=torch.float64))
    log_q = _gaussian_logpdf(z, q_mean[:, None, :], q_cov)
    return log_lik + log_prior - log_q


def test_iw_exact_posterior_gives_exact_marginal():
    A, x, exact, post_mean, post_cov, noise = _linear_gaussian()
    lw = _log_weights(A, x, noise, post_mean, post_cov, num_samples=3, seed=1)
    tokens = torch.full((x.size(0),), x.size(1))
    out = metrics.iw_nll(lw, tokens)
    assert out["nll_iw"] == pytest.approx(-exact.sum().item() / tokens.sum().item(), rel=1e-10)
    assert out["ppl_iw"] == pytest.approx(math.exp(out["nll_iw"]), rel=1e-12)
    assert out["nll_iw_per_example"] == pytest.approx(-exact.mean().item(), rel=1e-10)


def test_iw_converges_to_exact_with_many_samples():
    A, x, exact, post_mean, post_cov, noise = _linear_gaussian(n=20)
    q_mean, q_cov = post_mean + 0.5 * post_cov.diagonal().sqrt(), 2 * post_cov   # wrong, overdispersed proposal
    gaps = [(exact - metrics.iw_log_marginal(_log_weights(A, x, noise, q_mean, q_cov, s, seed=2))).abs().mean()
            for s in (1, 100, 20000)]
    assert gaps[0] > 0.3 and gaps[1] > 0.03 and gaps[2] < 0.01      # the estimate tightens to the exact value


def test_iw_no_latent_model_is_exact_nll():
    g = torch.Generator().manual_seed(3)
    log_px = -torch.rand(6, generator=g, dtype=torch.float64) * 50
    lw = log_px[:, None].expand(6, 7)                                # every sample weighs the same
    tokens = torch.tensor([5, 9, 3, 12, 7, 4])
    out = metrics.iw_nll(lw, tokens)
    assert out["nll_iw"] == pytest.approx(-log_px.sum().item() / 40, rel=1e-13)
    assert out["num_tokens"] == 40 and out["num_examples"] == 6


def test_iw_sums_reduce_like_one_batch():
    g = torch.Generator().manual_seed(4)
    lw, tokens = torch.randn(10, 4, generator=g) * 3 - 20, torch.randint(3, 9, (10,), generator=g)
    parts = [metrics.iw_sums(lw[i:i + 3], tokens[i:i + 3]) for i in range(0, 10, 3)]
    reduced = {k: sum(p[k] for p in parts) for k in parts[0]}
    assert metrics.iw_from_sums(reduced)["nll_iw"] == pytest.approx(metrics.iw_nll(lw, tokens)["nll_iw"], rel=1e-12)


def test_iw_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_tokens"):
        metrics.iw_nll(torch.zeros(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="log_weights"):
        metrics.iw_nll(torch.zeros(3), torch.ones(3))


# ------------------------------------------------------------------------------ MI
def _mi_loop(mean, logvar, eps):
    """mean_n [log q(z_n|x_n) - log 1/N sum_m q(z_n|x_m)], z_n = mean_n + std_n eps_n, with scalar loops."""
    n, d = len(mean), len(mean[0])
    total = 0.0
    for i in range(n):
        z = [mean[i][j] + math.exp(0.5 * logvar[i][j]) * eps[i][j] for j in range(d)]
        dens = [sum(-0.5 * (z[j] - mean[m][j]) ** 2 / math.exp(logvar[m][j])
                    - 0.5 * (math.log(2 * math.pi) + logvar[m][j]) for j in range(d)) for m in range(n)]
        top = max(dens)
        total += dens[i] - (top + math.log(sum(math.exp(v - top) for v in dens)) - math.log(n))
    return total / n


def test_mutual_info_matches_loop():
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(7, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(7, 3, generator=g, dtype=torch.float64) - 1
    eps = torch.randn(7, 3, generator=g, dtype=torch.float64)
    expected = _mi_loop(mean.tolist(), logvar.tolist(), eps.tolist())
    assert metrics.mutual_info(mean, logvar, eps=eps) == pytest.approx(expected, rel=1e-10)
    assert metrics.mutual_info(mean, logvar, eps=eps, chunk=2) == pytest.approx(expected, rel=1e-10)
    # drawn from a generator: reproducible under a seed
    a = metrics.mutual_info(mean, logvar, generator=torch.Generator().manual_seed(9))
    b = metrics.mutual_info(mean, logvar, generator=torch.Generator().manual_seed(9))
    assert a == b


def _ragged(n=9, k=4, d=3, seed=6):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, k, d, generator=g, dtype=torch.float64)
    logvar = torch.randn(n, k, d, generator=g, dtype=torch.float64) - 1
    eps = torch.randn(n, k, d, generator=g, dtype=torch.float64)
    num = torch.tensor([4, 1, 2, 3, 1, 2, 2, 1, 3])[:n]                      # position 3: one document
    seg_mask = torch.arange(k)[None] < num[:, None]                            # [N, K]
    return mean, logvar, eps, seg_mask


def test_mutual_info_per_segment_matches_loop():
    mean, logvar, eps, seg_mask = _ragged()
    got = metrics.mutual_info_per_segment(mean, logvar, seg_mask, eps)
    assert len(got) == 3                                # position 3 has one document: no MI there
    for k, value in enumerate(got):
        have = seg_mask[:, k]
        expected = _mi_loop(mean[have, k].tolist(), logvar[have, k].tolist(), eps[have, k].tolist())
        assert value == pytest.approx(expected, rel=1e-10), k
    # what lies past a document's segments is never read
    junk = torch.where(seg_mask[..., None], mean, 1e6)
    assert metrics.mutual_info_per_segment(junk, logvar, seg_mask, eps) == got
    a = metrics.mutual_info_per_segment(mean, logvar, seg_mask, generator=torch.Generator().manual_seed(3))
    assert a == metrics.mutual_info_per_segment(mean, logvar, seg_mask, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="seg_mask"):
        metrics.mutual_info_per_segment(mean, logvar, seg_mask[:, :2], eps)


def test_ragged_documents_with_content_free_latents_have_no_mi():
    """Regression (quickstart mi = -3.5): posteriors that say nothing about x except how many
    segments it has. Per position every document's posterior is the same, so q(z) = q(z|x) and
    the estimate is exactly 0, whatever the draw (the analytic-entropy form of calc_mi gave the
    draw's noise mean_n 1/2 (||eps_n||^2 - d)). The former definition (concatenated segments,
    missing ones filled with prior N(0, I) draws) read the segment count off the LayerNorm-sized
    means and reported about log 3 nats."""
    n, k, d = 300, 3, 8
    g = torch.Generator().manual_seed(11)
    num = torch.arange(n) % k + 1                                            # K_n = 1, 2, 3 equally often
    seg_mask = torch.arange(k)[None] < num[:, None]
    centre = torch.tensor([1.0, -1.0] * (d // 2), dtype=torch.float64)      # ||mu||^2 = d gamma^2, gamma = 1
    mean, logvar = centre.expand(n, k, d), torch.full((n, k, d), -0.1, dtype=torch.float64)
    per_segment, padded = [], []
    for _ in range(10):
        eps = torch.randn(n, k, d, generator=g, dtype=torch.float64)
        got = metrics.mutual_info_per_segment(mean, logvar, seg_mask, eps)
        assert got == pytest.approx([0.0] * k, abs=1e-9)
        per_segment.append(sum(got) / k)
        keep = seg_mask[..., None]
        padded.append(metrics.mutual_info(torch.where(keep, mean, 0.0), torch.where(keep, logvar, 0.0), eps=eps))
    assert sum(per_segment) == pytest.approx(0.0, abs=1e-9)
    assert sum(padded) / 10 > 0.7      # about 0.86 (at most H(K) = log 3): the old number measured K


def test_mutual_info_bounds():
    # identical posteriors carry no information; far-apart sharp ones carry log N
    n = 400
    same = metrics.mutual_info(torch.zeros(n, 4), torch.zeros(n, 4), generator=torch.Generator().manual_seed(7))
    assert same == pytest.approx(0.0, abs=1e-12)
    # far apart: q(z_n) = q(z_n|x_n) / N, so MI = log N, whatever the draw
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    apart = metrics.mutual_info(torch.arange(16.0).view(8, 2) * 100, torch.full((8, 2), -4.0), eps=eps)
    assert apart == pytest.approx(math.log(8), abs=1e-8)


def test_mutual_info_is_unbiased_and_tighter_than_the_analytic_entropy_form():
    """Same expectation as calc_mi (the mean KL to the mixture), much less spread over draws:
    overlapping posteriors whose means move a little with x (MI about 0.1 nats)."""
    g = torch.Generator().manual_seed(4)
    n, d = 200, 16
    mean = 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    logvar = torch.full((n, d), -0.2, dtype=torch.float64)
    ours, calc_mi = [], []
    for _ in range(200):
        eps = torch.randn(n, d, generator=g, dtype=torch.float64)
        ours.append(metrics.mutual_info(mean, logvar, eps=eps))
        calc_mi.append(ours[-1] + 0.5 * (eps ** 2 - 1).sum(1).mean().item())  # analytic entropy instead
    mean_ours, mean_calc = sum(ours) / len(ours), sum(calc_mi) / len(calc_mi)
    sd = lambda xs, m: (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5  # noqa: E731
    assert mean_ours == pytest.approx(mean_calc, abs=3 * sd(calc_mi, mean_calc) / len(calc_mi) ** 0.5)
    assert mean_ours > 0.05 and sd(ours, mean_ours) < sd(calc_mi, mean_calc) / 4


# ------------------------------------------------------------------------------ AU
def test_active_units_hand_computed():
    # dim 0 varies (var of [0, 1, 2] = 1), dim 1 barely (var of [0, 0.05, 0.1] = 0.0025), dim 2 constant
    mean = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.05, 3.0], [2.0, 0.1, 3.0]])
    assert metrics.active_units(mean)["au"] == 1
    assert metrics.active_units(mean, delta=0.002)["au"] == 2
    assert metrics.active_units(mean, delta=1.0)["au"] == 1          # >= delta, as He et al.


def test_active_units_per_segment_with_mask():
    g = torch.Generator().manual_seed(8)
    mean = torch.randn(20, 3, 4, generator=g) * torch.tensor([1.0, 0.01, 0.5, 0.0])   # dims 0, 2 active
    seg_mask = torch.ones(20, 3, dtype=torch.bool)
    seg_mask[:, 2] = False
    seg_mask[0, 2] = True                                            # one example: not enough for a variance
    mean[~seg_mask] = 1000.0                                        # garbage under the mask must be ignored
    out = metrics.active_units(mean, mask=seg_mask)
    expected = [int((mean[:, k].var(0) >= 0.01).sum()) for k in range(2)]
    assert out["au_per_segment"] == expected + [0] == [2, 2, 0]
    assert out["au"] == 4 and out["au_max"] == 8


def test_au_stats_reduce_like_one_batch():
    g = torch.Generator().manual_seed(9)
    mean = torch.randn(12, 2, 5, generator=g) * torch.linspace(0, 0.3, 5)
    mask = torch.rand(12, 2, generator=g) > 0.3
    parts = [metrics.au_stats(mean[i:i + 5], mask[i:i + 5]) for i in range(0, 12, 5)]
    reduced = {k: sum(p[k] for p in parts) for k in parts[0]}
    assert metrics.active_units_from_stats(reduced, 0.01) == metrics.active_units(mean, 0.01, mask)
    for k in range(2):
        var = mean[mask[:, k], k].double().var(0)
        count, s, sq = reduced["count"][k], reduced["sum"][k], reduced["sumsq"][k]
        torch.testing.assert_close((sq - s ** 2 / count) / (count - 1), var, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------ text
WORDS = "the cat dog sat on mat a ran fast slow red blue".split()


def _corpus(n, seed):
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(0, 12))] for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bleu_and_self_bleu_equal_nltk(n):
    samples, refs = _corpus(25, 1), _corpus(15, 2)
    weights, smooth = (1.0 / n,) * n, SmoothingFunction().method1
    expected_bleu = sum(sentence_bleu(refs, h, weights, smoothing_function=smooth) for h in samples) / len(samples)
    expected_self = sum(sentence_bleu(samples[:i] + samples[i + 1:], h, weights, smoothing_function=smooth)
                        for i, h in enumerate(samples)) / len(samples)
    assert metrics.bleu(samples, refs, n) == pytest.approx(expected_bleu, rel=1e-12, abs=1e-15)
    assert metrics.self_bleu(samples, n) == pytest.approx(expected_self, rel=1e-12, abs=1e-15)
    expected_paired = sum(sentence_bleu([r], h, weights, smoothing_function=smooth)
                          for h, r in zip(samples[:15], refs)) / 15
    assert metrics.paired_bleu(samples[:15], refs, n) == pytest.approx(expected_paired, rel=1e-12, abs=1e-15)


def test_self_bleu_with_duplicates_and_length_ties():
    samples = [["a", "b", "c"], ["a", "b", "c"], ["x", "y"], ["a", "b", "c", "d"], ["b"]]
    smooth = SmoothingFunction().method1
    expected = sum(sentence_bleu(samples[:i] + samples[i + 1:], h, (1 / 3,) * 3, smoothing_function=smooth)
                   for i, h in enumerate(samples)) / 5
    assert metrics.self_bleu(samples, 3) == pytest.approx(expected, rel=1e-12)
    assert metrics.self_bleu([["a", "b"]] * 4, 2) == pytest.approx(1.0)


def test_distinct_and_len_hand_counts():
    samples = [["a", "b", "a", "b"], ["a", "c"], []]
    assert metrics.distinct(samples, 1) == pytest.approx(3 / 6)       # {a, b, c} of 6 unigrams
    assert metrics.distinct(samples, 2) == pytest.approx(3 / 4)       # {ab, ba, ac} of ab ba ab ac
    assert metrics.distinct(samples, 4) == pytest.approx(1 / 1)
    assert metrics.distinct(samples, 5) == 0.0
    assert metrics.len_mean(samples) == pytest.approx(2.0)


def test_text_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.self_bleu([["a"]], 2)
    with pytest.raises(ValueError, match="token lists"):
        metrics.distinct(["a b c"], 1)
    with pytest.raises(ValueError, match="3 samples but 2 references"):
        metrics.paired_bleu([["a"]] * 3, [["a"]] * 2)
