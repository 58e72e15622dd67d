"""`trace-dist prepare`: text corpora -> tokenizer + tokenized, segmented WebDataset shards.

Two streaming passes over the inputs: the first trains the byte-level BPE on the train split
(skipped with --tokenizer), the second tokenizes, finds sentence boundaries (pysbd) and writes
DIR/{train,valid,test}-NNNNNN.tar plus DIR/manifest.json. Every document goes to a split by a
hash of its content (and --seed), so reruns, worker counts and partitions never move a document,
and the shards come out byte-identical. See docs/data.md for the formats.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from trace_dist.data.config import parse_segment
from trace_dist.data.segment import SentenceSplitter, split_long, token_bounds
from trace_dist.data.shards import Record, encode, write_shard
from trace_dist.data.sources import Document, InputError, Problems, expand_inputs, read_documents
from trace_dist.data.tokenizer import TOKENIZER_FILE, check_special_ids, train_tokenizer
from trace_dist.vocab import SPECIAL_TOKENS

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
FORMAT = "trace-dist-shards/1"
DOCS_PER_TASK = 64  # documents handed to a worker at once


class PrepareError(ValueError):
    """A user error found while preparing; exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace-dist prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files (.txt, .jsonl, .wp_source/.wp_target, .gz), directories, globs, "
                        "builtin:pydoc, or hf:NAME[:SPLIT]")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--segment", default="sentence", help="default segmentation: sentence or fixed:N")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json instead of training one")
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--shard-samples", type=int, default=512, help="documents per shard")
    p.add_argument("--workers", type=int, default=1, help="tokenizing/segmenting processes")
    p.add_argument("--conditional", action="store_true", help="prompt -> target pairs")
    p.add_argument("--partition", default="0/1", metavar="i/n",
                   help="prepare only partition i of n (disjoint documents and shard names)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier output in DIR")
    p.add_argument("--max-segments", type=int, help="keep at most N sentences per document")
    p.add_argument("--max-segment-tokens", type=int,
                   help="split sentences so that each has at most N tokens with its separator")
    p.add_argument("--seed", type=int, default=0, help="salt of the split assignment hash")
    return p


@dataclass(frozen=True)
class Settings:
    """The validated arguments; stored verbatim in the manifest."""

    inputs: list
    segment: str
    vocab_size: int
    tokenizer: Optional[str]
    valid_fraction: float
    test_fraction: float
    shard_samples: int
    conditional: bool
    partition: tuple
    max_segments: Optional[int]
    max_segment_tokens: Optional[int]
    seed: int


def validate(args: argparse.Namespace) -> Settings:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise PrepareError(message)

    try:
        parse_segment(args.segment)
    except ValueError as e:
        raise PrepareError(f"--segment: {e}")
    match = re.fullmatch(r"(\d+)/(\d+)", args.partition)
    need(bool(match) and int(match[1]) < int(match[2]),
         f"--partition must be i/n with 0 <= i < n, got {args.partition!r}")
    need(args.vocab_size >= 300, f"--vocab-size must be >= 300 (256 bytes + specials + merges), got {args.vocab_size}")
    for name in ("valid_fraction", "test_fraction"):
        need(0.0 <= getattr(args, name) < 1.0, f"--{name.replace('_', '-')} must be in [0, 1)")
    need(args.valid_fraction + args.test_fraction < 1.0, "--valid-fraction + --test-fraction must be < 1")
    need(args.shard_samples >= 1, "--shard-samples must be >= 1")
    need(args.workers >= 1, "--workers must be >= 1")
    need(args.max_segments is None or args.max_segments >= 1, "--max-segments must be >= 1")
    need(args.max_segment_tokens is None or args.max_segment_tokens >= 2, "--max-segment-tokens must be >= 2")
    need(args.tokenizer is None or Path(args.tokenizer).is_file(), f"--tokenizer {args.tokenizer}: no such file")
    return Settings(
        inputs=list(args.input), segment=args.segment, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, shard_samples=args.shard_samples,
        conditional=args.conditional, partition=(int(match[1]), int(match[2])),
        max_segments=args.max_segments, max_segment_tokens=args.max_segment_tokens, seed=args.seed)


