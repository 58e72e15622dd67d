"""KL weight schedules: constant, linear warm-up, cyclical (Fu et al. 2019, as in Optimus/DELLA).

beta is a pure function of the optimizer step, so a resumed run needs no schedule state.
"""

from __future__ import annotations

from trace_dist.config import KLConfig


def kl_beta(kl: KLConfig, step: int, max_steps: int) -> float:
    if kl.schedule == "constant":
        return kl.beta
    if kl.schedule == "linear":
        frac = 1.0 if kl.warmup_steps == 0 else min(1.0, step / kl.warmup_steps)
        return kl.beta_start + (kl.beta - kl.beta_start) * frac
    # cyclical: each cycle holds beta_start, rises linearly to beta, then holds beta
    period = max(1.0, max_steps / kl.cycles)
    t = (step % period) / period
    if t < kl.ratio_zero:
        return kl.beta_start
    if kl.ratio_increase > 0 and t < kl.ratio_zero + kl.ratio_increase:
        return kl.beta_start + (kl.beta - kl.beta_start) * (t - kl.ratio_zero) / kl.ratio_increase
    return kl.beta
