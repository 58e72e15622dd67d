"""Model FLOP utilisation: the training FLOP/s a run achieves over what the device can do.

    MFU = tokens/s per device x FLOPs per token / peak FLOP/s of one device

FLOPs per token is `TRACE.flops_per_token()` (forward + backward matmuls). The peak is the vendor's
dense bf16 tensor-core rate for known GPUs (no sparsity), a configured value, or on CPU (and unknown
GPUs) a short matmul probe at start-up: the fastest of a few square products in the run's dtype.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

# Dense bf16 peak FLOP/s by device-name substring, first match wins ("H100 PCIe" before "H100": the
# SXM part reports "NVIDIA H100 80GB HBM3"). Vendor datasheets; H200 SXM has the H100 SXM's rate.
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
             "A10": 125e12, "4090": 165e12}


def table_peak(device_name: str) -> Optional[float]:
    """The table's bf16 peak for a device name, or None if it is not in the table."""
    return next((v for k, v in BF16_PEAK.items() if k in device_name), None)


def matmul_probe(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` n x n x n products (2 n^3 FLOPs each), after one warm-up.
    About 0.1 s on one CPU core at n = 1024 fp32; the fastest repeat is the one least disturbed by
    other work on the machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def device_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, configured: Optional[float] = None) -> float:
    """Peak FLOP/s of one device: `configured` if given, the table for a known GPU in bf16 or fp16
    (the same dense tensor-core rate on these parts), else the matmul probe in `dtype`."""
    if configured is not None:
        return float(configured)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        peak = table_peak(torch.cuda.get_device_name(device))
        if peak is not None:
            return peak
    return matmul_probe(device, dtype)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Fraction of the peak used: tokens_per_s (of one device) x flops_per_token / peak."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak
