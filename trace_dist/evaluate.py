"""`trace-dist eval`: likelihood, latent and generation metrics of a checkpoint (docs/eval.md).

    trace-dist eval --checkpoint RUN_OR_EXPORT --data DIR [--split test] [--iw-samples 30]
                    [--num-samples 1000] [--token-budget 8192] [--max-documents N] [--seed S]
                    [--output metrics.json] [--config extra.yaml] [k=v ...]

Runs alone, under torchrun or under the `deepspeed` launcher (no engine: every rank loads the
consolidated model). Each rank evaluates its disjoint share of the split; sums are all-reduced in
float64, posteriors all-gathered for MI; rank 0 computes the text metrics and writes the JSON and
TensorBoard. Likelihoods are reported per token and per byte / word of the text (`bpb_*`,
`word_ppl_*`: fair across data.segment); a data.mixture is evaluated per source (`sources.<name>`)
and pooled.

Batching: a rank's documents are sorted by length and packed into batches of at most
`--token-budget` decoder tokens (documents x importance samples x the batch's longest document; a
document over the budget runs alone); the S importance samples of a batch decode as one batch.

Batch- and rank-count independence: each document's noise is drawn on the CPU from its own
generator, seeded by (seed, its content hash), in a fixed order (the ELBO sample, then the S
importance samples, each [K, d] for its K latents), and padding is masked. So a document's numbers
do not depend on its batch, the budget, the rank count or the device, up to float rounding of the
batched matmuls (~1e-7 relative); the draws are exactly those of evaluating it alone on the CPU with
`torch.manual_seed` of the same seed (benchmarks/eval_reference.py, the former batch-1 path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from trace_dist import metrics
from trace_dist.config import EvalConfig, choices
from trace_dist.distributed import all_reduce_named, leave_distributed
from trace_dist.errors import UserError
from trace_dist.sampling import prior_chunk, seeded_generator, stable_seed, text_of

TOKEN_BUDGET = 8192    # decoder tokens per likelihood batch (documents x importance samples x length)
GENERATION_BATCH = 128  # prior samples per generate() call: a fixed size keeps texts identical on any rank count


# ------------------------------------------------------------------------------ documents
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


def first_documents(keys: list[int], limit: int) -> list[int]:
    """Indices of this rank's documents among the `limit` smallest content hashes of all ranks: the
    same documents (equal copies aside) whatever the rank count."""
    rank, _ = _world()
    tagged = all_gather_list([(key, rank, i) for i, key in enumerate(keys)])
    return sorted(i for _, r, i in sorted(tagged)[:limit] if r == rank)


def length_batches(lengths: list[int], samples: int, budget: int) -> list[list[int]]:
    """Indices grouped by ascending length so that documents x samples x longest <= budget (a
    document over the budget alone). Sorting keeps padding small."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches and (len(batches[-1]) + 1) * samples * lengths[i] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def collate(examples: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Trimmed batches of one -> one batch right-padded to the longest (pad tokens are masked out)."""
    T = max(ex["tokens"].shape[1] for ex in examples)
    fill = {"tokens": pad, "seg_ids": -1, "loss_mask": False, "prompt_mask": False}

    def padded(ex, k):                                                      # [1, n] -> [1, T]
        return torch.nn.functional.pad(ex[k], (0, T - ex[k].shape[1]), value=fill[k])
    batch = {k: torch.cat([padded(ex, k) for ex in examples]) for k in fill}
    batch.update({k: torch.cat([ex[k] for ex in examples])
                  for k in ("num_segments", "example_mask", "num_bytes", "num_words")})
    return batch


