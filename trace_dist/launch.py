"""`trace-dist train`: validate the run, then exec the `deepspeed` launcher (gpt-neox's deepy.py, thinner).

    trace-dist train --config configs/quickstart.yaml --nproc 2 [kl.beta=0.5 ...]
    trace-dist train --config X.yaml --hostfile launch/hostfile --nproc 8           # ssh/pdsh multi-node
    trace-dist train --config X.yaml --hostfile H --no-ssh --node-rank K --master-addr A  # one per node
    trace-dist train ... --dry-run                                                  # print the command

Everything that can be checked before a process starts is checked here: the config (errors name
the field, exit 2), the prepared data, the precision against the hardware. The launcher then runs
in its own session; SIGTERM/SIGINT sent to this process (a scheduler's preemption notice, Ctrl-C)
are forwarded to the training ranks themselves, which checkpoint at the next step boundary and
exit 0, so this command exits 0 too. (Signalling the deepspeed launcher instead makes it kill the
ranks after 30 s and exit 1.)
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from trace_dist.config import ConfigError, TraceConfig, load_config
from trace_dist.distributed import free_port


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
    data = Path(cfg.data.path)
    for needed in ("manifest.json", "tokenizer.json"):
        if not (data / needed).exists():
            raise ConfigError(f"data.path: {data} has no {needed}; prepare it first, e.g. "
                              f"`trace-dist prepare --input builtin:pydoc --output {data}`")
    if cfg.precision == "fp16" and not cuda:
        raise ConfigError("precision: fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")


def command(args: argparse.Namespace, nproc: int) -> list[str]:
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
    cmd += ["--module", "trace_dist.train"]
    for c in args.config:
        cmd += ["--config", c]
    if args.resume:
        cmd += ["--resume", args.resume]
    return cmd + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.no_ssh and (args.node_rank is None or not args.master_addr or not args.hostfile):
            raise ConfigError("--no-ssh needs --hostfile, --node-rank and --master-addr")
        if args.nproc is not None and args.nproc < 1:
            raise ConfigError("--nproc must be >= 1")
        overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        import torch

        cuda = torch.cuda.is_available()
        preflight(cfg, cuda)
    except ConfigError as e:
        print(f"trace-dist train: {e}", file=sys.stderr)
        return 2
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    cmd = command(args, nproc)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    env = dict(os.environ)
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    # the deepspeed launcher leaves OMP threads unset: share the cores instead of oversubscribing
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return supervise(cmd, env)


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
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

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
    sys.exit(main())
