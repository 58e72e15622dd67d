"""`trace-dist train`: validate the run, then exec the `deepspeed` launcher (gpt-neox's deepy.py, thinner).

    trace-dist train --config configs/quickstart.yaml --nproc 2 [kl.beta=0.5 ...]
    trace-dist train --config X.yaml --hostfile launch/hostfile --nproc 8           # ssh/pdsh multi-node
    trace-dist train --config X.yaml --hostfile H --no-ssh --node-rank K --master-addr A  # one per node
    trace-dist train ... --dry-run                                                  # print the command

Everything that can be checked before a process starts is checked here: the config (errors name
the field, exit 2), the prepared data, the run directory, the precision against the hardware. The
config is then resolved once (paths absolute, ds_config embedded) and written to
`<output_dir>/config.yaml`, and every rank runs on that one file: no rank re-reads the user's
files or resolves a path from another directory. This process holds the run directory's lock
(`trace_dist.runlock`) for the whole run.

The launcher runs in its own session; SIGTERM/SIGINT sent to this process (a scheduler's
preemption notice, Ctrl-C) are forwarded to the training ranks themselves, which checkpoint at the
next step boundary and exit 0, so this command exits 0 too. (Signalling the deepspeed launcher
instead makes it kill the ranks after 30 s and exit 1.) If this process dies without a chance to
forward anything (SIGKILL, OOM killer), the launcher dies with it (PR_SET_PDEATHSIG) and the ranks
on this host follow within a second (`follow_wrapper`), so a restart never collides with them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from trace_dist.config import ConfigError, TraceConfig, load_config
from trace_dist.ports import free_port
from trace_dist.files import atomic_write
from trace_dist.runlock import RunLock


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trace-dist train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", action="append", default=[], required=True, help="YAML; repeat to merge")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per node (default: GPUs per node, or 2 on CPU)")
    p.add_argument("--hostfile", help="MPI-style hostfile ('host slots=N' per line)")
    p.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile")
    p.add_argument("--master-addr", help="rendezvous address (required with --no-ssh)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free port / 29500 multi-node)")
    p.add_argument("--no-ssh", action="store_true", help="one launcher per node, started by you or SLURM")
    p.add_argument("--node-rank", type=int, help="this node's index in the hostfile (with --no-ssh)")
    p.add_argument("--launcher", default=None, help="deepspeed multi-node backend: pdsh, openmpi, slurm, ...")
    p.add_argument("--resume", help="'auto', 'none' or a checkpoint path")
    p.add_argument("--dry-run", action="store_true", help="print the launcher command and exit")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    return p.parse_args(argv)


def preflight(cfg: TraceConfig, cuda: bool) -> None:
    """Problems that would otherwise surface minutes later, on every rank."""
    from trace_dist import checkpoint
    from trace_dist.data import check_same_tokenizer, check_sources

    check_sources(cfg.data)  # each source: manifest valid, tokenizer the recorded one, train/valid not empty
    # the checkpoint the ranks will resume from (an explicit one must exist) was trained on this tokenizer
    resume = checkpoint.find_resume(cfg, warn=lambda message: print(f"[trace-dist] {message}", file=sys.stderr))
    if resume is not None:
        tag_dir = resume[0] / resume[1]
        check_same_tokenizer(cfg.data.path, tag_dir / "tokenizer.json", what=f"checkpoint {tag_dir}")
    _check_writable(cfg.run_dir)
    if cfg.precision == "fp16" and not cuda:
        raise ConfigError("precision: fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")


def _check_writable(run_dir: Path) -> None:
    """The run directory, or the nearest existing ancestor it would be created in, must be a writable directory."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: {existing} is not writable")


