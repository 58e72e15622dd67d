"""Run a function on N gloo ranks in fresh local processes (simpler than DeepSpeed's DistributedTest).

The tests and the multi-rank benchmarks use it. Each child writes its result with torch.save and the
parent reads it back with torch.load(weights_only=True): tensors, numbers, strings, paths, lists,
tuples and dicts come back; nothing a child writes can run code in the parent.
"""

from __future__ import annotations

import os
import pathlib
import time
import traceback

import torch
import torch.multiprocessing as mp

from trace_dist.ports import free_port


def _entry(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        result = {"ok": fn(*args)}
    except BaseException as e:  # report every failure, whatever the rank
        result = {"error": f"rank {rank}: {e!r}\n{traceback.format_exc()}"}
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)  # the parent never reads half a result


def _read_result(out_dir: str, rank: int, exitcode: int | None):
    path = os.path.join(out_dir, f"rank{rank}.pt")
    if not os.path.exists(path):
        raise RuntimeError(f"rank {rank} exited with code {exitcode} without a result")
    try:
        # run_training's result and the tests' helpers return paths; a path is plain data
        with torch.serialization.safe_globals([pathlib.PosixPath, pathlib.WindowsPath]):
            result = torch.load(path, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"rank {rank} returned a value that cannot be read back safely "
                           f"(tensors, numbers, strings, paths, lists, tuples, dicts only): {e}") from None
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["ok"]


def run_ranks(fn, world_size: int, *args, tmp_path, timeout: float = 600) -> list:
    """fn(*args) on every rank, in spawned processes with the rendezvous variables set; returns the
    per-rank results (raises the first rank's error; kills every rank after `timeout` seconds).
    fn must be importable (module level); results are exchanged through files in tmp_path."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, str(tmp_path)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            for q in procs:
                q.kill()
            raise TimeoutError(f"rank processes did not finish in {timeout} s")
    return [_read_result(str(tmp_path), r, p.exitcode) for r, p in enumerate(procs)]
