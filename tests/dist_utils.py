"""The tests' name for trace_dist.spawn.run_ranks (N gloo ranks in fresh processes)."""

from trace_dist.spawn import run_ranks

__all__ = ["run_ranks"]
