"""The latent part of TRACE and of its baselines: posterior heads, prior, the transition W, the three
latent paths, and one diagonal-Gaussian toolkit used by every switch.

Notation (docs/model.md): segment features h_k [C]; under the segment-causal encoder h_{k-1} is a
representation of x_<k. Posterior head: mu_k = norm(f(h_k)), sigma_k from h_k only.
Prior p(z_k | .) = N(m_k, diag s_k^2)                         (`model.prior`)
  recurrent (TRACE):      m_k = W z_{k-1}             z_{-1} = z_init (0, or g(prompt) when conditional)
  independent (IND):      m_k = 0
  context (CGD):          m_k = P h_{k-1}             m_0 = z_init
  paper (TRACE, Fig. 1):  m_k = W z_{k-1} + P h_{k-1}  m_0 = W z_init
  s_k = 1, or s_k^2 = exp(Q h_{k-1}) (s_0 = 1)        (`model.prior_variance` fixed | learned)
Posterior                                              (`model.posterior`)
  residual (TRACE): q(z_k | z_{k-1}, x) = N(m_k + mu_k, sigma_k^2), i.e. z_k = m_k + u_k with the
            innovation u_k = mu_k + sigma_k eps_k. The text offset P h_{k-1} joins u_k, so every prior
            with W follows z_k = W z_{k-1} + v_k and the three latent paths apply.
  standard: q(z_k | x) = N(mu_k, sigma_k^2); z_k = mu_k + sigma_k eps_k and m_k is read off the sample.
KL_k = KL(q || p), per dimension and in closed form given z_{k-1}. Residual, s = 1:
  1/2 sum_i [exp(lv_i) - 1 - lv_i + mu_i^2] >= 1/2 ||mu_k||^2 = d gamma^2 / 2 under the LayerNorm.

Everything here runs in fp32 (fp64 if the features are fp64), with autocast off and bf16 parameters
cast up, because the prefix sums accumulate error over K.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trace_dist.model.config import ModelConfig

LOG_2PI = math.log(2 * math.pi)
LN_EPS = 1e-12        # relative to the largest centred entry squared, see layer_norm_fixed
LOGVAR_BOUND = 10.0   # |log sigma^2| <= 10, so adversarial features cannot overflow exp()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Linear(nn.Linear):
    """nn.Linear computed in the input's dtype even when its parameters are bf16 (fp32 latent maths).
    Parameters are only read inside `forward`, so ZeRO-3 gathers them (forward and backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


# ---------------------------------------------------------------------------- transition W
class Transition(nn.Module):
    """W [d, d] under `model.idempotent`:
    projector  W = Q Q^T, Q = qr(A).Q, A [d, r]      exactly idempotent (and symmetric)
    oblique    W = A (B^T A)^-1 B^T, A, B [d, r]       exactly idempotent
    penalty    W free, loss += lambda ||W^2 - W||_F^2  approximately idempotent (paper-literal)
    free       W free                                 use latent_path 'scan' or 'sequential'
    Free W starts as a random rank-r projector, so 'penalty' starts at gap 0."""

    def __init__(self, d: int, kind: str, rank: Optional[int]) -> None:
        super().__init__()
        self.kind = kind
        r = rank or max(1, d // 2)
        a = torch.randn(d, r) / d ** 0.5
        if kind == "projector":
            self.A = nn.Parameter(a)
        elif kind == "oblique":
            self.A = nn.Parameter(a)
            self.B = nn.Parameter(a.clone())  # B = A starts at the orthogonal projector: well conditioned
        elif kind in ("penalty", "free"):
            q = torch.linalg.qr(a).Q
            self.W = nn.Parameter(q @ q.T)
        else:
            raise ValueError(f"model.idempotent must be projector, oblique, penalty or free, got {kind!r}")

    def forward(self, dtype: torch.dtype) -> torch.Tensor:
        """W in `dtype` (a forward, so that ZeRO-3 gathers A, B or W for it)."""
        if self.kind == "projector":
            q = torch.linalg.qr(self.A.to(dtype)).Q                      # [d, r]
            return q @ q.T
        if self.kind == "oblique":
            a, b = self.A.to(dtype), self.B.to(dtype)
            return a @ torch.linalg.solve(b.T @ a, b.T)                   # [d, r] @ [r, d]
        return self.W.to(dtype)


def idempotency_gap(w: torch.Tensor) -> torch.Tensor:
    """||W^2 - W||_F."""
    return torch.linalg.matrix_norm(w @ w - w)


# ---------------------------------------------------------------------------- the three paths
def latent_path(u: torch.Tensor, w: torch.Tensor, z_init: Optional[torch.Tensor], path: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """z_k = W z_{k-1} + u_k for u [B, K, d], W [d, d], z_init [B, d] (None: 0).
    Returns (z, m), both [B, K, d], with the prior mean m_k = W z_{k-1} (so z = m + u)."""
    B, K, d = u.shape
    z0 = u.new_zeros(B, d) if z_init is None else z_init
    if path == "sequential":  # the reference: K dependent steps
        zs, prev = [], z0
        for k in range(K):
            prev = prev @ w.T + u[:, k]
            zs.append(prev)
        z = torch.stack(zs, dim=1)
    elif path == "parallel":  # W^2 = W  =>  z_k = u_k + W (z_0 + sum_{j<k} u_j): one cumsum, one matmul
        # exclusive prefix sum [B, K, d]; not cumsum(u) - u, which would round m_k with u_k (non-causal)
        excl = torch.cat([torch.zeros_like(u[:, :1]), torch.cumsum(u[:, :-1], dim=1)], dim=1)
        m = (excl + z0[:, None]) @ w.T
        return m + u, m
    elif path == "scan":      # exact for any W: Hillis-Steele scan over affine maps z -> A z + b
        z = _affine_scan(u, w, z0)
    else:
        raise ValueError(f"model.latent_path must be sequential, parallel or scan, got {path!r}")
    m = torch.cat([z0[:, None], z[:, :-1]], dim=1) @ w.T
    return z, m


def _affine_scan(u: torch.Tensor, w: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """Hillis-Steele inclusive scan of the affine maps F_k(z) = W z + u_k, z_k = (F_k o ... o F_0)(z_0).
    z_0 is folded into the first offset (F_0(z_0) = F_0'(0) with u_0' = u_0 + W z_0). Composing
    element k with element k - s at level s gives (A, b)_k <- (A_k A_{k-s}, A_k b_{k-s} + b_k), and
    with a shared W every A_k (k >= s) at the start of level s is W^s: each of the ceil(log2 K)
    levels is one [B, K - s, d] x [d, d] matmul plus one squaring W^s -> W^{2s}."""
    K = u.shape[1]
    b = torch.cat([u[:, :1] + (z0 @ w.T)[:, None], u[:, 1:]], dim=1)
    power, s = w, 1                                                       # power = W^s
    while s < K:
        b = torch.cat([b[:, :s], b[:, s:] + b[:, :-s] @ power.T], dim=1)
        power, s = power @ power, 2 * s
    return b


# ---------------------------------------------------------------------------- Gaussians
# One toolkit for every switch. Both functions take differences to the mean rather than the means,
# so the residual form (q's mean = p's mean + mu) is exact even when the shared mean is large.
def gaussian_kl(delta: torch.Tensor, logvar_q: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """Per dimension KL(N(m + delta, e^lv_q) || N(m, e^lv_p)) for any m; expm1 keeps the variance
    term e^lv - 1 - lv >= 0 when the two variances are close."""
    lv = logvar_q - logvar_p
    return 0.5 * (torch.expm1(lv) - lv + delta.square() * torch.exp(-logvar_p))


def log_normal(diff: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per dimension log N(x; m, e^lv) at diff = x - m."""
    return -0.5 * (LOG_2PI + logvar + diff.square() * torch.exp(-logvar))


# ---------------------------------------------------------------------------- posterior norm
def layer_norm_fixed(x: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma * LN(x) over the last dim, no learnable affine, so ||out||^2 = d gamma^2 per example.
    Returns (out, the pre-LN variance v, detached).

    The eps is relative: x is first divided by the (constant, detached) peak s = max|x - mean(x)|, and
    LN(x / s) = (x - mean) / sqrt(v + eps s^2) is plain LN with an eps that never dominates whatever
    the scale of x (v >= s^2 / d, so the floor factor v / (v + eps s^2) >= 1 / (1 + d eps)). An exactly
    constant x has no direction; it maps to a fixed zero-mean unit-variance pattern (+1, -1, ...) so
    the floor still holds."""
    d = x.shape[-1]
    with torch.no_grad():
        centred = x - x.mean(-1, keepdim=True)
        var = centred.square().mean(-1)
        peak = centred.abs().amax(-1, keepdim=True)
        pattern = torch.where(torch.arange(d, device=x.device) % 2 == 0, 1.0, -1.0).to(x.dtype)
        pattern = (pattern - pattern.mean()) / (pattern - pattern.mean()).square().mean().sqrt()  # odd d
    xhat = F.layer_norm(x / peak.clamp_min(torch.finfo(x.dtype).tiny), (d,), eps=LN_EPS)
    return gamma * torch.where(peak == 0, pattern, xhat), var


class MaskedBatchNorm(nn.Module):
    """Per-dimension batch normalisation of the posterior mean with a fixed gain gamma, statistics over
    valid (example, segment) pairs only; running statistics in eval mode. `shift`: a learned
    per-dimension shift beta (BN-VAE, Zhu et al. 2020: gamma fixed, beta learned); without it the
    mean of each dimension over the batch is exactly 0."""

    def __init__(self, d: int, gamma: float, shift: bool, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.gamma, self.momentum, self.eps = gamma, momentum, eps
        self.shift = nn.Parameter(torch.zeros(d)) if shift else None
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [B, K, d], mask [B, K]
        if self.training:
            w = mask[..., None].to(x.dtype)
            n = w.sum().clamp_min(1.0)
            mean = (x * w).sum((0, 1)) / n
            var = ((x - mean).square() * w).sum((0, 1)) / n
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        out = self.gamma * (x - mean) * torch.rsqrt(var + self.eps)
        return out if self.shift is None else out + self.shift.to(out.dtype)


# ---------------------------------------------------------------------------- the module
class LatentSample(NamedTuple):  # a NamedTuple, not a dataclass: ZeRO-3 hooks must see its tensors
    z: torch.Tensor             # [B, K, d] latents fed to the decoder
    innov_mean: torch.Tensor    # [B, K, d] mu_k: the innovation's mean (residual) or q's mean (standard)
    innov_logvar: torch.Tensor  # [B, K, d] log sigma_k^2
    eps: torch.Tensor           # [B, K, d] the standard-normal noise used
    kl: torch.Tensor            # [B, K, d] per-dimension KL(q || p), 0 on invalid segments
    log_ratio: torch.Tensor     # [B, K, d] per-dimension log p(z) - log q(z|x), 0 on invalid segments
    prior_mean: torch.Tensor    # [B, K, d] m_k
    prior_logvar: torch.Tensor  # [B, K, d] log s_k^2
    aux: dict                   # scalar tensors for logging


class PriorTerms(NamedTuple):
    """What the prior takes from the prompt and the text, for all K segments at once."""
    z_init: Optional[torch.Tensor]  # [B, d] z_{-1} (W priors) or m_0 (context); None: 0
    offset: torch.Tensor            # [B, K, d] the prior mean's part outside W z_{k-1}
    logvar: torch.Tensor            # [B, K, d] log s_k^2


class Latent(nn.Module):
    """Segment features -> posterior, prior, sample, KL and log-density ratio, batched over all K segments."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, d = cfg.n_embd, cfg.latent_size
        self.cfg = cfg
        self.heads = Linear(C, 2 * d)  # [f(h_k), raw log sigma_k^2], fused into one matmul
        has_w = cfg.prior in ("recurrent", "paper")
        self.transition = Transition(d, cfg.idempotent, cfg.idempotent_rank) if has_w else None
        self.batch_norm = (MaskedBatchNorm(d, cfg.ln_gamma, shift=cfg.posterior_norm == "bn_vae")
                           if cfg.posterior_norm in ("batchnorm", "bn_vae") else None)
        self.prompt_init = Linear(C, d) if cfg.conditional else None      # g: z_init = g(pooled prompt)
        reads_text = cfg.prior in ("context", "paper")
        self.context = Linear(C, d) if reads_text else None               # P: mean offset P h_{k-1}
        self.context_logvar = Linear(C, d) if cfg.prior_variance == "learned" else None  # Q

    @property
    def reads_text(self) -> bool:
        """The prior of z_k reads x_<k: prior samples are drawn segment by segment as text is generated."""
        return self.context is not None

    @property
    def kl_floor(self) -> float:
        """d gamma^2 / 2 per segment where KL >= 1/2 ||mu_k||^2 holds for every example: LayerNorm on mu_k,
        prior variance I, and q's mean minus p's mean = mu_k (residual, or a zero prior mean). Else 0."""
        cfg = self.cfg
        holds = cfg.posterior_norm == "layernorm" and cfg.prior_variance == "fixed" and \
            (cfg.posterior == "residual" or cfg.prior == "independent")
        return cfg.latent_size * cfg.ln_gamma ** 2 / 2 if holds else 0.0

    def init_state(self, h_prompt: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """z_init [B, d] (the prior mean of segment 0 under 'context'): g(prompt), or None for 0."""
        if self.prompt_init is None or h_prompt is None:
            return None
        return self.prompt_init(h_prompt.to(compute_dtype(h_prompt)))

    def context_mean(self, h_prev: torch.Tensor) -> torch.Tensor:
        """The prior mean's text offset P h_{k-1}: [..., C] -> [..., d]."""
        return self.context(h_prev.to(compute_dtype(h_prev)))

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.transition(dtype)

    def forward(self, h: torch.Tensor, seg_mask: torch.Tensor, h_prompt: Optional[torch.Tensor] = None,
                eps: Optional[torch.Tensor] = None, path: Optional[str] = None) -> LatentSample:
        """h [B, K, C] pooled segment features, seg_mask [B, K] valid segments, h_prompt [B, C]."""
        dt = compute_dtype(h)
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.to(dt)
            pre, raw = self.heads(h).chunk(2, dim=-1)                  # f(h_k) [B, K, d] each
            mu, aux = self._normalise(pre, seg_mask)
            logvar = raw.clamp(-LOGVAR_BOUND, LOGVAR_BOUND)                    # sigma_k from h_k only
            if eps is None:
                eps = torch.randn_like(mu)
            noise = torch.exp(0.5 * logvar) * eps                              # z_k - q's mean [B, K, d]
            prior = self._prior_terms(mu, h, h_prompt)
            if self.cfg.posterior == "residual":
                z, m = self._path(mu + noise, prior, path or self.cfg.latent_path, aux)
                delta = mu                                                     # q's mean - p's mean, exactly
            else:
                z = mu + noise
                m = self._prior_mean(z, prior, aux)
                delta = mu - m
            # Invalid segments (k >= num_segments) carry finite junk latents that nothing reads: the
            # prior is causal in k and no valid token reads their latent; only their densities need masking.
            valid = seg_mask[..., None]
            kl = torch.where(valid, gaussian_kl(delta, logvar, prior.logvar), 0.0)
            log_ratio = torch.where(valid, log_normal(delta + noise, prior.logvar) - log_normal(noise, logvar), 0.0)
        return LatentSample(z=z, innov_mean=mu, innov_logvar=logvar, eps=eps, kl=kl, log_ratio=log_ratio,
                            prior_mean=m, prior_logvar=prior.logvar, aux=aux)

    def _normalise(self, pre: torch.Tensor, seg_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        norm = self.cfg.posterior_norm
        if norm == "layernorm":
            mu, var = layer_norm_fixed(pre, self.cfg.ln_gamma)
            with torch.no_grad():  # the pre-LN variance: logged, since a collapsing f(h) is a warning sign
                aux = {"ln_var": (var * seg_mask).sum() / seg_mask.sum().clamp_min(1),
                       "ln_var_min": torch.where(seg_mask, var, torch.inf).amin()}
            return mu, aux
        if self.batch_norm is not None:
            return self.batch_norm(pre, seg_mask), {}
        return pre, {}

    def _prior_terms(self, ref: torch.Tensor, h: Optional[torch.Tensor], h_prompt: Optional[torch.Tensor]
                     ) -> PriorTerms:
        """ref [B, K, d] gives shape and dtype; h [B, K, C] (read only by the context and paper priors:
        segment k reads h_{k-1}, the text before it)."""
        z_init = self.init_state(h_prompt)
        offset, logvar = torch.zeros_like(ref), torch.zeros_like(ref)
        if self.context is not None:
            h_prev = h[:, :-1]                                                 # h_{k-1} for k >= 1
            first = ref.new_zeros(ref.shape[0], 1, ref.shape[2])
            if self.transition is None and z_init is not None:                # context: m_0 = z_init
                first = z_init[:, None]
            offset = torch.cat([first, self.context_mean(h_prev)], dim=1)
            if self.context_logvar is not None:
                lv = self.context_logvar(h_prev).clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
                logvar = torch.cat([torch.zeros_like(first), lv], dim=1)
        return PriorTerms(z_init=z_init, offset=offset, logvar=logvar)

    def _path(self, u: torch.Tensor, prior: PriorTerms, path: str, aux: Optional[dict]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual form: z = m + u for innovations u [B, K, d]; returns (z, m). `aux` (None: no logging)
        receives the W diagnostics."""
        if self.transition is None:
            return prior.offset + u, prior.offset
        w = self.weight(u.dtype)
        v = u + prior.offset                                                   # the offset joins the innovation
        z, wz = latent_path(v, w, prior.z_init, path)                          # wz_k = W z_{k-1}
        if aux is not None:
            with torch.no_grad():
                aux["idempotency_gap"] = idempotency_gap(w)
                if self.cfg.idempotent == "penalty" and path != "sequential":
                    aux["latent_path_gap"] = (z - latent_path(v, w, prior.z_init, "sequential")[0]).abs().amax()
        return z, wz + prior.offset

    def _prior_mean(self, z: torch.Tensor, prior: PriorTerms, aux: dict) -> torch.Tensor:
        """Standard posterior: m_k = W z_{k-1} + offset_k read off the sample z [B, K, d]."""
        if self.transition is None:
            return prior.offset
        w = self.weight(z.dtype)
        with torch.no_grad():
            aux["idempotency_gap"] = idempotency_gap(w)
        z0 = z.new_zeros(z.shape[0], 1, z.shape[2]) if prior.z_init is None else prior.z_init[:, None]
        return torch.cat([z0, z[:, :-1]], dim=1) @ w.T + prior.offset

    def sample_prior(self, eps: torch.Tensor, h_prompt: Optional[torch.Tensor] = None,
                     path: Optional[str] = None, h: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Latents from the prior, eps [N, K, d] -> z [N, K, d]: z_k = m_k + s_k eps_k (with W: the latent
        path over v_k = s_k eps_k + offset_k). Priors that read the text need h [N, K', C], the
        segment features of the text so far (K' <= K; z_k is final for k <= K', later ones are junk)."""
        if self.reads_text and h is None:
            raise ValueError(f"the {self.cfg.prior!r} prior reads the text: it is sampled segment by segment (pass h)")
        with torch.autocast(device_type=eps.device.type, enabled=False):
            if h is not None:
                h = F.pad(h.to(eps.dtype)[:, :eps.shape[1]], (0, 0, 0, max(0, eps.shape[1] - h.shape[1])))
            prior = self._prior_terms(eps, h, h_prompt)
            return self._path(torch.exp(0.5 * prior.logvar) * eps, prior, path or self.cfg.latent_path, None)[0]

    def penalty(self) -> Optional[torch.Tensor]:
        """lambda ||W^2 - W||_F^2 under 'penalty', else None."""
        if self.transition is None or self.cfg.idempotent != "penalty":
            return None
        return self.cfg.idempotent_penalty * idempotency_gap(self.weight(compute_dtype(self.transition.W))).square()
