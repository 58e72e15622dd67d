"""`train.compile`: torch.compile for a model running under a DeepSpeed engine.

DeepSpeed 0.19.8 compiles through the engine: `engine.compile(backend=..., compile_kwargs=...)`
wraps the engine's module forward in `torch.compile` after ZeRO has installed its hooks (the
accelerator's default backend is inductor on both CPU and CUDA), so ZeRO-3's parameter gathering
keeps working; compiling the module before `deepspeed.initialize` would trace the hooks' absence.
Data-dependent Python (batch checks, the number of segments) breaks the graph into a few pieces,
and a new batch shape recompiles once, after which dynamo marks the sizes dynamic.
"""

from __future__ import annotations

import time


def compile_engine(engine, mode: str | None = None) -> float:
    """Compile `engine`'s module in place; returns the seconds the call took (the real compile
    happens lazily at the first forward: time that step to know the compile cost)."""
    t0 = time.perf_counter()
    engine.compile(compile_kwargs={} if mode is None else {"mode": mode})
    return time.perf_counter() - t0