# ----------------------------------------------------------------------------- placement


def placement(doc: Document, s: Settings) -> tuple[str, int, str]:
    """(split, partition, content id) from a hash of the document: stable across runs and workers."""
    h = hashlib.sha256(f"{s.seed}\0{doc.prompt or ''}\0{doc.text}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    split = "valid" if u < s.valid_fraction else "test" if u < s.valid_fraction + s.test_fraction else "train"
    return split, int.from_bytes(h[8:16], "big") % s.partition[1], h[:8].hex()


def shard_prefix(split: str, partition: tuple) -> str:
    i, n = partition
    return split if n == 1 else f"{split}-p{i:03d}of{n:03d}"


# ----------------------------------------------------------------------------- encoding (workers)

_worker: dict = {}


def _init_worker(tokenizer_json: str, settings: Settings) -> None:
    from tokenizers import Tokenizer

    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), splitter=SentenceSplitter(), settings=settings)


def encode_text(text: str, tokenizer, prompt: Optional[str] = None, max_segments: Optional[int] = None,
                max_segment_tokens: Optional[int] = None, splitter: Optional[SentenceSplitter] = None,
                stats: Optional[Counter] = None) -> Record:
    """A raw text (and conditional prompt) -> the Record `trace-dist prepare` stores for it.

    The text is tokenized once; pysbd sentence ends become token bounds; sentences longer than
    max_segment_tokens - 1 tokens are split (the separator takes one of the N places); then only
    the first max_segments sentences are kept, ids and text cut to match. The limits are the
    prepare options of the same names (None: no limit). The loaders turn the record into a batch
    (`Layout(data_cfg, vocab, conditional).example(record)`, `collate`), applying the data.*
    limits. Raises ValueError for an empty text or one whose tokens include a special token.
    stats, if given, counts what the limits changed (split_segments, cut_segments, cut_tokens);
    splitter lets a caller reuse one pysbd segmenter.
    """
    enc = tokenizer.encode(text)
    ids = np.asarray(enc.ids, dtype=np.int32)
    if len(ids) == 0:
        raise ValueError("text is empty")
    prompt_ids = None if prompt is None else np.asarray(tokenizer.encode(prompt).ids, dtype=np.int32)
    if any(a is not None and np.any(a < len(SPECIAL_TOKENS)) for a in (ids, prompt_ids)):
        raise ValueError("text contains a special-token string")
    stats = Counter() if stats is None else stats
    starts = np.asarray([start for start, _ in enc.offsets], dtype=np.int64)
    bounds = token_bounds(starts, (splitter or SentenceSplitter()).char_ends(text), len(ids))
    if max_segment_tokens:  # the separator takes one of the N places
        longer = split_long(bounds, max_segment_tokens - 1)
        stats["split_segments"] += len(longer) - len(bounds)
        bounds = longer
    if max_segments and len(bounds) > max_segments:
        stats["cut_segments"] += len(bounds) - max_segments
        stats["cut_tokens"] += len(ids) - int(bounds[max_segments - 1])
        bounds = bounds[:max_segments]
        ids = ids[: bounds[-1]]
        text = text[: enc.offsets[len(ids) - 1][1]]
    return Record(ids, bounds, prompt_ids, text, prompt)


def encode_document(doc: Document, doc_id: str) -> tuple[Optional[Record], Counter]:
    """Tokenize once, find sentence token boundaries, apply the prepare-time limits."""
    tokenizer, splitter, s = _worker["tokenizer"], _worker["splitter"], _worker["settings"]
    stats = Counter()
    try:
        record = encode_text(doc.text, tokenizer, doc.prompt if s.conditional else None, s.max_segments,
                             s.max_segment_tokens, splitter, stats)
    except ValueError as e:  # the reason, counted as a problem of this input line
        return None, Counter({str(e): 1})
    stats.update(samples=1, tokens=len(record.ids), segments=len(record.bounds))
    record.meta = {"id": doc_id, "source": doc.where}
    return record, stats


