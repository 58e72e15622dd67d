"""`trace-dist eval`: likelihood, latent and generation metrics of a checkpoint (docs/eval.md).

    trace-dist eval --checkpoint RUN_OR_EXPORT --data DIR [--split test] [--iw-samples 30]
                    [--num-samples 1000] [--seed S] [--output metrics.json] [--config extra.yaml] [k=v ...]

Runs alone, under torchrun or under the `deepspeed` launcher (no engine: every rank loads the
consolidated model). Each rank evaluates its disjoint share of the split; sums are all-reduced in
float64, posteriors all-gathered for MI; rank 0 writes the JSON and TensorBoard.

Rank-count independence: every random draw is seeded from (seed, the example's content) or
(seed, the generation chunk's index), never from the rank, and each document is evaluated on
its own (batch of one, trimmed to its length), so its numbers do not depend on which documents
shared its batch. Same checkpoint + data + seed -> the same metrics on 1 or N ranks (up to the
float64 summation order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from trace_dist import metrics



# ------------------------------------------------------------------------------ seeding
def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical on every rank and platform."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def example_key(ex: dict[str, torch.Tensor]) -> int:
    """Content hash of one trimmed example (its tokens and segmentation)."""
    h = hashlib.blake2b(digest_size=8)
    for k in ("tokens", "seg_ids"):
        h.update(ex[k].cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & (2 ** 63 - 1)


def single_examples(batch: dict[str, torch.Tensor]):
    """Yield each real example of a batch as a batch of one, trimmed to its own length."""
    used = batch["loss_mask"] | batch["prompt_mask"]                        # [B, T]
    for i in torch.nonzero(batch["example_mask"]).flatten().tolist():
        n = int(used[i].nonzero().max()) + 1
        ex = {k: (v[i:i + 1, :n] if v.dim() == 2 else v[i:i + 1]) for k, v in batch.items() if v.dim() > 0}
        ex["bad_samples"] = torch.zeros((), dtype=torch.int64)
        yield ex


def seeded_generator(device, *parts) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stable_seed(*parts))


def prior_chunk(model, start: int, count: int, seed: int, gen, device, segment: str,
                latent_path: Optional[str] = None) -> list[list[int]]:
    """Samples start..start+count-1 from the prior, seeded by (seed, start): the same texts
    whichever rank or process draws the chunk."""
    return model.generate(num=count, gen=gen, generator=seeded_generator(device, seed, "generate", start),
                          segment=segment, latent_path=latent_path)


# ------------------------------------------------------------------------------ text
def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------ collectives
def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_list(items: list) -> list:
    """Concatenation of every rank's list, in rank order (picklable items)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def all_reduce_dict(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from trace_dist.distributed import all_reduce_sum

    return {k: all_reduce_sum(v.double()) for k, v in sums.items()}


