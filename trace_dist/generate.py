"""`trace-dist generate`: sample from the prior, continue prompts, reconstruct, interpolate.

    trace-dist generate --checkpoint PATH [--num N] [--prompt TEXT | --prompts FILE]
                        [--reconstruct TEXT] [--interpolate TEXT_A TEXT_B --steps N]
                        [--top-p P --top-k K --temperature T] [--latent-path P] [--seed S]
                        [--batch-size B] [--output FILE.jsonl] [dotted.key=value ...]

Texts given on the command line are encoded as `trace-dist prepare` encodes a document
(`trace_dist.data.encode_text`) and laid out by the loader (data.* of the checkpoint's config,
sentences longer than data.max_segment_tokens split). Reconstruction encodes with the posterior mean
E_q[z|x] and decodes from it; interpolation decodes (1 - t) z_A + t z_B per segment position
(Optimus-style) for t in linspace(0, 1, steps), over the first min(K_A, K_B) segments. Prior
sample i is seeded by (seed, "generate", i), as in `trace-dist eval`; --batch-size changes only the
speed (and, rarely, a token through float rounding of a differently sized batch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from trace_dist.config import choices
from trace_dist.errors import UserError
from trace_dist.model.config import ModelConfig
from trace_dist.model.generation import context_room
from trace_dist.sampling import prior_chunk, seeded_generator, text_of
from trace_dist.vocab import SPECIAL_TOKENS


def posterior_mean(model, text: str, tokenizer, cfg, vocab, device) -> torch.Tensor:
    """E_q[z_k|x] of a text: [K, d] for its K segments.

    The text is encoded as `trace-dist prepare` encodes a document (`encode_text`), sentences
    longer than data.max_segment_tokens split rather than truncated, and laid out by the loader.
    """
    from trace_dist.data import encode_text
    from trace_dist.data.batch import Layout, collate

    if not model.has_latent:
        raise UserError("--reconstruct/--interpolate need a latent model (model.latent is 'none')")
    try:
        record = encode_text(text, tokenizer, max_segment_tokens=cfg.data.max_segment_tokens)
    except ValueError as e:
        raise UserError(f"input text {text[:40]!r}: {e}") from None
    batch = collate([Layout(cfg.data, vocab, conditional=False).example(record)], vocab, 0)
    post = model.posterior({k: v.to(device) for k, v in batch.items()})
    return post["mean"][0, : int(batch["num_segments"][0])]


def interpolation(z_a: torch.Tensor, z_b: torch.Tensor, steps: int) -> torch.Tensor:
    """[steps, K, d]: (1 - t) z_a + t z_b per segment, K = min(K_a, K_b)."""
    k = min(z_a.shape[0], z_b.shape[0])
    t = torch.linspace(0.0, 1.0, steps, device=z_a.device, dtype=z_a.dtype)[:, None, None]
    return (1 - t) * z_a[None, :k] + t * z_b[None, :k]


def prompt_ids(prompt: str, index: int, tokenizer, vocab, block_size: int) -> list[int]:
    """A prompt's token ids ending with sep (the batch layout), refused as `trace-dist prepare` refuses
    texts (empty, or containing a special-token string) or when it leaves no room in the context."""
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise UserError(f"prompt {index} is empty")
    if min(ids) < len(SPECIAL_TOKENS):
        raise UserError(f"prompt {index} {prompt[:40]!r} contains the special token {SPECIAL_TOKENS[min(ids)]}")
    ids = ids + [vocab.sep]
    if context_room(block_size, len(ids)) < 1:
        raise UserError(f"prompt {index} is {len(ids)} tokens (with its separator); model.block_size is "
                        f"{block_size}, so nothing can follow it")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace-dist generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, tag dir or export dir")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="continue this prompt (conditional models)")
    mode.add_argument("--prompts", help="file with one prompt per line")
    mode.add_argument("--reconstruct", metavar="TEXT", help="encode TEXT (posterior mean) and decode it")
    mode.add_argument("--interpolate", nargs=2, metavar=("TEXT_A", "TEXT_B"), help="decode along z_A -> z_B")
    p.add_argument("--num", type=int, default=4, help="samples (prior), or samples per prompt / latent")
    p.add_argument("--steps", type=int, default=5, help="interpolation points, ends included")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--latent-path", choices=choices(ModelConfig, "latent_path"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prior samples per generate() call")
    p.add_argument("--output", help="write one JSON object per text (mode, index, text, ...)")
    p.add_argument("--config", action="append", default=[], help="extra YAML merged over the checkpoint's config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    return p


GENERATION_FLAGS = ("top_p", "top_k", "temperature", "max_new_tokens")


def _generation_flags(args) -> dict:
    """The generation flags given, validated as GenerationConfig fields: one line naming the flag."""
    from pydantic import ValidationError

    from trace_dist.model.config import GenerationConfig

    given = {k: getattr(args, k) for k in GENERATION_FLAGS if getattr(args, k) is not None}
    try:
        GenerationConfig(**given)
    except ValidationError as e:
        key = e.errors()[0]["loc"][0]
        raise UserError(f"--{key.replace('_', '-')} {given[key]}: {e.errors()[0]['msg']}") from None
    return given


def _overrides(args) -> list[str]:
    return list(args.overrides) + [f"generation.{k}={v}" for k, v in _generation_flags(args).items()]


def _check_output(path: Path) -> None:
    """Refuse an --output we could not write before loading anything."""
    if path.is_dir():
        raise UserError(f"--output {path} is a directory (give a file name, e.g. {path / 'samples.jsonl'})")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise UserError(f"--output {path}: {parent} is not a writable directory")


def _write_records(path: Path, records: list[dict]) -> None:
    """Written under a temporary name and renamed: an earlier file is replaced only by a complete one."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"--output {path}: cannot write ({e.strerror or e})") from None