def _encode_task(task: list[tuple[Document, str, str]]) -> list[tuple[str, str, Optional[Record], Counter]]:
    return [(split, doc.where, *encode_document(doc, doc_id)) for doc, doc_id, split in task]


# ----------------------------------------------------------------------------- shard writing


@dataclass
class SplitWriter:
    """Collects one split's records into shards of `shard_samples` documents."""

    out: Path
    prefix: str
    shard_samples: int
    pending: list = field(default_factory=list)
    shards: list = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)

    def add(self, record: Record, stats: Counter) -> None:
        self.pending.append(record)
        self.stats.update(stats)
        if len(self.pending) == self.shard_samples:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        samples = [(f"{i:06d}", encode(r)) for i, r in enumerate(self.pending)]
        digest = write_shard(str(self.out / name), samples)
        self.shards.append({"name": name, "samples": len(self.pending), "sha256": digest,
                            "tokens": int(sum(len(r.ids) for r in self.pending)),
                            "segments": int(sum(len(r.bounds) for r in self.pending))})
        self.pending = []

    def summary(self) -> dict:
        counts = {k: int(v) for k, v in sorted(self.stats.items()) if k not in ("samples", "tokens", "segments")}
        return {"shards": self.shards, "samples": int(self.stats["samples"]), "tokens": int(self.stats["tokens"]),
                "segments": int(self.stats["segments"]), **counts}


# ----------------------------------------------------------------------------- driver


def _owned(name: str) -> bool:
    return name == TOKENIZER_FILE or name.startswith("manifest") or (
        name.split("-")[0] in SPLITS and name.endswith((".tar", ".tar.tmp")))


def prepare_output(out: Path, s: Settings, overwrite: bool) -> None:
    """Refuse to mix with earlier output unless --overwrite; in partition mode only our own files count."""
    out.mkdir(parents=True, exist_ok=True)
    i, n = s.partition
    mine = (lambda name: f"-p{i:03d}of{n:03d}-" in name or name == f"manifest-p{i:03d}of{n:03d}.json"
            or name == MANIFEST) if n > 1 else (lambda name: True)
    existing = sorted(p.name for p in out.iterdir() if mine(p.name) and (n == 1 or _owned(p.name)))
    if existing and not overwrite:
        raise PrepareError(f"--output {out} is not empty ({', '.join(existing[:3])}...); pass --overwrite to replace")
    for name in existing:
        if _owned(name):
            (out / name).unlink()


def load_or_train_tokenizer(sources: list[str], s: Settings, problems: Problems):
    from tokenizers import Tokenizer

    if s.tokenizer:
        tokenizer = Tokenizer.from_file(s.tokenizer)
        try:
            check_special_ids(tokenizer, s.tokenizer)
        except ValueError as e:
            raise PrepareError(str(e))
        return tokenizer

    def train_texts() -> Iterator[str]:
        for doc in read_documents(sources, s.conditional, problems):
            if placement(doc, s)[0] == "train":
                yield doc.text
                if doc.prompt:
                    yield doc.prompt

    return train_tokenizer(train_texts(), s.vocab_size)


def _tasks(docs: Iterable[Document], s: Settings) -> Iterator[list]:
    """Batches of (document, id, split) of this partition."""
    task = []
    for doc in docs:
        split, part, doc_id = placement(doc, s)
        if part != s.partition[0]:
            continue
        task.append((doc, doc_id, split))
        if len(task) == DOCS_PER_TASK:
            yield task
            task = []
    if task:
        yield task


def _encoded(tasks: Iterator[list], tokenizer_json: str, s: Settings, workers: int) -> Iterator[list]:
    """Encoded tasks in input order; with workers, a bounded window of tasks is in flight."""
    if workers == 1:
        _init_worker(tokenizer_json, s)
        yield from map(_encode_task, tasks)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork after the tokenizer's threads started
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json, s)) as pool:
        while window := list(itertools.islice(tasks, 4 * workers)):
            yield from pool.map(_encode_task, window)


