"""Evaluation metrics: pure functions on tensors and token lists (no model, no process group).

Likelihood and latent metrics follow He et al. 2019 (jxhe/vae-lagging-encoder) and Optimus
(`calc_iwnll`, `calc_mi`, `calc_au`) so numbers compare with those papers; text metrics follow
Texygen (NLTK `sentence_bleu`, `SmoothingFunction().method1`, uniform weights over 1..n).

Distributed use: every quantity that is a sum over examples has a `*_sums`/`*_stats` form whose
entries a caller all-reduces (float64, so the order of the reduction does not show) and a
`*_from_*` form that turns the reduced sums into the metric. MI cannot be written as sums
(q(z) is a mixture over ALL posteriors): all-gather the posteriors and call
`mutual_info_per_segment`.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from typing import Optional, Sequence

import torch

LOG_2PI = math.log(2.0 * math.pi)
SMOOTHING_EPSILON = 0.1  # nltk SmoothingFunction().method1 default


# --------------------------------------------------------------------------------------------
# Importance-weighted NLL / PPL
# --------------------------------------------------------------------------------------------
def iw_log_marginal(log_weights: torch.Tensor) -> torch.Tensor:
    """[N, S] log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x) -> [N] log p(x) estimates.

    log p(x) ~= logsumexp_s(log w_s) - log S (a stochastic lower bound that tightens as S grows).
    """
    if log_weights.dim() != 2 or log_weights.size(1) < 1:
        raise ValueError(f"log_weights must be [N, S] with S >= 1, got {tuple(log_weights.shape)}")
    lw = log_weights.double()
    return torch.logsumexp(lw, dim=1) - math.log(lw.size(1))


def iw_sums(log_weights: torch.Tensor, num_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """All-reducible sums for `iw_from_sums`: sum of log p(x), tokens and examples (float64 scalars)."""
    if num_tokens.shape != log_weights.shape[:1]:
        raise ValueError(f"num_tokens must be [N] = [{log_weights.size(0)}], got {tuple(num_tokens.shape)}")
    return {
        "log_px": iw_log_marginal(log_weights).sum(),
        "num_tokens": num_tokens.double().sum(),
        "num_examples": torch.tensor(float(log_weights.size(0)), dtype=torch.float64),
    }


def iw_from_sums(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """nll_iw (nats per token), ppl_iw = exp(nll_iw), nll_iw_per_example (nats per document).

    The token count is every token the decoder predicts: segment tokens including each `sep`
    and the final `eos` (`loss_mask.sum()`), without bos and prompt tokens (as DELLA/Optimus,
    which count the attention mask, i.e. with eos).
    """
    log_px, tokens, n = (float(sums[k]) for k in ("log_px", "num_tokens", "num_examples"))
    if tokens <= 0 or n <= 0:
        raise ValueError(f"iw metrics need at least one example and token (got {n:g} examples, {tokens:g} tokens)")
    nll = -log_px / tokens
    return {"nll_iw": nll, "ppl_iw": math.exp(nll), "nll_iw_per_example": -log_px / n,
            "num_tokens": int(tokens), "num_examples": int(n)}


def iw_nll(log_weights: torch.Tensor, num_tokens: torch.Tensor) -> dict[str, float]:
    """IW-NLL/PPL of one set of examples: `iw_from_sums(iw_sums(...))`."""
    return iw_from_sums(iw_sums(log_weights, num_tokens))


def per_text(nll: float, num_bytes: float, num_words: float) -> dict[str, float]:
    """A summed NLL (nats) -> bits per UTF-8 byte and perplexity per whitespace word of the text.

    Segmentation-fair: `nll` keeps every separator's and the eos's log-probability (the
    segmentation is a function of the text), only the normaliser changes, so the figures compare
    across data.segment, where the per-token ones do not (a shorter segment adds a `sep` the model
    predicts almost for free). The byte and word counts are the batch's `num_bytes`/`num_words`
    summed: those of the text the model scored.
    """
    if num_bytes <= 0 or num_words <= 0:
        raise ValueError(f"per-text metrics need bytes and words (got {num_bytes:g} bytes, {num_words:g} words)")
    return {"bpb": nll / math.log(2.0) / num_bytes, "word_ppl": math.exp(nll / num_words)}


# --------------------------------------------------------------------------------------------
# Mutual information I_q(x; z) (aggregate-posterior estimator)
# --------------------------------------------------------------------------------------------
def mutual_info(mean: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, chunk: int = 1024) -> float:
    """I(x; z) of N diagonal-Gaussian posteriors q(z|x_n) = N(mean_n, exp(logvar_n)): the quantity
    of He et al. 2019 / Optimus `calc_mi`, with a lower-variance estimate.

    MI = E_n[ log q(z_n|x_n) - log q(z_n) ],   z_n ~ q(z|x_n) (one sample each),
    q(z) = 1/N sum_m q(z|x_m) (the mixture over the N posteriors given, the n-th included, as
    Optimus). Its mean over the draw is 1/N sum_n KL(q(z|x_n) || q(z)), in [0, log N], as for
    `calc_mi`; but where `calc_mi` takes the first term analytically (the negative entropy), this
    evaluates it at the sample. The sample's own log-density noise, -1/2 (||eps_n||^2 - D), then
    sits in both terms and cancels where the posteriors overlap: posteriors that say nothing about
    x give exactly 0 (calc_mi: noise of sd sqrt(D / (2N)) nats, e.g. 0.21 for d = 32 and 360
    documents, which hid every model's MI in docs/results.md), and far-apart sharp ones exactly
    log N.

    mean, logvar: [N, ...], trailing dims flattened to D. eps: [N, ...] standard normals for the
    samples (pass per-example noise to make the estimate independent of how examples were split
    over ranks); else drawn from `generator`.
    """
    if mean.shape != logvar.shape or mean.dim() < 2:
        raise ValueError(f"mean and logvar must have the same shape [N, ...], got {tuple(mean.shape)} "
                         f"and {tuple(logvar.shape)}")
    n = mean.size(0)
    if n < 1:
        raise ValueError("mutual_info needs at least one posterior")
    mu, lv = mean.reshape(n, -1).double(), logvar.reshape(n, -1).double()  # [N, D]
    d = mu.size(1)
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, dtype=torch.float64)
    elif eps.numel() != mu.numel():
        raise ValueError(f"eps must have {mu.numel()} elements like mean, got shape {tuple(eps.shape)}")
    eps = eps.reshape(n, d).double()
    z = mu + (0.5 * lv).exp() * eps                                        # [N, D] one sample per posterior

    log_q_self = -0.5 * (d * LOG_2PI + lv.sum(1) + (eps * eps).sum(1))    # [N] log q(z_n|x_n)
    # log N(z_i; mu_m, v_m) for all pairs via the expanded square (matmuls, no [N, N, D] tensor):
    # sum_j (z_ij - mu_mj)^2 / v_mj = z_i^2 . 1/v_m - 2 z_i . mu_m/v_m + sum_j mu_mj^2 / v_mj
    # (centring first keeps the expanded terms small: their float64 cancellation error is
    # about 1e-16 * max z^2/v, e.g. 1e-8 nats for means of 1000 with variance 0.02)
    centre = mu.mean(0)
    mu, z = mu - centre, z - centre
    inv_var = (-lv).exp()                                                  # [N, D]
    const = -0.5 * ((mu * mu * inv_var).sum(1) + d * LOG_2PI + lv.sum(1))  # [N] per mixture component
    log_qz = []
    for start in range(0, n, chunk):
        zc = z[start:start + chunk]                                        # [c, D]
        quad = (zc * zc) @ inv_var.T - 2.0 * zc @ (mu * inv_var).T         # [c, N]
        log_qz.append(torch.logsumexp(-0.5 * quad + const, dim=1) - math.log(n))
    return float((log_q_self - torch.cat(log_qz)).mean())


def mutual_info_per_segment(mean: torch.Tensor, logvar: torch.Tensor, seg_mask: torch.Tensor,
                            eps: Optional[torch.Tensor] = None,
                            generator: Optional[torch.Generator] = None) -> list[float]:
    """`mutual_info` of each segment position k over the documents that have segment k.

    mean, logvar, eps: [N, K, d] innovation posteriors q(u_k|x) (diagonal Gaussian); seg_mask:
    [N, K] the segments each document has. Entry k is I(x; u_k) estimated on the N_k documents
    with a k-th segment (mixture over those N_k, at most log N_k); the list stops before the
    first position fewer than two documents have (one posterior carries no information: the
    estimate would be pure sampling noise). Documents are never padded with prior latents: a
    LayerNorm posterior's mean has norm sqrt(d) gamma, so filler N(0, I) segments would make
    the estimator measure how many segments a document has rather than what its latents say.
    """
    if mean.dim() != 3 or mean.shape != logvar.shape or seg_mask.shape != mean.shape[:2]:
        raise ValueError(f"mean, logvar must be [N, K, d] and seg_mask [N, K], got {tuple(mean.shape)}, "
                         f"{tuple(logvar.shape)}, {tuple(seg_mask.shape)}")
    if eps is None:
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
    elif eps.shape != mean.shape:
        raise ValueError(f"eps must have the shape of mean {tuple(mean.shape)}, got {tuple(eps.shape)}")
    out = []
    for k in range(mean.size(1)):
        have = seg_mask[:, k].bool()
        if int(have.sum()) < 2:
            break
        out.append(mutual_info(mean[have, k], logvar[have, k], eps=eps[have, k]))
    return out


# --------------------------------------------------------------------------------------------
# Active units
# --------------------------------------------------------------------------------------------
def au_stats(mean: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """All-reducible statistics of E_q[z|x] for `active_units_from_stats` (float64).

    mean: [N, K, d] posterior means per segment position (or [N, d], one position);
    mask: [N, K] bool, the segments each example has. Returns count [K], sum [K, d], sumsq [K, d].
    """
    m = mean.double()
    if m.dim() == 2:
        m = m.unsqueeze(1)
    if m.dim() != 3:
        raise ValueError(f"mean must be [N, d] or [N, K, d], got {tuple(mean.shape)}")
    w = torch.ones(m.shape[:2], dtype=torch.float64) if mask is None else mask.reshape(m.shape[:2]).double()
    m = m * w.unsqueeze(-1)  # masked segments add nothing
    return {"count": w.sum(0), "sum": m.sum(0), "sumsq": (m * m).sum(0)}


def active_units_from_stats(stats: dict[str, torch.Tensor], delta: float = 0.01) -> dict:
    """Active units: dimensions whose variance over the data of E_q[z|x] is >= delta (He et al.).

    The variance is the unbiased one (n - 1), as `calc_au`, per segment position over the
    examples that have that segment. `au_per_segment[k]` counts position k's active dimensions
    (0 where fewer than two examples have segment k); `au` sums them: the active coordinates of
    the concatenated latent z_{1:K}, out of `au_max` = d times the positions with >= 2 examples.
    """
    count = stats["count"].unsqueeze(-1)                      # [K, 1]
    var = (stats["sumsq"] - stats["sum"] ** 2 / count.clamp(min=1)) / (count - 1).clamp(min=1)  # [K, d]
    active = (var >= delta) & (count >= 2)                   # [K, d]
    per_segment = active.sum(1).tolist()
    return {"au": int(sum(per_segment)), "au_per_segment": per_segment,
            "au_max": int((stats["count"] >= 2).sum()) * var.size(1)}


def active_units(mean: torch.Tensor, delta: float = 0.01, mask: Optional[torch.Tensor] = None) -> dict:
    """`active_units_from_stats(au_stats(mean, mask), delta)` for posteriors held in one process."""
    return active_units_from_stats(au_stats(mean, mask), delta)


# --------------------------------------------------------------------------------------------
# Text metrics: BLEU, Self-BLEU, Distinct-n, length (inputs are already tokenised)
# --------------------------------------------------------------------------------------------
def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _sentence_bleu(matches: list[int], hyp_len: int, ref_len: int, n: int) -> float:
    """NLTK `sentence_bleu` with weights (1/n,)*n and method1 smoothing, from clipped match counts.

    matches[i] = clipped (i+1)-gram matches; the denominators are the hypothesis' n-gram totals.
    Same float operations as nltk.translate.bleu_score.corpus_bleu, so results agree exactly.
    """
    if matches[0] == 0:
        return 0.0
    weight = 1.0 / n
    logs = []
    for i in range(n):
        denom = max(1, hyp_len - i)
        p = matches[i] / denom if matches[i] else SMOOTHING_EPSILON / denom
        logs.append(weight * math.log(p))
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(math.fsum(logs))


class _ReferenceIndex:
    """Per n-gram, the largest count in any reference and in any reference but the best one.

    With both, the clipped matches of a hypothesis against "all references except reference i"
    (Self-BLEU) cost one lookup per hypothesis n-gram instead of a pass over every reference:
    this is what makes Self-BLEU O(total tokens) rather than O(N^2 * tokens).
    """

    def __init__(self, references: Sequence[Sequence[str]], n: int):
        self.n = n
        self.best: list[dict] = []  # per order: ngram -> (count, ref index, second-best count)
        for order in range(1, n + 1):
            table: dict = defaultdict(lambda: (0, -1, 0))
            for r, ref in enumerate(references):
                for g, c in ngram_counts(ref, order).items():
                    best, who, second = table[g]
                    table[g] = (c, r, best) if c > best else (best, who, max(second, c))
            self.best.append(dict(table))
        self.lengths = sorted(len(ref) for ref in references)
        self.length_counts = Counter(self.lengths)

    def matches(self, hyp: Sequence[str], exclude: int = -1) -> list[int]:
        out = []
        for order, table in enumerate(self.best, start=1):
            total = 0
            for g, c in ngram_counts(hyp, order).items():
                best, who, second = table.get(g, (0, -1, 0))
                total += min(c, second if who == exclude else best)
            out.append(total)
        return out

    def closest_length(self, hyp_len: int, exclude_len: Optional[int] = None) -> int:
        """nltk closest_ref_length: the nearest reference length, the shorter one on a tie."""
        lengths = self.lengths
        if exclude_len is not None and self.length_counts[exclude_len] == 1:
            i = bisect.bisect_left(lengths, exclude_len)
            lengths = lengths[:i] + lengths[i + 1:]
        i = bisect.bisect_left(lengths, hyp_len)
        candidates = lengths[max(0, i - 1):i + 1]
        return min(candidates, key=lambda r: (abs(r - hyp_len), r))


def _check_corpus(samples: Sequence[Sequence[str]], name: str, minimum: int = 1) -> None:
    if len(samples) < minimum:
        raise ValueError(f"{name}: need at least {minimum} tokenised texts, got {len(samples)}")
    if not all(isinstance(s, (list, tuple)) for s in samples):
        raise ValueError(f"{name}: expected a list of token lists (already tokenised)")


def bleu(samples: Sequence[Sequence[str]], references: Sequence[Sequence[str]], n: int = 4) -> float:
    """Texygen `Bleu`: mean over samples of sentence BLEU-n against ALL references (multi-reference)."""
    _check_corpus(samples, "bleu samples")
    _check_corpus(references, "bleu references")
    index = _ReferenceIndex(references, n)
    return sum(_sentence_bleu(index.matches(h), len(h), index.closest_length(len(h)), n)
               for h in samples) / len(samples)


def paired_bleu(samples: Sequence[Sequence[str]], references: Sequence[Sequence[str]], n: int = 4) -> float:
    """Mean over i of sentence BLEU-n of samples[i] against its own reference references[i]
    (conditional generation: the continuation of a prompt against the true continuation)."""
    if len(samples) != len(references):
        raise ValueError(f"paired_bleu: {len(samples)} samples but {len(references)} references")
    _check_corpus(samples, "paired_bleu samples")
    total = 0.0
    for hyp, ref in zip(samples, references):
        index = _ReferenceIndex([ref], n)
        total += _sentence_bleu(index.matches(hyp), len(hyp), len(ref), n)
    return total / len(samples)


def self_bleu(samples: Sequence[Sequence[str]], n: int = 4) -> float:
    """Texygen `SelfBleu`: mean over samples of sentence BLEU-n against all OTHER samples.

    Lower is more diverse. It grows with the number of samples, so compare at equal N.
    """
    _check_corpus(samples, "self_bleu samples", minimum=2)
    index = _ReferenceIndex(samples, n)
    return sum(_sentence_bleu(index.matches(h, exclude=i), len(h),
                              index.closest_length(len(h), exclude_len=len(h)), n)
               for i, h in enumerate(samples)) / len(samples)


def distinct(samples: Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n over the corpus: unique n-grams / total n-grams (0 when there are none)."""
    _check_corpus(samples, "distinct samples")
    unique, total = set(), 0
    for s in samples:
        grams = ngram_counts(s, n)
        unique.update(grams)
        total += sum(grams.values())
    return len(unique) / total if total else 0.0


def len_mean(samples: Sequence[Sequence[str]]) -> float:
    _check_corpus(samples, "len_mean samples")
    return sum(len(s) for s in samples) / len(samples)


# ------------------------------------------------------------------------------ text metrics of samples
TOKENIZATION = "whitespace-separated words of the decoded text (special tokens removed)"
TEXT_ORDERS = (2, 3, 4)


def words(text: str) -> list[str]:
    """The tokenisation of every text metric (TOKENIZATION)."""
    return text.split()


def text_metrics(samples: list[list[str]], references: Optional[list[list[str]]] = None,
                 paired: bool = False) -> dict[str, float]:
    """BLEU-n vs the references (paired: each sample vs its own; skipped without references),
    Self-BLEU-n (needs 2 samples), Distinct-n, mean length."""
    out: dict[str, float] = {}
    for n in TEXT_ORDERS:
        if references:
            out[f"bleu_{n}"] = (paired_bleu if paired else bleu)(samples, references, n)
        if len(samples) >= 2:
            out[f"self_bleu_{n}"] = self_bleu(samples, n)
    for n in range(1, 5):
        out[f"distinct_{n}"] = distinct(samples, n)
    out["len_mean"] = len_mean(samples)
    return out
