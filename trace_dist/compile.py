"""`train.compile`: torch.compile for a model running under a DeepSpeed engine.

DeepSpeed 0.19.8 compiles through the engine: `engine.compile(backend=..., compile_kwargs=...)`
wraps the engine's module forward in `torch.compile` after ZeRO has installed its hooks (the
accelerator's default backend is inductor on both CPU and CUDA), so ZeRO-3's parameter gathering
keeps working; compiling the module before `deepspeed.initialize` would trace the hooks' absence.
Data-dependent Python (batch checks, the number of segments) breaks the graph into a few pieces,
and a new batch shape recompiles once, after which dynamo marks the sizes dynamic.
Inductor's own random kernels draw other numbers than eager from the same seed, so the posterior
noise (a function of (seed, rank, data position)) would change with compilation; `fallback_random`
makes compiled graphs call the eager random ops, so a compiled run samples what an eager one does.
"""

from __future__ import annotations

import time


def compile_engine(engine, mode: str | None = None) -> float:
    """Compile `engine`'s module in place; returns the seconds the call took (the real compile
    happens lazily at the first forward: time that step to know the compile cost)."""
    import torch._inductor.config

    t0 = time.perf_counter()
    torch._inductor.config.fallback_random = True  # process-wide: the same noise as eager (see above)
    engine.compile(compile_kwargs={} if mode is None else {"mode": mode})
    return time.perf_counter() - t0
