"""No start waits forever on a JIT-build lock.

DeepSpeed builds its Adam kernels (CPU Adam for offload, FusedAdam on GPU) with torch's JIT
extension loader, which serialises builds with a `lock` file in the extension's build directory
(`$TORCH_EXTENSIONS_DIR/<name>/lock`, by default `~/.cache/torch_extensions/py311_cpu/<name>/lock`;
torch.utils.file_baton). A process killed while building leaves the file behind, and every later
start then waits on it forever without a word. `guard()`, run before anything may JIT-build:

  - removes each stale lock, with a warning: no process on this machine holds it open (the builder
    keeps its descriptor open for the whole build). On a network filesystem a builder on another node
    is invisible, so there a lock also has to be older than `grace_s` (no build takes that long);
  - bounds torch's own wait for a live lock (FileBaton.wait, an endless silent spin): it says who
    holds the lock, removes it if its builder dies meanwhile, and gives up after TIMEOUT_S naming it.
    Only a process that loads that extension meets that wait; a start that never loads the CPU
    Adam does not wait for another run's build of it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from trace_dist.errors import UserError

TIMEOUT_S = 900.0        # longer than any JIT build (the CPU Adam takes ~80 s on 2 cores)
GRACE_S = 900.0          # a lock on a network filesystem older than this has no live builder
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
              "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "9p", "afs", "pvfs2", "orangefs", "wekafs"}


class LockTimeout(UserError):
    """A JIT-build lock still held after the timeout; the message names it and its holders."""


def extensions_root() -> Path:
    """Where torch JIT-builds extensions (TORCH_EXTENSIONS_DIR or torch's per-user default)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def find_locks(root: Path) -> list[Path]:
    """<root>/<name>/lock (TORCH_EXTENSIONS_DIR) and <root>/<pyXY_device>/<name>/lock (the default)."""
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def holders(lock: Path) -> list[int]:
    """Processes on this machine with `lock` open (a /proc scan; other users' processes are unreadable,
    and the extension directory is per user)."""
    target = os.path.realpath(lock)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return found


def _on_network_fs(path: Path) -> bool:
    """The filesystem type of the longest mount point containing `path`, from /proc/mounts."""
    real, best, fstype = os.path.realpath(path), "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return True  # unknown: assume the cautious case
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                and len(parts[1]) > len(best):
            best, fstype = parts[1], parts[2]
    return fstype in NETWORK_FS


def _is_stale(lock: Path, grace_s: float) -> bool:
    if holders(lock):
        return False
    if not _on_network_fs(lock):
        return True
    try:
        return time.time() - lock.stat().st_mtime > grace_s
    except FileNotFoundError:
        return False


def _remove_if_stale(lock: Path, grace_s: float) -> bool:
    """Unlink a stale lock, unless it was replaced (a new builder) since it was judged stale."""
    try:
        before = lock.stat()
        if not _is_stale(lock, grace_s):
            return False
        after = lock.stat()
        if (before.st_ino, before.st_mtime_ns) != (after.st_ino, after.st_mtime_ns):
            return False
        lock.unlink()
    except FileNotFoundError:
        return True  # another rank removed it first
    print(f"[trace-dist] removed a stale JIT-build lock {lock} (no process holds it: a DeepSpeed/torch "
          f"extension build was interrupted); the extension is rebuilt", file=sys.stderr, flush=True)
    return True


def wait_for_lock(lock: Path, timeout_s: float = TIMEOUT_S, grace_s: float = GRACE_S, poll_s: float = 0.5) -> None:
    """Return once `lock` is gone (released, or stale and removed); say who holds it while waiting;
    raise LockTimeout after timeout_s."""
    lock = Path(lock)
    start, told = time.monotonic(), -1.0
    while lock.exists():
        if _remove_if_stale(lock, grace_s):
            return
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise LockTimeout(f"JIT-build lock {lock} still held after {timeout_s:.0f} s by pid(s) "
                              f"{holders(lock) or 'on another node'}; if no build is running, delete it")
        if told < 0 or waited - told >= 60:
            print(f"[trace-dist] waiting for the JIT build that holds {lock} (pid(s) "
                  f"{holders(lock) or 'on another node'}; {waited:.0f} s of at most {timeout_s:.0f} s)",
                  file=sys.stderr, flush=True)
            told = waited
        time.sleep(poll_s)


def _bounded_baton_wait(self) -> None:
    """FileBaton.wait (an endless silent spin in torch) with wait_for_lock's bound and messages."""
    wait_for_lock(Path(self.lock_file_path), timeout_s=TIMEOUT_S, grace_s=GRACE_S, poll_s=self.wait_seconds)


def guard(grace_s: float = GRACE_S) -> None:
    """Remove stale JIT-build locks; bound torch's own wait for live ones. Call before
    deepspeed.init_distributed (idempotent)."""
    from torch.utils.file_baton import FileBaton

    FileBaton.wait = _bounded_baton_wait
    root = extensions_root()
    if root.is_dir():
        for lock in find_locks(root):
            _remove_if_stale(lock, grace_s)
