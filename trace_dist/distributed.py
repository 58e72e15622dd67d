"""Process-group set-up and the few collectives the trainer and evaluator need.

Works the same under the `deepspeed` launcher, torchrun, Ray Train (group already created) and
a plain single process (we fill in the rendezvous variables ourselves).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from trace_dist.ports import free_port


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed() -> DistInfo:
    """Join (or create) the default process group; idempotent."""
    import deepspeed  # imported here so that config errors never pay for it

    from trace_dist import jit_lock

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    jit_lock.guard()  # a build lock left by a killed process would make DeepSpeed's start wait forever
    if not dist.is_initialized() and elastic_attempt() is not None:
        _join_elastic_attempt()  # DeepSpeed then finds the group made and keeps it
    _skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, local_rank, world, device)


def elastic_attempt() -> int | None:
    """torchrun's restart count when its agent hosts the rendezvous store, else None."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _join_elastic_attempt() -> None:
    """The default group of this torchrun attempt, on keys of its own.

    torchrun's agent keeps ONE store for the whole job (static and c10d rendezvous alike), and the
    workers' `env://` rendezvous reuses it without a per-attempt prefix (torch assumes a fresh store
    per restart). A restarted group then reads the previous attempt's gloo addresses under the same
    keys: a rank connects to a dead peer ("connectFullMesh ... Connection refused") or both ranks
    wait on each other for the 30-minute timeout. Prefixing the store with the attempt gives every
    attempt fresh keys."""
    from datetime import timedelta

    timeout = timedelta(minutes=30)  # DeepSpeed's default for init_distributed, as before
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    dist.init_process_group(backend(), store=dist.PrefixStore(f"trace_dist/attempt_{elastic_attempt()}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timeout)


def leave_distributed() -> None:
    """Destroy the default group before the process exits (CLI entry points only: Ray Train owns its
    workers' group). A gloo group left to the interpreter's teardown can abort the process
    ("terminate called without an active exception"), which a launcher reports as a failed rank."""
    if dist.is_initialized():
        dist.destroy_process_group()


def local_info() -> DistInfo:
    """One process without a process group (single-process eval): rank 0 of 1 on the first GPU or the CPU."""
    return DistInfo(0, 0, 1, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-builds and starts a shared-memory comm op in every process, for its
    inference all-reduce, which training never calls. It cost a ~40 s build at the first start on
    each machine (and a JIT-build lock a killed start could leave behind), and a 69 MB /dev/shm
    buffer per rank that DeepSpeed never unlinks: every run, and every killed run, leaked 69 MB of
    RAM per rank until reboot. Marked incompatible, `deepspeed.comm.torch.build_shm_op` skips it.
    (Other accelerators have no such builder.)"""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in fp64 on the communication device (exact for counts, stable for losses)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    comm_device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    buf = t.detach().to(comm_device, torch.float64)
    dist.all_reduce(buf)
    return buf.to(t.device)


def all_reduce_named(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum named tensors over ranks in one float64 collective (names sorted, so every rank packs the
    same layout); returns float64 CPU tensors of the original shapes, by name."""
    names = sorted(values)
    parts = [values[k].detach().to("cpu", torch.float64).reshape(-1) for k in names]
    flat = all_reduce_sum(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.float64)
    out, offset = {}, 0
    for name, part in zip(names, parts):
        out[name] = flat[offset:offset + part.numel()].reshape(values[name].shape)
        offset += part.numel()
    return out


def accumulate(sums: dict[str, torch.Tensor], values: Mapping[str, torch.Tensor | float]) -> None:
    """sums[name] += values[name], in float64 on the CPU (what all_reduce_named sends)."""
    for name, v in values.items():
        v = torch.as_tensor(v).detach().to("cpu", torch.float64)
        sums[name] = sums[name] + v if name in sums else v


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