# ------------------------------------------------------------------------------ the passes
class Accumulator:
    """Per-rank float64 sums (all-reducible) plus per-example rows for MI and text metrics."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self.rows: list[dict] = []   # key, innovation posteriors, prompt/reference ids
        self.kl_floor = 0.0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums[k] + v.detach().double().cpu()


@torch.no_grad()
def likelihood_pass(model, loader, iw_samples: int, seed: int, device, progress: bool) -> Accumulator:
    """ELBO terms, IW log-likelihood, posterior statistics of every example this rank holds."""
    from tqdm import tqdm

    acc = Accumulator()
    acc.kl_floor = model.latent.kl_floor if model.has_latent else 0.0
    for batch in tqdm(loader, desc="eval", disable=not progress, unit="batch"):
        for ex in single_examples(batch):
            key = example_key(ex)
            ex = {k: v.to(device) for k, v in ex.items()}
            torch.manual_seed(stable_seed(seed, "likelihood", key))
            out = model(ex)
            lw = model.log_weights(ex, iw_samples)                              # [1, S]
            acc.add({"rec": out.rec_sum, "kl": out.kl_sum, "kl_per_segment": out.kl_per_segment_sum,
                     "seg_count": out.seg_count, **metrics.iw_sums(lw.cpu(), ex["loss_mask"].sum(1).cpu())})
            row = {"key": key, "prompt": ex["tokens"][0][ex["prompt_mask"][0]].tolist(),
                   "text": ex["tokens"][0][ex["loss_mask"][0]].tolist()}
            if model.has_latent:
                post = {k: v.cpu() for k, v in model.posterior(ex).items()}
                acc.add({f"au_{k}": v for k, v in metrics.au_stats(post["mean"], post["seg_mask"]).items()})
                row.update(innov_mean=post["innov_mean"][0], innov_logvar=post["innov_logvar"][0],
                           seg_mask=post["seg_mask"][0])
            acc.rows.append(row)
    return acc


def likelihood_metrics(model, cfg, vocab, split: str, iw_samples: int, seed: int, device,
                       progress: bool = False) -> tuple[dict, list[dict]]:
    """This rank's share of `split` -> (metrics over the whole split, this rank's example rows)."""
    from trace_dist.data import eval_loader

    rank, world = _world()
    loader = eval_loader(cfg.data, vocab, split, cfg.eval.batch_size, rank, world, conditional=cfg.model.conditional)
    acc = likelihood_pass(model, loader, iw_samples, seed, device, progress)
    rows = sorted(all_gather_list(acc.rows), key=lambda r: r["key"])
    return finish_likelihood(acc, rows, cfg.eval.au_delta, seed), acc.rows


def mi_noise(keys: list[int], seed: int, shape: tuple) -> torch.Tensor:
    """[N, *shape] standard normals for the MI samples of the documents with these content hashes.

    Seeded by (seed, hash, occurrence among equal hashes): no draw depends on the rank that held
    the document, and a document that occurs twice in a split gets two independent samples (He et
    al. draw one sample per data point; a shared draw would correlate their noise). `keys` must be
    the gathered keys in sorted order, so occurrences are numbered the same on every rank count.
    """
    seen: Counter = Counter()
    out = []
    for key in keys:
        out.append(torch.randn(shape, generator=torch.Generator().manual_seed(stable_seed(seed, "mi", key, seen[key])),
                               dtype=torch.float64))
        seen[key] += 1
    return torch.stack(out)


def finish_likelihood(acc: Accumulator, rows: list[dict], delta: float, seed: int) -> dict:
    """Reduced sums + gathered rows (sorted by key) -> the likelihood and latent metrics."""
    s = all_reduce_dict(dict(acc.sums))
    n = float(s["num_examples"])
    out = metrics.iw_from_sums({k: s[k] for k in ("log_px", "num_tokens", "num_examples")})
    out.update(elbo=-(float(s["rec"]) + float(s["kl"])) / n, rec=float(s["rec"]) / n, kl=float(s["kl"]) / n)
    count = s["seg_count"]
    used = int((count > 0).sum())
    out["kl_per_segment"] = (s["kl_per_segment"][:used] / count[:used]).tolist()
    out["kl_floor"] = acc.kl_floor
    if rows and "innov_mean" in rows[0]:
        out.update(metrics.active_units_from_stats({k: s[f"au_{k}"] for k in ("count", "sum", "sumsq")}, delta))
        K = max(used, 1)
        stack = lambda name: torch.stack([r[name][:K] for r in rows])     # noqa: E731  [N, K, d] / [N, K]
        mean = stack("innov_mean")
        eps = mi_noise([r["key"] for r in rows], seed, tuple(mean.shape[1:]))
        out["mi_per_segment"] = metrics.mutual_info_per_segment(mean, stack("innov_logvar"), stack("seg_mask"), eps)
        # The first segment's latent, which every document has (the Optimus/DELLA single-latent MI);
        # a split of one document has MI 0 exactly (the mixture is its own posterior).
        out["mi"] = out["mi_per_segment"][0] if out["mi_per_segment"] else 0.0
    return out


@torch.no_grad()
def generation_pass(model, rows: list[dict], cfg, num_samples: int, seed: int, device, tokenizer,
                    progress: bool) -> dict:
    """Unconditional: num_samples texts from the prior, in fixed chunks of eval.batch_size seeded by
    chunk index and dealt to ranks round robin; BLEU against the first num_samples documents (by
    content hash). Conditional: one continuation of each of those documents' prompts, BLEU
    against its own reference."""
    from tqdm import tqdm

    rank, world = _world()
    chosen = {key: i for i, key in enumerate(sorted(all_gather_list([r["key"] for r in rows]))[:num_samples])}
    mine = [r for r in rows if r["key"] in chosen]
    produced = []                                                           # (order, sample ids, reference ids)
    if model.cfg.conditional:
        for r in tqdm(mine, desc="generate", disable=not progress):
            ids = model.generate(num=1, prompts=[r["prompt"]], gen=cfg.generation,
                                 generator=seeded_generator(device, seed, "generate", r["key"]),
                                 segment=cfg.data.segment)[0]
            produced.append((chosen[r["key"]], ids, r["text"]))
    else:
        chunk = cfg.eval.batch_size
        starts = list(range(0, num_samples, chunk))[rank::world]
        for start in tqdm(starts, desc="generate", disable=not progress):
            batch = prior_chunk(model, start, min(chunk, num_samples - start), seed, cfg.generation, device,
                                cfg.data.segment)
            produced += [(start + j, ids, None) for j, ids in enumerate(batch)]
        produced += [(num_samples + chosen[r["key"]], None, r["text"]) for r in mine]  # references
    produced = sorted(all_gather_list(produced), key=lambda p: p[0])
    samples = [text_of(tokenizer, ids) for _, ids, _ in produced if ids is not None]
    references = [text_of(tokenizer, ref) for _, _, ref in produced if ref is not None]
    out = metrics.text_metrics([metrics.words(t) for t in samples], [metrics.words(t) for t in references],
                               paired=model.cfg.conditional)
    return {"metrics": out, "samples": samples}


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace-dist eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, tag dir or export dir")
    p.add_argument("--data", help="prepared data directory (default: the checkpoint config's data.path)")
    p.add_argument("--split", choices=["valid", "test"], help="default: eval.split")
    p.add_argument("--iw-samples", type=int, help="importance samples per document (default: eval.iw_samples)")
    p.add_argument("--num-samples", type=int, help="generated texts (default: eval.num_samples)")
    p.add_argument("--seed", type=int, help="default: train.seed")
    p.add_argument("--output", help="metrics JSON (default: <run dir>/eval_<split>.json)")
    p.add_argument("--config", action="append", default=[], help="extra YAML merged over the checkpoint's config")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    return p


def load(args, extra: list[str]):
    """(model, cfg, tokenizer, vocab) with --config files and overrides applied; model.* cannot change."""
    from trace_dist.checkpoint import load_for_inference

    overrides = list(extra) + ([f"data.path={args.data}"] if getattr(args, "data", None) else [])
    return load_for_inference(args.checkpoint, overrides, configs=tuple(args.config))


def run_dir_of(checkpoint: str) -> Path:
    """The training run directory holding a checkpoint (or the export directory itself)."""
    p = Path(checkpoint).resolve()
    for cand in (p, *p.parents):
        if (cand / "checkpoints").is_dir():
            return cand
    return p if p.is_dir() else p.parent


def markdown_table(values: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for k, v in values.items():
        shown = ", ".join(f"{x:.4g}" for x in v) if isinstance(v, list) else (f"{v:.6g}" if isinstance(v, float) else v)
        lines.append(f"| {k} | {shown} |")
    return "\n".join(lines)


def evaluate(args, extra: list[str]) -> Optional[dict]:
    from trace_dist.data import manifest
    from trace_dist.distributed import init_distributed

    start = time.time()
    info = init_distributed()
    model, cfg, tokenizer, vocab = load(args, extra)
    model.to(info.device)
    split = args.split or cfg.eval.split
    iw = args.iw_samples or cfg.eval.iw_samples
    num_samples = args.num_samples or cfg.eval.num_samples
    seed = cfg.train.seed if args.seed is None else args.seed
    progress = info.is_main and not args.no_progress
    results, my_rows = likelihood_metrics(model, cfg, vocab, split, iw, seed, info.device, progress)
    generated = generation_pass(model, my_rows, cfg, num_samples, seed, info.device, tokenizer, progress)
    results.update(generated["metrics"])
    if not info.is_main:
        return None
    data_manifest = manifest(cfg.data.path)
    report = {
        "metrics": results,
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "split": split, "iw_samples": iw, "num_samples": len(generated["samples"]), "seed": seed,
        "world_size": info.world_size, "wall_time_s": round(time.time() - start, 2),
        "tokenization": metrics.TOKENIZATION,
        "token_count": "decoder-predicted tokens: segment tokens incl. each sep and the final eos; no bos/prompt",
        "mi": "He et al. MI of the first segment's innovation u_1 over all documents; mi_per_segment[k]: "
              "of u_k over the documents that have segment k (positions at least two documents have)",
        "data_manifest_sha256": hashlib.sha256(json.dumps(data_manifest, sort_keys=True).encode()).hexdigest(),
        "config": cfg.model_dump(mode="json"),
        "samples": generated["samples"][:20],
    }
    out = Path(args.output) if args.output else run_dir_of(args.checkpoint) / f"eval_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if cfg.tensorboard:
        from trace_dist.tblog import TensorBoard

        step = _checkpoint_step(args.checkpoint)
        tb = TensorBoard(run_dir_of(args.checkpoint) / "tensorboard" / "eval")
        tb.scalars({k: v for k, v in results.items() if isinstance(v, (int, float))}, step, prefix=f"eval/{split}/")
        tb.text(f"eval/{split}", markdown_table(results), step)
        tb.close()
    print(markdown_table(results))
    print(f"wrote {out}")
    return report


def _checkpoint_step(checkpoint: str) -> int:
    from trace_dist.checkpoint import locate

    try:
        return int(locate(checkpoint)[2].get("step", 0))
    except FileNotFoundError:  # an export directory
        return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"trace-dist eval: unrecognised arguments {bad} (overrides are dotted.key=value)", file=sys.stderr)
        return 2
    for name in ("iw_samples", "num_samples"):
        if getattr(args, name) is not None and getattr(args, name) < (1 if name == "iw_samples" else 2):
            print(f"trace-dist eval: --{name.replace('_', '-')} is too small", file=sys.stderr)
            return 2
    evaluate(args, args.overrides)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
