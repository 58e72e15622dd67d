"""trace_dist.mfu: the peak table, the CPU probe and the MFU arithmetic."""

import pytest
import torch

from trace_dist import mfu


def test_peak_table_names_the_datasheet_rates():
    assert mfu.table_peak("NVIDIA H200") == 989e12
    assert mfu.table_peak("NVIDIA H100 80GB HBM3") == 989e12        # SXM
    assert mfu.table_peak("NVIDIA H100 PCIe") == 756e12              # not the SXM rate
    assert mfu.table_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert mfu.table_peak("NVIDIA A100-PCIE-40GB") == 312e12
    assert mfu.table_peak("Some Future GPU") is None


def test_mfu_is_achieved_over_peak():
    # 1e4 tokens/s x 1e9 FLOPs/token = 1e13 FLOP/s of a 1e14 peak
    assert mfu.mfu(1e4, 1e9, 1e14) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        mfu.mfu(1.0, 1.0, 0.0)


def test_cpu_peak_is_a_probe_or_the_configured_value():
    cpu = torch.device("cpu")
    assert mfu.device_peak(cpu, configured=2.5e11) == 2.5e11
    probed = mfu.device_peak(cpu, torch.float32)
    # One fp32 core does 1-200 GFLOP/s; anything outside is a broken timer or FLOP count.
    assert 1e9 < probed < 2e11 * torch.get_num_threads()


def test_probe_counts_two_n_cubed_flops(monkeypatch):
    """With a clock that advances 1 s per product, the probe reports exactly 2 n^3 FLOP/s."""
    ticks = iter(range(100))
    monkeypatch.setattr(mfu.time, "perf_counter", lambda: next(ticks) / 2)   # start/stop: 0.5 s apart
    assert mfu.matmul_probe(torch.device("cpu"), n=64, repeats=3) == 2 * 64 ** 3 / 0.5
