"""Reading the files of a prepared dataset wherever it lives: a directory, an http(s) URL, a `pipe:` command.

A dataset location (`data.path`, a `data.mixture` source, `evaluate --data`) is one of

    data/pydoc                                       a local directory: file NAME is data/pydoc/NAME
    https://host/corpus                              an http(s) base URL: file NAME is https://host/corpus/NAME
    pipe:aws s3 cp s3://bucket/corpus/{shard} -      a command template: {shard} -> NAME, its stdout is the file

Every read is bounded: at most `limit` + 1 bytes, a socket timeout on each http read and a
wall-clock deadline on the whole read (a `pipe:` child still running at it is killed), so nothing
waits forever. Transient failures (refused or reset connections, timeouts, http 5xx/408/429, a
command that fails, a stream cut short) are retried with exponential backoff; what still fails is
an OSError naming the URL. The bytes are hashed while they are read, so verifying costs no second pass.

webdataset's `gopen` is not used for this: its http opener is `curl --retry 30` with no read
timeout, and its `pipe:` opener has no deadline, so a stalled server or command would hang a rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Iterator

from trace_dist.errors import UserError

log = logging.getLogger("trace_dist.data")

TIMEOUT = 60.0  # seconds for one whole read (and each socket operation of it)
RETRIES = 3
BACKOFF = 1.0  # seconds before the first retry; doubled for each next one
BLOCK = 1 << 20
SCHEMES = ("http://", "https://", "pipe:")


def is_remote(base: str | Path) -> bool:
    return str(base).startswith(SCHEMES)


def locate(base: str | Path, name: str) -> str:
    """The URL (or path) of file `name` of the dataset at `base`. Names are plain file names
    (the manifest validates them), so substituting one into a shell command is safe."""
    base = str(base)
    if base.startswith("pipe:"):
        if "{shard}" not in base:
            raise UserError(f"{base}: a pipe: data location needs a {{shard}} placeholder for the file name")
        return base.replace("{shard}", name)
    if base.startswith(SCHEMES):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def read(url: str, limit: int, timeout: float = TIMEOUT, retries: int = RETRIES,
         backoff: float = BACKOFF) -> tuple[bytes, str]:
    """(the first `limit` + 1 bytes of `url` at most, their sha256), retrying transient failures."""
    for attempt in range(retries + 1):
        try:
            return _read_once(url, limit, timeout)
        except OSError as e:
            reason = _reason(e)
            if attempt == retries or not _transient(e):
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise OSError(f"{url}: {reason}{tries}") from None
            delay = backoff * 2 ** attempt
            log.warning("data: %s: %s; retry %d of %d in %.1f s", url, reason, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _read_once(url: str, limit: int, timeout: float) -> tuple[bytes, str]:
    deadline = time.monotonic() + timeout
    digest, parts, n = hashlib.sha256(), [], 0
    with _open(url, timeout) as stream:
        while n <= limit:
            if time.monotonic() > deadline:  # a server trickling bytes would pass every socket timeout
                raise TimeoutError(f"not read within {timeout:g} s")
            try:
                block = stream.read(min(BLOCK, limit + 1 - n))
            except http.client.HTTPException as e:  # IncompleteRead: the connection ended early
                raise ConnectionError(f"connection ended early ({type(e).__name__})")
            if not block:
                break
            digest.update(block)
            parts.append(block)
            n += len(block)
    return b"".join(parts), digest.hexdigest()


def _open(url: str, timeout: float):
    if url.startswith("pipe:"):
        return _pipe(url[len("pipe:"):], timeout)
    if url.startswith(SCHEMES):
        return urllib.request.urlopen(url, timeout=timeout)  # an OSError (HTTPError, URLError) if it fails
    return open(url, "rb")


@contextlib.contextmanager
def _pipe(command: str, timeout: float) -> Iterator[IO[bytes]]:
    """The stdout of a shell command; an OSError if it fails or is not done within `timeout`."""
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: nobody has to drain it
        # Its own process group: killing only the shell would leave its children holding stdout open.
        proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                start_new_session=True)
        expired = threading.Event()

        def kill():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        def expire():
            expired.set()
            kill()  # stdout closes, so a blocked read returns

        timer = threading.Timer(timeout, expire)
        timer.start()
        at_end = False
        try:
            yield proc.stdout
            at_end = not proc.stdout.read(1)  # else the reader stopped early (the stream is too long)
        finally:
            if not at_end:
                kill()  # the rest is not wanted
            proc.stdout.close()
            code = proc.wait()  # bounded: the timer kills the command at the deadline
            timer.cancel()
        if expired.is_set():
            raise TimeoutError(f"command did not finish within {timeout:g} s")
        if at_end and code != 0:
            errors.seek(0)
            last = (errors.read().decode("utf-8", "replace").strip().splitlines() or [""])[-1][:200]
            raise OSError(f"command exited with status {code}" + (f": {last}" if last else ""))


def _transient(e: OSError) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code in (408, 429)
    return not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def _reason(e: OSError) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return e.strerror or str(e) or type(e).__name__