def _read_prompts(path: str) -> list[str]:
    try:
        return [line.rstrip("\n") for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path}: unreadable ({getattr(e, 'strerror', None) or e})") from None


def _note_context_limit(cfg, prompt_tokens: int) -> None:
    room = context_room(cfg.model.block_size, prompt_tokens)
    if cfg.generation.max_new_tokens > room:
        print(f"note: max_new_tokens {cfg.generation.max_new_tokens} does not fit in model.block_size "
              f"{cfg.model.block_size}; texts stop after {room} new tokens", file=sys.stderr)


@torch.no_grad()
def run(args) -> list[dict]:
    from tqdm import tqdm

    from trace_dist.checkpoint import load_for_inference

    overrides = _overrides(args)
    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts) if args.prompts else None
    model, cfg, tokenizer, vocab = load_for_inference(args.checkpoint, overrides, configs=tuple(args.config))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    common = dict(gen=cfg.generation, segment=cfg.data.segment, latent_path=args.latent_path)
    records: list[dict] = []
    if prompts is not None:
        if not cfg.model.conditional:
            raise UserError("--prompt/--prompts need a conditional model (model.conditional is false)")
        ids_of = [prompt_ids(p, i, tokenizer, vocab, cfg.model.block_size) for i, p in enumerate(prompts)]
    _note_context_limit(cfg, max(len(ids) for ids in ids_of) if prompts is not None else 0)
    if prompts is not None:
        for i, (prompt, ids) in enumerate(zip(tqdm(prompts, desc="prompts"), ids_of)):
            out = model.generate(num=args.num, prompts=[ids] * args.num,
                                 generator=seeded_generator(device, args.seed, "prompt", i), **common)
            records += [{"mode": "prompt", "index": i, "prompt": prompt, "text": text_of(tokenizer, o)} for o in out]
    elif args.reconstruct is not None or args.interpolate:
        texts = [args.reconstruct] if args.reconstruct is not None else list(args.interpolate)
        zs = [posterior_mean(model, t, tokenizer, cfg, vocab, device) for t in texts]
        z = zs[0][None] if len(zs) == 1 else interpolation(zs[0], zs[1], args.steps)      # [M, K, d]
        mode = "reconstruct" if len(zs) == 1 else "interpolate"
        for j in tqdm(range(z.shape[0]), desc=mode):
            out = model.generate(num=args.num, z=z[j:j + 1].expand(args.num, -1, -1),
                                 generator=seeded_generator(device, args.seed, mode, j), **common)
            t = j / max(z.shape[0] - 1, 1)
            records += [{"mode": mode, "index": j, **({"t": t} if mode == "interpolate" else {"source": texts[0]}),
                         "text": text_of(tokenizer, o)} for o in out]
    else:
        for start in tqdm(range(0, args.num, args.batch_size), desc="prior"):
            out = prior_chunk(model, start, min(args.batch_size, args.num - start), args.seed, device=device, **common)
            records += [{"mode": "prior", "index": start + j, "text": text_of(tokenizer, o)} for j, o in enumerate(out)]
    return records


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    for name, low in (("num", 1), ("steps", 2), ("batch_size", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad} (overrides are dotted.key=value)")
    if args.output:
        _check_output(Path(args.output))
    records = run(args)
    for r in records:
        print(f"[{r['mode']} {r['index']}] {r['text']}")
    if args.output:
        _write_records(Path(args.output), records)
        print(f"wrote {len(records)} texts to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
