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
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from trace_dist.data.config import parse_segment
from trace_dist.data.integrity import (FORMAT, MANIFEST, SPLITS, TOKENIZER_FILE, DataError, read_manifest,
                                       read_tokenizer, tokenizer_sha256)
from trace_dist.data.segment import SentenceSplitter, split_long, token_bounds
from trace_dist.data.shards import Record, encode, write_shard
from trace_dist.data.sources import Document, Problems, expand_inputs, read_documents
from trace_dist.data.tokenizer import check_special_ids, train_tokenizer
from trace_dist.vocab import SPECIAL_TOKENS

DOCS_PER_TASK = 64  # documents handed to a worker at once
MAX_VOCAB = 1 << 20  # ids are int32 and the embedding has one row per id; 1M is far above any real BPE


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
            raise DataError(message)

    try:
        parse_segment(args.segment)
    except ValueError as e:
        raise DataError(f"--segment: {e}")
    match = re.fullmatch(r"(\d+)/(\d+)", args.partition)
    need(bool(match) and int(match[1]) < int(match[2]),
         f"--partition must be i/n with 0 <= i < n, got {args.partition!r}")
    need(300 <= args.vocab_size <= MAX_VOCAB,
         f"--vocab-size must be in [300, {MAX_VOCAB}] (256 bytes + specials + merges), got {args.vocab_size}")
    for name in ("valid_fraction", "test_fraction"):
        need(0.0 <= getattr(args, name) < 1.0, f"--{name.replace('_', '-')} must be in [0, 1)")
    need(args.valid_fraction + args.test_fraction < 1.0, "--valid-fraction + --test-fraction must be < 1")
    need(args.shard_samples >= 1, "--shard-samples must be >= 1")
    need(args.workers >= 1, "--workers must be >= 1")
    need(args.max_segments is None or args.max_segments >= 1, "--max-segments must be >= 1")
    need(args.max_segment_tokens is None or args.max_segment_tokens >= 2, "--max-segment-tokens must be >= 2")
    need(args.tokenizer is None or Path(args.tokenizer).is_file(), f"--tokenizer {args.tokenizer}: not a file")
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


def _init_pool_worker(tokenizer_json: str, settings: Settings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (one line, cleanup)
    _init_worker(tokenizer_json, settings)


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
                            "bytes": (self.out / name).stat().st_size,
                            "tokens": int(sum(len(r.ids) for r in self.pending)),
                            "segments": int(sum(len(r.bounds) for r in self.pending))})
        self.pending = []

    def summary(self) -> dict:
        counts = {k: int(v) for k, v in sorted(self.stats.items()) if k not in ("samples", "tokens", "segments")}
        return {"shards": self.shards, "samples": int(self.stats["samples"]), "tokens": int(self.stats["tokens"]),
                "segments": int(self.stats["segments"]), **counts}


# ----------------------------------------------------------------------------- driver


def _owned(name: str) -> bool:
    """A file name `trace-dist prepare` writes."""
    return name == TOKENIZER_FILE or name.startswith("manifest") or (
        name.split("-")[0] in SPLITS and name.endswith((".tar", ".tar.tmp")))


def _partition_tag(partition: tuple) -> str:
    i, n = partition
    return f"p{i:03d}of{n:03d}"


def _comparable(meta: dict) -> dict:
    """What every partition of one dataset must share: settings but the partition, and the tokenizer.

    The --tokenizer path is left out; the tokenizer's hash stands for it (a missing hash: not known yet).
    """
    settings = {k: v for k, v in meta["settings"].items() if k not in ("partition", "tokenizer")}
    return {**json.loads(json.dumps(settings)), "tokenizer_sha256": meta.get("tokenizer_sha256")}


def _mismatch(a: dict, b: dict) -> str:
    """'' if two partition manifests can be parts of one dataset, else what differs between them."""
    a, b = _comparable(a), _comparable(b)
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and None not in (a.get(k), b.get(k))]
    return "; ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in differ)


def _refuse(a: str, b: str, differences: str) -> DataError:
    return DataError(f"partitions {a} and {b} were prepared differently ({differences}); every partition of a "
                     f"dataset needs the same inputs, settings and tokenizer (only --partition and --workers vary)")


