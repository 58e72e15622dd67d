"""`trace-dist <command> ...`: one entry point, each command in its own module.

Modules are imported lazily so `trace-dist --help` and config errors never pay for
importing torch, DeepSpeed or Ray.
"""

from __future__ import annotations

import importlib
import sys

from trace_dist.errors import UserError

COMMANDS = {
    "prepare": ("trace_dist.data.prepare", "text corpora -> tokenized, segmented WebDataset shards"),
    "train": ("trace_dist.launch", "validate a config, then start DeepSpeed training via the launcher"),
    "eval": ("trace_dist.evaluate", "PPL/ELBO/KL/MI/AU and BLEU/Self-BLEU/Distinct of a checkpoint"),
    "generate": ("trace_dist.generate", "sample, continue prompts, reconstruct, interpolate"),
    "tune": ("trace_dist.tune.cli", "Ray Tune search, each trial a multi-worker DeepSpeed run"),
    "export": ("trace_dist.export", "DeepSpeed checkpoint -> safetensors + config + tokenizer"),
    "quickstart": ("trace_dist.quickstart", "prepare -> 2-process training -> eval -> samples on builtin:pydoc"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: trace-dist <command> [options]   (trace-dist <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from trace_dist import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"trace-dist: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except UserError as e:  # the user's input, not our bug: one line, no traceback
        print(f"trace-dist {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
