"""The latent part of TRACE: posterior heads, the transition W, the three latent paths, Gaussian KL.

Notation (docs/model.md): segment features h_k [C]; innovation u_k = mu_k + sigma_k * eps_k with
mu_k = gamma * LN(f(h_k)) and sigma_k from h_k only; prior mean m_k; latent z_k = m_k + u_k.
  recurrent (TRACE): m_k = W z_{k-1}, z_{-1} = z_init (0, or g(prompt) when conditional)
  independent (IND): m_k = 0
  context (CGD):     m_k = P h_{k-1} (m_0 = z_init)
Both prior and posterior of z_k share the mean m_k, so KL and log p - log q depend on the innovation
only: KL_k = 1/2 sum_i [exp(lv_i) - 1 - lv_i + mu_i^2] >= 1/2 ||mu_k||^2 = d gamma^2 / 2.

Everything here runs in fp32 (fp64 if the features are fp64), with autocast off and bf16 parameters
cast up, because the prefix sums accumulate error over K.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trace_dist.model.config import ModelConfig

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
        excl = torch.cumsum(u, dim=1) - u                                 # exclusive prefix sum [B, K, d]
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
def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per dimension KL(N(m + mu, e^lv) || N(m, 1)); expm1 keeps e^lv - 1 - lv >= 0 near lv = 0."""
    return 0.5 * (torch.expm1(logvar) - logvar + mu.square())


def log_density_ratio(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per dimension log p(z) - log q(z|x) at z = m + mu + sigma * eps (the 2 pi terms cancel)."""
    return -0.5 * (mu + torch.exp(0.5 * logvar) * eps).square() + 0.5 * eps.square() + 0.5 * logvar


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
    """BN-VAE: per-dimension batch normalisation of the posterior mean with a fixed gain gamma,
    statistics over valid (example, segment) pairs only; running statistics in eval mode."""

    def __init__(self, d: int, gamma: float, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.gamma, self.momentum, self.eps = gamma, momentum, eps
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
        return self.gamma * (x - mean) * torch.rsqrt(var + self.eps)


# ---------------------------------------------------------------------------- the module
class LatentSample(NamedTuple):  # a NamedTuple, not a dataclass: ZeRO-3 hooks must see its tensors
    z: torch.Tensor             # [B, K, d] latents fed to the decoder
    innov_mean: torch.Tensor    # [B, K, d] mu_k (posterior mean minus prior mean)
    innov_logvar: torch.Tensor  # [B, K, d]
    eps: torch.Tensor           # [B, K, d] the standard-normal noise used
    kl: torch.Tensor            # [B, K, d] per-dimension KL, 0 on invalid segments
    aux: dict                   # scalar tensors for logging


class Latent(nn.Module):
    """Segment features -> posterior, prior, sample and KL, batched over all K segments."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, d = cfg.n_embd, cfg.latent_size
        self.cfg = cfg
        self.heads = Linear(C, 2 * d)  # [f(h_k), raw log sigma_k^2], fused into one matmul
        self.transition = Transition(d, cfg.idempotent, cfg.idempotent_rank) if cfg.prior == "recurrent" else None
        self.batch_norm = MaskedBatchNorm(d, cfg.ln_gamma) if cfg.posterior_norm == "batchnorm" else None
        self.prompt_init = Linear(C, d) if cfg.conditional else None      # g: z_init = g(pooled prompt)
        self.context = Linear(C, d) if cfg.prior == "context" else None   # P: m_k = P h_{k-1}

    @property
    def kl_floor(self) -> float:
        cfg = self.cfg
        return cfg.latent_size * cfg.ln_gamma ** 2 / 2 if cfg.posterior_norm == "layernorm" else 0.0

    def init_state(self, h_prompt: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """z_init [B, d] (the prior mean of segment 0 under 'context'): g(prompt), or None for 0."""
        if self.prompt_init is None or h_prompt is None:
            return None
        return self.prompt_init(h_prompt.to(compute_dtype(h_prompt)))

    def context_mean(self, h_prev: torch.Tensor) -> torch.Tensor:
        """CGD prior mean from the previous segment's features: [..., C] -> [..., d]."""
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
            u = mu + torch.exp(0.5 * logvar) * eps                             # innovation [B, K, d]
            z = self._prior_path(u, h, h_prompt, path or self.cfg.latent_path, aux)
            # Invalid segments (k >= num_segments) carry finite junk that nothing reads: the path is
            # causal in k and no valid token reads their latent; only their KL needs masking.
            kl = torch.where(seg_mask[..., None], gaussian_kl(mu, logvar), 0.0)
        return LatentSample(z=z, innov_mean=mu, innov_logvar=logvar, eps=eps, kl=kl, aux=aux)

    def _normalise(self, pre: torch.Tensor, seg_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        norm = self.cfg.posterior_norm
        if norm == "layernorm":
            mu, var = layer_norm_fixed(pre, self.cfg.ln_gamma)
            with torch.no_grad():  # the pre-LN variance: logged, since a collapsing f(h) is a warning sign
                aux = {"ln_var": (var * seg_mask).sum() / seg_mask.sum().clamp_min(1),
                       "ln_var_min": torch.where(seg_mask, var, torch.inf).amin()}
            return mu, aux
        if norm == "batchnorm":
            return self.batch_norm(pre, seg_mask), {}
        return pre, {}

    def _prior_path(self, u: torch.Tensor, h: torch.Tensor, h_prompt: Optional[torch.Tensor], path: str,
                    aux: dict) -> torch.Tensor:
        """z = m + u under the configured prior."""
        z_init = self.init_state(h_prompt)
        prior = self.cfg.prior
        if prior == "independent":
            return u
        if prior == "context":
            m_rest = self.context_mean(h[:, :-1])                              # m_k = P h_{k-1}, k >= 1
            m0 = u.new_zeros(u.shape[0], 1, u.shape[2]) if z_init is None else z_init[:, None]
            return u + torch.cat([m0, m_rest], dim=1)
        w = self.weight(u.dtype)
        z, _ = latent_path(u, w, z_init, path)
        with torch.no_grad():
            aux["idempotency_gap"] = idempotency_gap(w)
            if self.cfg.idempotent == "penalty" and path != "sequential":
                aux["latent_path_gap"] = (z - latent_path(u, w, z_init, "sequential")[0]).abs().amax()
        return z

    def sample_prior(self, eps: torch.Tensor, h_prompt: Optional[torch.Tensor] = None,
                     path: Optional[str] = None) -> torch.Tensor:
        """Latents from the prior for all K segments at once, eps [N, K, d] -> z [N, K, d]
        (recurrent: one latent path over u = eps; independent: z = eps)."""
        if self.cfg.prior == "context":
            raise ValueError("the 'context' prior depends on generated text; it is sampled segment by segment")
        with torch.autocast(device_type=eps.device.type, enabled=False):
            if self.cfg.prior == "independent":
                return eps
            return latent_path(eps, self.weight(eps.dtype), self.init_state(h_prompt), path or self.cfg.latent_path)[0]

    def penalty(self) -> Optional[torch.Tensor]:
        """lambda ||W^2 - W||_F^2 under 'penalty', else None."""
        if self.transition is None or self.cfg.idempotent != "penalty":
            return None
        return self.cfg.idempotent_penalty * idempotency_gap(self.weight(compute_dtype(self.transition.W))).square()