def check_partitions(out: Path, mine: dict) -> None:
    """Refuse if a partition manifest already in `out` was made with other settings or another tokenizer.

    `mine` is this partition's manifest (before the tokenizer exists: just its settings).
    """
    i, n = mine["settings"]["partition"]
    others = [f for f in sorted(out.glob(f"manifest-p*of{n:03d}.json")) if f.name != f"manifest-p{i:03d}of{n:03d}.json"]
    for file in others:
        differences = _mismatch(mine, read_manifest(file))
        if differences:
            raise _refuse(f"{i}/{n} (this run)", str(file), differences)


class Output:
    """Where prepare writes: a staging directory, moved into place only once the dataset is complete.

    Without partitions the new dataset is built in `.NAME.prepare-PID` beside DIR, and swapped in
    by renames at the end, so a failure or Ctrl-C at any point leaves an earlier dataset as it
    was. A partition builds its shards in `DIR/.pIIIofNNN.prepare-PID` and moves them into the
    shared DIR at the end. Every check of the output happens here, before any work.
    """

    def __init__(self, out: Path, s: Settings, overwrite: bool):
        self.out, self.s = out, s
        i, n = s.partition
        if out.exists() and not out.is_dir():
            raise DataError(f"--output {out} is a file, not a directory")
        if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
            raise DataError(f"--output {out} is not writable")
        if n == 1:
            existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            foreign = [name for name in existing if not _owned(name)]
            staging_parent = out.parent
        else:
            existing = sorted(p.name for p in out.iterdir() if _owned(p.name) and (
                f"-{_partition_tag(s.partition)}" in p.name or p.name == MANIFEST)) if out.is_dir() else []
            foreign = []
            staging_parent = out
        if existing and not overwrite:
            raise DataError(f"--output {out} is not empty ({', '.join(existing[:3])}...); pass --overwrite to "
                            f"replace")
        if foreign:
            raise DataError(f"--output {out} holds files prepare did not write ({', '.join(foreign[:3])}); "
                            f"--overwrite replaces a dataset, not other files: move them or choose another directory")
        if n > 1 and out.is_dir():  # a mismatch with partitions already written is known now, before any work
            check_partitions(out, {"settings": {**vars(s), "partition": [i, n]}})
        self.old = existing
        name = out.name if n == 1 else _partition_tag(s.partition)
        self.staging = staging_parent / f".{name}.prepare-{os.getpid()}"
        try:
            staging_parent.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir()
        except OSError as e:
            raise DataError(f"--output {out}: cannot write in {staging_parent} ({e.strerror or e})")

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self, manifest: dict) -> Optional[dict]:
        """Put the complete dataset in place; returns the dataset's manifest.json content, if complete."""
        if self.s.partition[1] == 1:
            write_json(self.staging / MANIFEST, manifest)
            if self.old:  # DIR holds an earlier dataset: swap, then delete it
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.staging, self.out)
                shutil.rmtree(old)
            else:  # absent, or an empty directory that the rename replaces
                os.rename(self.staging, self.out)
            return manifest
        return self._commit_partition(manifest)

    def _commit_partition(self, manifest: dict) -> Optional[dict]:
        out, n = self.out, self.s.partition[1]
        check_partitions(out, manifest)  # again, now with the tokenizer's hash
        ours = {sh["name"] for split in SPLITS for sh in manifest["splits"][split]["shards"]}
        (out / MANIFEST).unlink(missing_ok=True)  # the union changes: no manifest.json until it is rebuilt
        for name in self.old:
            if name not in ours:
                (out / name).unlink(missing_ok=True)
        for name in sorted(ours) + [TOKENIZER_FILE]:  # the tokenizer equals the other partitions' (checked)
            os.replace(self.staging / name, out / name)
        write_json(out / f"manifest-{_partition_tag(self.s.partition)}.json", manifest)
        self.discard()
        merged = merge_partitions(out, n)
        if merged:
            write_json(out / MANIFEST, merged)
        return merged


