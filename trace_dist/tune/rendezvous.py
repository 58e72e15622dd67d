"""The trial workers' rendezvous store listens on MASTER_ADDR only (runs in Ray Train workers).

torch's TCPStore server, which rank 0 hosts and through which the ranks find each other (gloo and
NCCL exchange their addresses there), listens on every interface whatever MASTER_ADDR says, and
anyone who reaches it can read and write the keys the process group is built from. Ray Train
creates it inside `init_process_group(init_method="env://")`, before any code of ours runs in
the worker, so `install` (the job's `worker_process_setup_hook`, see cli.py) wraps torch's store
factory: rank 0 binds the listening socket to MASTER_ADDR itself and hands it to TCPStore
(`master_listen_fd`). A local search has MASTER_ADDR 127.0.0.1; a cluster, the node's address.

Ray runs the hook in every worker process of the job, and most of them never touch torch (Ray
Train's controller, its synchronisation, dataset, preemption and placement-group actors, Tune's
queues: about ten per trial). So the hook imports nothing heavy: it wraps the factory when torch
loads `torch.distributed.rendezvous`, in the processes that do (importing torch cost each of the
others 2.3 s of CPU at start-up). Nothing here imports torch at module level.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import socket
import sys

TORCH_RENDEZVOUS = "torch.distributed.rendezvous"
_torch_factory = None  # torch's own `_create_c10d_store`, once wrapped


def store_on_master_addr(hostname: str, port: int, rank: int, world_size: int, timeout, use_libuv: bool = True):
    """torch's `_create_c10d_store`, except that rank 0's server listens on `hostname` alone."""
    from torch.distributed import TCPStore

    if rank != 0 or sys.modules[TORCH_RENDEZVOUS]._torchelastic_use_agent_store():  # a client: nothing listens
        return torch_create_store()(hostname, port, rank, world_size, timeout, use_libuv)
    family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
    listener = socket.create_server((hostname, port), family=family)
    # multi_tenant as torch's own: other stores of this process on this port share the server
    return TCPStore(hostname, port, world_size, is_master=True, timeout=timeout, multi_tenant=True,
                    master_listen_fd=listener.detach(), use_libuv=use_libuv)


def torch_create_store():
    """torch's own store factory, wrapped or not."""
    import torch.distributed  # noqa: F401 (loads torch.distributed.rendezvous)

    return _torch_factory or sys.modules[TORCH_RENDEZVOUS]._create_c10d_store


def _wrap(module) -> None:
    global _torch_factory
    if _torch_factory is None:
        _torch_factory = module._create_c10d_store  # fails here, loudly, if torch renames it
        module._create_c10d_store = store_on_master_addr


class _WrapOnLoad(importlib.abc.MetaPathFinder):
    """Finds torch.distributed.rendezvous as the path finder would and wraps the factory right after
    the module has run; then steps aside (it is consulted once)."""

    def find_spec(self, name, path, target=None):
        if name != TORCH_RENDEZVOUS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _wrap(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Ray's worker_process_setup_hook (every worker process of a search)."""
    if TORCH_RENDEZVOUS in sys.modules:
        _wrap(sys.modules[TORCH_RENDEZVOUS])
    elif not any(isinstance(f, _WrapOnLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _WrapOnLoad())