def document_noise(seed: int, key: int, num_latents: int, latent_size: int, iw_samples: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One document's noise: the ELBO sample [K, d], then the importance samples [S, K, d], drawn in
    that order on the CPU from a generator seeded by (seed, content hash)."""
    g = seeded_generator("cpu", seed, "likelihood", key)
    shape = (num_latents, latent_size)
    elbo = torch.randn(shape, generator=g)
    return elbo, torch.stack([torch.randn(shape, generator=g) for _ in range(iw_samples)])


def _pad_latents(x: torch.Tensor, K: int) -> torch.Tensor:
    """[..., k, d] -> [..., K, d], zeros for the latents a document does not have (never read)."""
    return torch.nn.functional.pad(x, (0, 0, 0, K - x.shape[-2]))


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


# ------------------------------------------------------------------------------ the passes
def empty_sums(model) -> dict[str, torch.Tensor]:
    """Every named float64 sum, zero, so that a rank without documents joins the reduction."""
    K, d = model.cfg.max_segments, model.cfg.latent_size
    sums = {k: torch.zeros((), dtype=torch.float64)
            for k in ("rec", "kl", "log_px", "num_tokens", "num_examples", "num_bytes", "num_words")}
    sums.update(kl_per_segment=torch.zeros(K, dtype=torch.float64), seg_count=torch.zeros(K, dtype=torch.float64))
    if model.has_latent:
        sums.update(au_count=torch.zeros(K, dtype=torch.float64), au_sum=torch.zeros(K, d, dtype=torch.float64),
                    au_sumsq=torch.zeros(K, d, dtype=torch.float64))
    return sums


@torch.no_grad()
def likelihood_batch(model, examples: list[dict], keys: list[int], iw_samples: int, seed: int, device
                     ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """ELBO terms, IW log-likelihood and posterior statistics of a few trimmed documents, batched:
    (named sums, one row per document)."""
    batch = {k: v.to(device) for k, v in collate(examples, model.vocab.pad).items()}
    rows = [{"key": key, "prompt": ex["tokens"][0][ex["prompt_mask"][0]].tolist(),
             "text": ex["tokens"][0][ex["loss_mask"][0]].tolist()} for ex, key in zip(examples, keys)]
    eps = eps_iw = None
    values = {}
    if model.has_latent:
        post = {k: v.cpu() for k, v in model.posterior(batch).items()}     # [B, max_segments, d] / [B, max_segments]
        values.update({f"au_{k}": v for k, v in metrics.au_stats(post["mean"], post["seg_mask"]).items()})
        for i, row in enumerate(rows):
            row.update(innov_mean=post["innov_mean"][i], innov_logvar=post["innov_logvar"][i],
                       seg_mask=post["seg_mask"][i])
        # each document's own noise for its own K latents, padded to the batch's K
        num_latents = post["seg_mask"].sum(1).tolist()
        K = max(num_latents)
        noise = [document_noise(seed, key, k, model.cfg.latent_size, iw_samples) for key, k in zip(keys, num_latents)]
        eps = torch.stack([_pad_latents(e, K) for e, _ in noise]).to(device)          # [B, K, d]
        eps_iw = torch.stack([_pad_latents(e, K) for _, e in noise]).to(device)       # [B, S, K, d]
    out = model(batch, eps=eps)
    lw = model.log_weights(batch, iw_samples, eps=eps_iw)                           # [B, S]
    values.update(rec=out.rec_sum, kl=out.kl_sum, kl_per_segment=out.kl_per_segment_sum, seg_count=out.seg_count,
                  num_bytes=batch["num_bytes"].sum(), num_words=batch["num_words"].sum(),
                  **metrics.iw_sums(lw.cpu(), batch["loss_mask"].sum(1).cpu()))
    return {k: v.detach().cpu().double() for k, v in values.items()}, rows


def likelihood_pass(model, examples: list[dict], iw_samples: int, seed: int, device, token_budget: int,
                    progress: bool) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """This rank's documents in length-sorted batches -> (its named float64 sums, its rows)."""
    from tqdm import tqdm

    keys = [example_key(ex) for ex in examples]
    sums, rows = empty_sums(model), []
    bar = tqdm(total=len(examples), desc="eval", unit="doc", disable=not progress)
    for idx in length_batches([ex["tokens"].shape[1] for ex in examples], iw_samples, token_budget):
        values, batch_rows = likelihood_batch(model, [examples[i] for i in idx], [keys[i] for i in idx],
                                              iw_samples, seed, device)
        sums = {k: v + values[k] for k, v in sums.items()}
        rows += batch_rows
        bar.update(len(idx))
    bar.close()
    return sums, rows


def likelihood_metrics(model, cfg, vocab, split: str, iw_samples: int, seed: int, device,
                       token_budget: int = TOKEN_BUDGET, max_documents: Optional[int] = None,
                       progress: bool = False) -> tuple[dict, list[dict]]:
    """This rank's share of `split` (of its first `max_documents` by content hash, over every source) ->
    (metrics over the whole split, with `sources`: {name: the same metrics of that source's documents}
    for each source of data.sources() that has documents; this rank's document rows). A single
    prepared set is its own only source."""
    from trace_dist.data import eval_loaders

    rank, world = _world()
    examples: list[tuple[str, dict]] = []                                   # (source name, trimmed document)
    for name, loader in eval_loaders(cfg.data, vocab, split, cfg.eval.batch_size, rank, world,
                                     conditional=cfg.model.conditional):
        examples += [(name, ex) for batch in loader for ex in single_examples(batch)]
    if max_documents is not None:
        examples = [examples[i] for i in first_documents([example_key(ex) for _, ex in examples], max_documents)]
    kl_floor = model.latent.kl_floor if model.has_latent else 0.0
    finish = lambda sums, rows: finish_likelihood(sums, sorted(rows, key=lambda r: r["key"]), kl_floor,  # noqa: E731
                                                  cfg.eval.au_delta, seed)
    pooled, all_rows, my_rows, per_source = None, [], [], {}
    for name in [s.name for s in cfg.data.sources()]:                     # the same order on every rank
        sums, rows = likelihood_pass(model, [ex for n, ex in examples if n == name], iw_samples, seed, device,
                                     token_budget, progress)
        sums, gathered = all_reduce_named(sums), all_gather_list(rows)
        pooled = sums if pooled is None else {k: v + sums[k] for k, v in pooled.items()}
        all_rows, my_rows = all_rows + gathered, my_rows + rows
        if sums["num_examples"] > 0:
            per_source[name] = (sums, gathered)
    out = finish(pooled, all_rows)
    # one source: its figures are the pooled ones (not computed twice)
    out["sources"] = {name: finish(*parts) if len(per_source) > 1 else dict(out) for name, parts in per_source.items()}
    return out, my_rows


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


def finish_likelihood(s: dict[str, torch.Tensor], rows: list[dict], kl_floor: float, delta: float,
                      seed: int) -> dict:
    """All-reduced sums + gathered rows (sorted by key) -> the likelihood and latent metrics."""
    n = float(s["num_examples"])
    out = metrics.iw_from_sums({k: s[k] for k in ("log_px", "num_tokens", "num_examples")})
    out.update(elbo=-(float(s["rec"]) + float(s["kl"])) / n, rec=float(s["rec"]) / n, kl=float(s["kl"]) / n)
    # per byte / per word of the text: the same numerators (separators and eos included)
    num_bytes, num_words = float(s["num_bytes"]), float(s["num_words"])
    iw = metrics.per_text(-float(s["log_px"]), num_bytes, num_words)
    bound = metrics.per_text(float(s["rec"]) + float(s["kl"]), num_bytes, num_words)
    out.update(bpb_iw=iw["bpb"], word_ppl_iw=iw["word_ppl"], bpb_elbo=bound["bpb"], word_ppl_elbo=bound["word_ppl"],
               num_bytes=int(num_bytes), num_words=int(num_words))
    count = s["seg_count"]
    used = int((count > 0).sum())
    out["kl_per_segment"] = (s["kl_per_segment"][:used] / count[:used]).tolist()
    out["kl_floor"] = kl_floor
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
def generation_batch(cfg) -> int:
    return max(cfg.eval.batch_size, GENERATION_BATCH)


def generation_pass(model, rows: list[dict], cfg, num_samples: int, seed: int, device, tokenizer,
                    progress: bool) -> dict:
    """Unconditional: num_samples texts from the prior, sample i seeded by (seed, i), generated in
    KV-cached chunks of max(eval.batch_size, GENERATION_BATCH) dealt to ranks round robin; BLEU against the first num_samples documents (by
    content hash). Conditional: one continuation of each of those documents' prompts, BLEU
    against its own reference. Texts are gathered; rank 0 alone computes the text metrics (the
    others return empty metrics)."""
    from tqdm import tqdm

    rank, world = _world()
    chosen = {key: i for i, key in enumerate(sorted(all_gather_list([r["key"] for r in rows]))[:num_samples])}
    mine = [r for r in rows if r["key"] in chosen]
    produced = []                                                           # (order, sample ids, reference ids)
    if model.cfg.conditional:
        for r in tqdm(mine, desc="generate", disable=not progress, unit="doc"):
            ids = model.generate(num=1, prompts=[r["prompt"]], gen=cfg.generation,
                                 generator=seeded_generator(device, seed, "generate", r["key"]),
                                 segment=cfg.data.segment)[0]
            produced.append((chosen[r["key"]], ids, r["text"]))
    else:
        chunk = generation_batch(cfg)
        starts = list(range(0, num_samples, chunk))[rank::world]
        bar = tqdm(total=sum(min(chunk, num_samples - s) for s in starts), desc="generate", unit="sample",
                   disable=not progress)
        for start in starts:
            batch = prior_chunk(model, start, min(chunk, num_samples - start), seed, cfg.generation, device,
                                cfg.data.segment)
            produced += [(start + j, ids, None) for j, ids in enumerate(batch)]
            bar.update(len(batch))
        bar.close()
        produced += [(num_samples + chosen[r["key"]], None, r["text"]) for r in mine]  # references
    produced = sorted(all_gather_list(produced), key=lambda p: p[0])
    samples = [text_of(tokenizer, ids) for _, ids, _ in produced if ids is not None]
    if rank != 0:
        return {"metrics": {}, "samples": samples}
    references = [text_of(tokenizer, ref) for _, _, ref in produced if ref is not None]
    out = metrics.text_metrics([metrics.words(t) for t in samples], [metrics.words(t) for t in references],
                               paired=model.cfg.conditional)
    return {"metrics": out, "samples": samples}


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace-dist eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, tag dir or export dir")
    p.add_argument("--data", help="prepared data directory (default: the checkpoint config's data.path)")
    p.add_argument("--split", choices=choices(EvalConfig, "split"), help="default: eval.split")
    p.add_argument("--iw-samples", type=int, help="importance samples per document (default: eval.iw_samples)")
    p.add_argument("--num-samples", type=int, help="generated texts (default: eval.num_samples)")
    p.add_argument("--token-budget", type=int, default=TOKEN_BUDGET,
                   help=f"decoder tokens per likelihood batch: documents x IW samples x length (default {TOKEN_BUDGET})")
    p.add_argument("--max-documents", type=int, help="evaluate only the first N documents (by content hash)")
    p.add_argument("--seed", type=int, help="default: train.seed")
    p.add_argument("--output", help="metrics JSON (default: <run dir>/eval_<split>.json)")
    p.add_argument("--config", action="append", default=[], help="extra YAML merged over the checkpoint's config")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    return p


def load(args, extra: list[str]):
    """(model, cfg, tokenizer, vocab) with --config files and overrides applied. model.* overrides
    apply too (e.g. model.latent_path=sequential); one that changes a weight's shape fails as the
    weights load."""
    from trace_dist.checkpoint import load_for_inference

    # --data replaces the training data (a mixture included): eval reads one prepared set
    overrides = list(extra) + ([f"data.path={args.data}", "data.mixture=[]"] if getattr(args, "data", None) else [])
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
    from trace_dist.data import check_same_tokenizer, manifest
    from trace_dist.distributed import init_distributed, local_info

    start = time.time()
    model, cfg, tokenizer, vocab = load(args, extra)  # a bad checkpoint fails before any process group starts
    check_same_tokenizer(cfg.data.path, tokenizer, what=f"checkpoint {args.checkpoint}")
    # one process needs no process group (nor DeepSpeed's start-up): the collectives below are no-ops then
    info = init_distributed() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else local_info()
    model.to(info.device)
    split = args.split or cfg.eval.split
    iw = args.iw_samples or cfg.eval.iw_samples
    num_samples = args.num_samples or cfg.eval.num_samples
    seed = cfg.train.seed if args.seed is None else args.seed
    progress = info.is_main and not args.no_progress
    results, my_rows = likelihood_metrics(model, cfg, vocab, split, iw, seed, info.device, args.token_budget,
                                          args.max_documents, progress)
    generated = generation_pass(model, my_rows, cfg, num_samples, seed, info.device, tokenizer, progress)
    results.update(generated["metrics"])
    sources = results.pop("sources")
    if not info.is_main:
        return None
    data_manifest = manifest(cfg.data.path)
    report = {
        "metrics": results,
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "split": split, "iw_samples": iw, "num_samples": len(generated["samples"]), "seed": seed,
        "world_size": info.world_size, "wall_time_s": round(time.time() - start, 2),
        "batching": {"token_budget": args.token_budget, "max_documents": args.max_documents,
                     "generation_batch_size": generation_batch(cfg)},
        "tokenization": metrics.TOKENIZATION,
        "token_count": "decoder-predicted tokens: segment tokens incl. each sep and the final eos; no bos/prompt",
        "text_count": "bpb_*: NLL in bits per UTF-8 byte, word_ppl_*: exp(NLL per whitespace word) of the text "
                      "scored (num_bytes, num_words; the target only); every sep and eos stays in the NLL, so "
                      "they compare across data.segment",
        "mi": "He et al. MI of the first segment's innovation u_1 over all documents; mi_per_segment[k]: "
              "of u_k over the documents that have segment k (positions at least two documents have)",
        "data_manifest_sha256": hashlib.sha256(json.dumps(data_manifest, sort_keys=True).encode()).hexdigest(),
        "sources": sources,
        "config": cfg.model_dump(mode="json"),
        "samples": generated["samples"][:20],
    }
    out = Path(args.output) if args.output else run_dir_of(args.checkpoint) / f"eval_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")                          # a complete file replaces the old one
    partial.write_text(json.dumps(report, indent=1))
    partial.replace(out)
    if cfg.tensorboard:
        from trace_dist.tblog import TensorBoard

        step = _checkpoint_step(args.checkpoint)
        tb = TensorBoard(run_dir_of(args.checkpoint) / "tensorboard" / "eval")
        tb.scalars({k: v for k, v in results.items() if isinstance(v, (int, float))}, step, prefix=f"eval/{split}/")
        for name, figures in sources.items() if len(sources) > 1 else ():
            tb.scalars({k: v for k, v in figures.items() if isinstance(v, (int, float))}, step,
                       prefix=f"eval/{split}/{name}/")
        tb.text(f"eval/{split}", markdown_table(results), step)
        tb.close()
    print(markdown_table(results))
    print(f"wrote {out}")
    return report


def _checkpoint_step(checkpoint: str) -> int:
    from trace_dist.checkpoint import locate
    from trace_dist.errors import CheckpointError

    try:
        return int(locate(checkpoint)[2].get("step", 0))
    except CheckpointError:  # an export directory
        return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"unrecognised arguments {bad} (overrides are dotted.key=value)")
    for name, least in (("iw_samples", 1), ("num_samples", 2), ("token_budget", 1), ("max_documents", 1)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    evaluate(args, args.overrides)
    leave_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