def load_or_train_tokenizer(sources: list[str], s: Settings, problems: Problems):
    if s.tokenizer:
        tokenizer = read_tokenizer(s.tokenizer, f"--tokenizer {s.tokenizer}")
        check_special_ids(tokenizer, f"--tokenizer {s.tokenizer}")
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
    with ctx.Pool(workers, initializer=_init_pool_worker, initargs=(tokenizer_json, s)) as pool:
        while window := list(itertools.islice(tasks, 4 * workers)):
            yield from pool.map(_encode_task, window)


def merge_partitions(out: Path, n: int) -> Optional[dict]:
    """Once all n partition manifests exist, their union becomes manifest.json (refused if they differ)."""
    parts = [out / f"manifest-p{i:03d}of{n:03d}.json" for i in range(n)]
    if not all(p.is_file() for p in parts):
        return None
    manifests = [read_manifest(p) for p in parts]
    for part, m in zip(parts[1:], manifests[1:]):
        differences = _mismatch(manifests[0], m)
        if differences:
            raise _refuse(str(parts[0]), str(part), differences)
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


def warn_empty_splits(manifest: dict, log) -> None:
    """An empty split is legal but rarely meant (a tiny corpus, many skipped lines): say so."""
    documents = sum(manifest["splits"][split]["samples"] for split in SPLITS)
    for split in SPLITS:
        if manifest["splits"][split]["samples"] == 0:
            fraction = manifest["settings"].get(f"{split}_fraction")
            if fraction != 0:
                how = f" (--{split}-fraction {fraction})" if fraction is not None else ""
                log(f"warning: the {split} split is empty{how}: {documents} usable documents were not enough")


def run(s: Settings, out: Path, workers: int, overwrite: bool, log=print) -> dict:
    """Prepare the dataset; DataError for user errors, and `out` stays as it was on any failure."""
    sources = expand_inputs(s.inputs)
    output = Output(out, s, overwrite)
    try:
        return _run(s, sources, output, workers, log)
    finally:
        output.discard()


def _run(s: Settings, sources: list[str], output: Output, workers: int, log) -> dict:
    from tqdm import tqdm

    problems = Problems()
    t0 = time.time()
    tokenizer = load_or_train_tokenizer(sources, s, problems)
    tokenizer_json = tokenizer.to_str()
    log(f"tokenizer: {tokenizer.get_vocab_size()} tokens ({'loaded' if s.tokenizer else 'trained'}, "
        f"{time.time() - t0:.1f}s)")
    if not s.tokenizer:
        problems = Problems()  # the shard pass below meets the same problems again; count them once

    writers = {split: SplitWriter(output.staging, shard_prefix(split, s.partition), s.shard_samples)
               for split in SPLITS}
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
        raise DataError(f"no usable documents in {', '.join(s.inputs)} ({problems.total()} items skipped)")

    i, n = s.partition
    manifest = {
        "format": FORMAT,
        "settings": {**vars(s), "partition": [i, n]},
        "conditional": s.conditional,
        "segment": s.segment,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "input": {"documents": documents, "problems": problems.total()},
        "problems": dict(problems.counts),
        "splits": {split: w.summary() for split, w in writers.items()},
    }
    write_atomic(output.staging / TOKENIZER_FILE, tokenizer_json)
    for split, w in writers.items():
        log(f"{split}: {len(w.shards)} shards, {w.stats['samples']} documents, {w.stats['tokens']} tokens, "
            f"{w.stats['segments']} sentences")
    complete = output.commit(manifest)
    if complete:
        warn_empty_splits(complete, log)
    elif n > 1:
        log(f"partition {i}/{n} done; manifest.json is written when the last partition finishes")
    log(f"wrote {output.out} in {time.time() - t0:.1f}s")
    return manifest


def main(argv: Optional[list[str]] = None) -> int:
    """`trace-dist prepare`; user errors raise DataError (the CLI prints one line and exits 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the message
        return int(e.code or 0)
    try:
        run(validate(args), Path(args.output), args.workers, args.overwrite, log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        print(f"trace-dist prepare: interrupted; {args.output} was left as it was", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from trace_dist.cli import main as cli

    sys.exit(cli(["prepare", *sys.argv[1:]]))