def merge_partitions(out: Path, n: int) -> Optional[dict]:
    """Once all n partition manifests exist, their union becomes manifest.json."""
    parts = [out / f"manifest-p{i:03d}of{n:03d}.json" for i in range(n)]
    if not all(p.is_file() for p in parts):
        return None
    manifests = [json.loads(p.read_text()) for p in parts]
    merged = {k: v for k, v in manifests[0].items() if k not in ("splits", "input", "settings")}
    merged["settings"] = {**manifests[0]["settings"], "partition": [0, 1]}
    merged["partitions"] = n
    merged["input"] = {k: sum(m["input"][k] for m in manifests) for k in ("documents", "problems")}
    merged["splits"] = {}
    for split in SPLITS:
        entries = [m["splits"][split] for m in manifests]
        keys = set().union(*entries) - {"shards"}
        merged["splits"][split] = {"shards": [sh for e in entries for sh in e["shards"]],
                                   **{k: sum(e.get(k, 0) for e in entries) for k in sorted(keys)}}
    return merged


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def run(s: Settings, out: Path, workers: int, overwrite: bool, log=print) -> dict:
    from tqdm import tqdm

    sources = expand_inputs(s.inputs)
    prepare_output(out, s, overwrite)
    problems = Problems()
    t0 = time.time()
    tokenizer = load_or_train_tokenizer(sources, s, problems)
    tokenizer_json = tokenizer.to_str()
    log(f"tokenizer: {tokenizer.get_vocab_size()} tokens ({'loaded' if s.tokenizer else 'trained'}, "
        f"{time.time() - t0:.1f}s)")
    if not s.tokenizer:
        problems = Problems()  # the shard pass below meets the same problems again; count them once

    writers = {split: SplitWriter(out, shard_prefix(split, s.partition), s.shard_samples) for split in SPLITS}
    docs = tqdm(read_documents(sources, s.conditional, problems), unit="doc", desc="prepare", disable=None)
    documents = 0
    for encoded in _encoded(_tasks(docs, s), tokenizer_json, s, workers):
        for split, where, record, stats in encoded:
            documents += 1
            if record is None:
                for reason in stats:
                    problems.add(reason, where)
            else:
                writers[split].add(record, stats)
    for w in writers.values():
        w.flush()

    usable = sum(w.stats["samples"] for w in writers.values())
    for message in problems.messages:
        log(f"skipped {message}")
    if problems.total():
        reasons = ", ".join(f"{r}: {c}" for r, c in problems.counts.most_common())
        log(f"skipped {problems.total()} input items: {reasons}")
    if usable == 0:
        raise PrepareError(f"no usable documents in {', '.join(s.inputs)} ({problems.total()} items skipped)")

    i, n = s.partition
    manifest = {
        "format": FORMAT,
        "settings": {**vars(s), "partition": [i, n]},
        "conditional": s.conditional,
        "segment": s.segment,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        "input": {"documents": documents, "problems": problems.total()},
        "problems": dict(problems.counts),
        "splits": {split: w.summary() for split, w in writers.items()},
    }
    write_atomic(out / TOKENIZER_FILE, tokenizer_json)
    if n == 1:
        write_json(out / MANIFEST, manifest)
    else:
        write_json(out / f"manifest-p{i:03d}of{n:03d}.json", manifest)
        merged = merge_partitions(out, n)
        if merged:
            write_json(out / MANIFEST, merged)
    for split, w in writers.items():
        log(f"{split}: {len(w.shards)} shards, {w.stats['samples']} documents, {w.stats['tokens']} tokens, "
            f"{w.stats['segments']} sentences")
    log(f"wrote {out} in {time.time() - t0:.1f}s")
    return manifest


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the message
        return int(e.code or 0)
    try:
        run(validate(args), Path(args.output), args.workers, args.overwrite, log=lambda m: print(m, file=sys.stderr))
    except (InputError, PrepareError) as e:
        print(f"trace-dist prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
