"""Shared bits of the benchmarks: pinned threads, the built-in corpus, a table, the JSON line, the machine.

Import this module first in a benchmark: it pins the thread count (OMP_NUM_THREADS, before torch
is imported) and points DeepSpeed at the CPU when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread unless the caller says otherwise
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pin_threads(n: int) -> None:
    """Same intra-op thread count for everything measured in this process."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def arg_parser(doc: str, smoke: str, quick: str | None = None, threads: int | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser with its size switches: --smoke (the tests), --quick (run_all.py --quick),
    and, given a default, --threads (read it with `parse`, which pins it)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help=smoke)
    if quick is not None:
        size.add_argument("--quick", action="store_true", help=quick)
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help="torch intra-op threads for everything measured")
    return ap


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """ap.parse_args(argv), then pin_threads(--threads) where the parser has it."""
    args = ap.parse_args(argv)
    if getattr(args, "threads", None) is not None:
        pin_threads(args.threads)
    return args


def prepare_pydoc(out: Path) -> Path:
    """`trace-dist prepare --input builtin:pydoc --output out` (about 2 s); returns out."""
    from trace_dist.data.prepare import main as prepare

    if prepare(["--input", "builtin:pydoc", "--output", str(out)]) != 0:
        raise RuntimeError(f"trace-dist prepare into {out} failed")
    return out


def table(headers: list[str], rows: list[list]) -> None:
    """Print a right-aligned plain-text table (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def emit(figures: dict) -> dict:
    """The benchmark's last stdout line: one JSON object (run_all.py collects it)."""
    print(json.dumps(figures), flush=True)
    return figures


def last_json_line(text: str) -> dict:
    """The JSON object on the last non-empty line of a benchmark's stdout."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("benchmark printed nothing")
    figures = json.loads(lines[-1])
    if not isinstance(figures, dict):
        raise ValueError(f"last line is not a JSON object: {lines[-1][:200]}")
    return figures


def machine() -> dict:
    """What produced the numbers: CPU model, cores, threads, library versions, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import deepspeed

    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