def command(args: argparse.Namespace, nproc: int, config_file: Path, wrapper: str) -> list[str]:
    """The deepspeed launcher running `trace_dist.train` on the resolved config file, with no overrides."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    multi_node = args.hostfile is not None
    if multi_node:
        cmd += ["--hostfile", args.hostfile]
        if args.num_nodes:
            cmd += ["--num_nodes", str(args.num_nodes)]
    if args.nproc is not None or not multi_node:
        cmd += ["--num_gpus", str(nproc)]
    if args.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(args.node_rank)]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    port = args.master_port or (29500 if multi_node else free_port())
    cmd += ["--master_port", str(port)]
    if args.launcher:
        cmd += ["--launcher", args.launcher]
    return cmd + ["--module", "trace_dist.train", "--config", str(config_file), "--wrapper", wrapper]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.no_ssh and (args.node_rank is None or not args.master_addr or not args.hostfile):
        raise ConfigError("--no-ssh needs --hostfile, --node-rank and --master-addr")
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError("--nproc must be >= 1")
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides).resolved()
    import torch

    cuda = torch.cuda.is_available()
    preflight(cfg, cuda)
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    # node 0 (or the only node) owns the run directory; other nodes of a --no-ssh job run on their own file
    first_node = not args.node_rank
    config_file = cfg.run_dir / ("config.yaml" if first_node else f"config.node{args.node_rank}.yaml")
    if args.dry_run:
        print(shlex.join(command(args, nproc, config_file, wrapper_id(""))))
        return 0
    lock = RunLock.acquire(cfg.run_dir) if first_node else None
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)  # another node's wrapper may not have created it yet
        atomic_write(config_file, cfg.to_yaml())
        env = dict(os.environ)
        if not cuda:
            env.setdefault("DS_ACCELERATOR", "cpu")
        # the deepspeed launcher leaves OMP threads unset: share the cores instead of oversubscribing
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        return supervise(command(args, nproc, config_file, wrapper_id(lock.token if lock else "")), env)
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------- the wrapper and its ranks
def wrapper_id(token: str) -> str:
    """`host:pid:token` of this process, handed to the ranks: they follow this process's death (on
    its host) and rank 0 recognises the run lock held for it by `token`."""
    return f"{socket.gethostname()}:{os.getpid()}:{token}"


def follow_wrapper(wrapper: str) -> Optional[str]:
    """In a rank: exit as soon as the `trace-dist train` process that started us is gone (checked
    four times a second, on its host only). Returns the run-lock token it holds for us (None if none)."""
    host, pid, token = wrapper.split(":", 2)
    if host == socket.gethostname():
        import psutil

        try:
            parent = psutil.Process(int(pid))
        except psutil.NoSuchProcess:
            parent = None

        def watch() -> None:
            while parent is not None and parent.is_running():  # is_running() also detects a reused pid
                time.sleep(0.25)
            print(f"[trace-dist] the trace-dist train process ({pid}) is gone: exiting", file=sys.stderr, flush=True)
            os._exit(1)

        threading.Thread(target=watch, name="follow-wrapper", daemon=True).start()
    return token or None


def _die_with_parent() -> None:
    """preexec_fn of the launcher: SIGKILL it when this wrapper dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _ranks(launcher_pid: int) -> list:
    """The training processes under the launcher: those started as `python -u -m trace_dist.train`
    (not their forked DataLoader workers, which share the command line and must not be signalled)."""
    import psutil

    def is_rank(p) -> bool:
        args = p.cmdline()
        return any(a == "-m" and b == "trace_dist.train" for a, b in zip(args, args[1:]))

    try:
        matches = [p for p in psutil.Process(launcher_pid).children(recursive=True) if is_rank(p)]
    except psutil.NoSuchProcess:
        return []
    pids = {p.pid for p in matches}
    return [p for p in matches if p.ppid() not in pids]


def supervise(cmd: list[str], env: dict) -> int:
    """Run the launcher in its own session; forward preemption signals to the ranks."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def forward(signum, frame):
        ranks = _ranks(proc.pid)
        for p in ranks:
            p.send_signal(signum)
        if not ranks:  # nothing started yet: stop the launcher itself
            os.killpg(proc.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()


if __name__ == "__main__":
    from trace_dist.cli import main as cli

    sys.exit(cli(["train", *sys.argv[1:]]))
