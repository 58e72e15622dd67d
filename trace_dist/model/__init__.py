"""The TRACE model in plain PyTorch (no distributed code): `TRACE(cfg, vocab)(batch) -> TraceOutput`."""

from trace_dist.model.trace import TRACE, TraceOutput

__all__ = ["TRACE", "TraceOutput"]
