"""One run per run directory: an flock on `<output_dir>/.run.lock`, released by the kernel when its holder dies.

Two runs on one `output_dir` prune each other's checkpoints and interleave metrics.jsonl, so the
second one refuses, naming the holder. The lock is an flock (not the file's existence), so a holder
killed with SIGKILL, or a node that crashed, leaves no lock behind: the next start takes the run
over with a warning naming the dead holder. The file keeps a one-line record (pid, host, token) for
the messages; `token` lets the ranks that `trace-dist train` started recognise the lock their
wrapper holds for them.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Optional

from trace_dist.errors import UserError

LOCK_FILE = ".run.lock"


class RunLockedError(UserError):
    """Another live process holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path, fd: int, token: str):
        self.run_dir, self._fd, self.token = run_dir, fd, token

    @classmethod
    def acquire(cls, run_dir: Path | str, held_by: Optional[str] = None) -> Optional["RunLock"]:
        """Lock `run_dir` (created if missing) for this process. `held_by`: the token of a lock our
        own launcher holds for us; then nothing is acquired and None is returned."""
        run_dir = Path(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"train.output_dir: cannot create {run_dir / LOCK_FILE}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            if held_by is not None and holder.get("token") == held_by:
                return None
            raise RunLockedError(f"train.output_dir: {run_dir} is in use by pid {holder.get('pid', '?')} on host "
                                 f"{holder.get('host', '?')}; stop that run or choose another output_dir") from None
        previous = _read(fd)
        if previous:  # its holder died without releasing (SIGKILL, a crashed node): the kernel freed the flock
            print(f"[trace-dist] warning: taking over {run_dir} from pid {previous.get('pid')} on host "
                  f"{previous.get('host')}, which no longer holds it", file=sys.stderr, flush=True)
        token = uuid.uuid4().hex
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return cls(run_dir, fd, token)

    def release(self) -> None:
        """Clear the record (a clean end leaves nothing to take over) and drop the flock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
