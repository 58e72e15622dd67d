"""`trace-dist export CHECKPOINT OUT`: consolidated safetensors weights + config + tokenizer."""

from __future__ import annotations

import argparse
import sys

from trace_dist.checkpoint import export


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trace-dist export", description=__doc__)
    p.add_argument("checkpoint", help="run dir, checkpoints dir or one checkpoint tag dir")
    p.add_argument("out", help="output directory")
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.out)  # a bad checkpoint or target: UserError, one line (cli.py)
    print(f"exported to {out} (model.safetensors, config.yaml, tokenizer.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
