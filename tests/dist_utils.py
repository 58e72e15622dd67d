"""Run a function on N gloo ranks in fresh processes (simpler than DeepSpeed's DistributedTest)."""

from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp

from trace_dist.distributed import free_port


def _entry(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        result = ("ok", fn(*args))
    except BaseException as e:  # report every failure, whatever the rank
        result = ("error", f"rank {rank}: {e!r}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn, world_size: int, *args, tmp_path, timeout: float = 600):
    """fn(*args) on every rank; returns the list of per-rank results (raises the first error)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, str(tmp_path)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            for q in procs:
                q.kill()
            raise TimeoutError(f"rank processes did not finish in {timeout} s")
    results = []
    for r in range(world_size):
        with open(os.path.join(tmp_path, f"rank{r}.pkl"), "rb") as f:
            status, value = pickle.load(f)
        if status == "error":
            raise RuntimeError(value)
        results.append(value)
    return results
