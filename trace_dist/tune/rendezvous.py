"""The trial workers' rendezvous store listens on MASTER_ADDR only (runs in Ray Train workers).

torch's TCPStore server, which rank 0 hosts and through which the ranks find each other (gloo and
NCCL exchange their addresses there), listens on every interface whatever MASTER_ADDR says, and
anyone who reaches it can read and write the keys the process group is built from. Ray Train
creates it inside `init_process_group(init_method="env://")`, before any code of ours runs in
the worker, so `install` (the workers' `worker_process_setup_hook`, see trial.py) wraps torch's
store factory: rank 0 binds the listening socket to MASTER_ADDR itself and hands it to TCPStore
(`master_listen_fd`). A local search has MASTER_ADDR 127.0.0.1; a cluster, the node's address.
"""

from __future__ import annotations

import socket
from importlib import import_module

from torch.distributed import TCPStore

rendezvous = import_module("torch.distributed.rendezvous")  # the module (the package exports a function of that name)
_torch_create_store = rendezvous._create_c10d_store  # fails here, loudly, if torch renames it


def store_on_master_addr(hostname: str, port: int, rank: int, world_size: int, timeout, use_libuv: bool = True):
    """torch's `_create_c10d_store`, except that rank 0's server listens on `hostname` alone."""
    if rank != 0 or rendezvous._torchelastic_use_agent_store():  # a client: nothing listens
        return _torch_create_store(hostname, port, rank, world_size, timeout, use_libuv)
    family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
    listener = socket.create_server((hostname, port), family=family)
    # multi_tenant as torch's own: other stores of this process on this port share the server
    return TCPStore(hostname, port, world_size, is_master=True, timeout=timeout, multi_tenant=True,
                    master_listen_fd=listener.detach(), use_libuv=use_libuv)


def install() -> None:
    """Ray's worker_process_setup_hook for the trial workers."""
    rendezvous._create_c10d_store = store_on_master_addr
