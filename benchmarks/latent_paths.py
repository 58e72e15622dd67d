"""Latent paths side by side: sequential loop vs Hillis-Steele scan vs idempotent prefix sum.

Measures, at K = 4, 16, 64 segments,
  1. fwd+bwd of the latent module alone (posterior heads, LayerNorm, W, path, KL), B x K segments;
  2. a full TRACE training step (forward + backward + AdamW) at a small size, with the same total
     tokens at every K (segments get shorter as K grows).
Prints a table, then one JSON line with latent_speedup_k64 (sequential / parallel latent fwd+bwd at
K=64; goal >= 10) and step_ratio_k64_vs_k4 (parallel full step at K=64 / K=4; goal <= 1.10).

    OMP_NUM_THREADS=1 python benchmarks/latent_paths.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from trace_dist.model.trace import TRACE
from trace_dist.model.config import ModelConfig
from trace_dist.model.latent import Latent, latent_path
from trace_dist.vocab import Vocab

PATHS = ("sequential", "scan", "parallel")
KS = (4, 16, 64)
VOCAB = Vocab(size=512, bos=1, eos=2, pad=0, sep=3)


def interleaved(fns: dict, rounds: int, inner: int) -> dict:
    """Median seconds per call of each fn; configurations alternate within every round so that load
    from other processes on the box spreads evenly over them."""
    for fn in fns.values():
        fn(), fn()                                            # warm-up
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[key].append((time.perf_counter() - t0) / inner)
    return {key: statistics.median(v) for key, v in times.items()}


def config(path: str, K: int, T: int) -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=T, latent_size=32, max_segments=K,
                       latent_path=path)


def latent_step(path: str, K: int, B: int):
    """fwd+bwd of the whole latent module (heads, LayerNorm, W, path, KL)."""
    torch.manual_seed(0)
    cfg = config(path, K, 256)
    lat = Latent(cfg)
    h = torch.randn(B, K, cfg.n_embd, requires_grad=True)
    mask = torch.ones(B, K, dtype=torch.bool)

    def step():
        s = lat(h, mask)
        (s.z.square().sum() + s.kl.sum()).backward()
    return step


def path_step(path: str, K: int, B: int, d: int = 32):
    """fwd+bwd of the W application alone (the only part the three paths do differently): z =
    path(u, W) for a given idempotent W (a leaf, so its gradient is computed too)."""
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(d, d // 2)).Q
    w = (q @ q.T).requires_grad_(True)
    u = torch.randn(B, K, d, requires_grad=True)

    def step():
        latent_path(u, w, None, path)[0].square().sum().backward()
    return step


def segmented_batch(B: int, T: int, K: int) -> dict:
    """B documents of exactly T tokens in K equal segments (each ends with sep, the last with eos)."""
    L = T // K
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, VOCAB.size, (B, T), generator=g)
    seg_ids = torch.arange(T).div(L, rounding_mode="floor").clamp(max=K - 1).expand(B, T).clone()
    ends = torch.arange(1, K + 1) * L - 1
    tokens[:, ends[:-1]] = VOCAB.sep
    tokens[:, -1] = VOCAB.eos
    return dict(tokens=tokens, seg_ids=seg_ids, loss_mask=torch.ones(B, T, dtype=torch.bool),
                prompt_mask=torch.zeros(B, T, dtype=torch.bool), num_segments=torch.full((B,), K),
                example_mask=torch.ones(B, dtype=torch.bool), bad_samples=torch.tensor(0))


def train_step(path: str, K: int, B: int, T: int):
    """TRACE forward + backward + AdamW step on B documents of T tokens in K segments."""
    torch.manual_seed(0)
    model = TRACE(config(path, K, T), VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = segmented_batch(B, T, K)

    def step():
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = ap.parse_args(argv)
    rounds, step_rounds = (5, 2) if args.quick else (25, 7)
    B, T = 8, 256
    configs = [(p, K) for K in KS for p in PATHS]
    lat = interleaved({c: latent_step(*c, B) for c in configs}, rounds, inner=10)
    path = interleaved({c: path_step(*c, B) for c in configs}, rounds, inner=10)
    step = interleaved({c: train_step(*c, B, T) for c in configs}, step_rounds, inner=1)

    print(f"latent module fwd+bwd (B={B}, d=32) and full step (2x128 GPT, B={B}, T={T} tokens, AdamW); "
          f"threads={torch.get_num_threads()}")
    print(f"{'':>16} {'K':>4} | {'sequential':>10} {'scan':>10} {'parallel':>10} | {'seq/par':>8} {'seq/scan':>8}")
    for name, table, unit in (("latent module", lat, 1e3), ("W path only", path, 1e3), ("full step", step, 1e3)):
        for K in KS:
            seq, scan, par = (table[p, K] * unit for p in PATHS)
            print(f"{name + ' ms':>16} {K:>4} | {seq:10.3f} {scan:10.3f} {par:10.3f} | {seq / par:8.2f} {seq / scan:8.2f}")
    figures = {
        "latent_speedup_k64": round(lat["sequential", 64] / lat["parallel", 64], 2),
        "latent_scan_speedup_k64": round(lat["sequential", 64] / lat["scan", 64], 2),
        "path_speedup_k64": round(path["sequential", 64] / path["parallel", 64], 2),
        "path_scan_speedup_k64": round(path["sequential", 64] / path["scan", 64], 2),
        "step_ratio_k64_vs_k4": round(step["parallel", 64] / step["parallel", 4], 3),
        "step_speedup_seq_over_par_k64": round(step["sequential", 64] / step["parallel", 64], 3),
        "latent_ms_parallel_k64": round(lat["parallel", 64] * 1e3, 3),
        "step_ms_parallel_k4": round(step["parallel", 4] * 1e3, 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
