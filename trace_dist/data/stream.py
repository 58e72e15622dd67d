"""Streaming prepared shards into batches: an endless training stream and exact evaluation passes.

Shards are read from a local directory, an http(s) base URL or a `pipe:` command (fetch.py).

Training (`train_loader`): the stream of rank r is a sequence of chunks, each `chunk_batches`
micro-batches long. Chunk c is built only from (seed, r, c): a generator seeded with them picks
the source of every slot of the chunk (in proportion to the `data.mixture` weights; one source
without a mixture), then for each source `wds.ResampledShards` seeded with (seed, r, c, source)
draws shards (with replacement) until their samples fill that source's slots, and a shuffle with
the same seed assigns samples to slots. The chunk is cut into batches. Batch i is therefore a pure
function of (seed, r, i), whatever the number of DataLoader workers (worker w builds chunks w, w+k, ...; the DataLoader returns them in order), and
resuming at micro-step N rebuilds chunk N // chunk_batches and skips into it. No node splitting:
every rank draws its own shards, so ranks never run out at different times.

Evaluation (`eval_loader`, one source; `eval_loaders`, each source of a mixture): the manifest
gives each shard's sample count, so the split is a numbered list of samples; rank r takes a contiguous 1/world_size of it, DataLoader worker w a
contiguous part of that, and each worker reads only the shards overlapping its range. Every sample
is seen exactly once, shards need not outnumber ranks x workers, and each rank knows every rank's
batch count up front, so it pads with empty batches (example_mask False) to the common maximum.

Corruption: every shard is read whole, hashed as it streams and checked against the manifest's
sha256 before it is decoded, so a shard that differs in any byte (bit flips, truncation, another
dataset's shard) is bad as a whole. A shard that cannot be read (after fetch.py's retries) or fails
that check, or a sample that fails to decode, loses its samples; they are counted (manifest count -
readable samples), logged once per shard (and worker) by the process that iterates the loader (a
RunLog also shows the line in TensorBoard as `data/bad_shards`), and reported in the next batch's
`bad_samples`. Once more than `max_bad_fraction` of the samples seen (after `bad_check_min_samples`)
were bad, the stream stops with an error naming the shards.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trace_dist.data.batch import Layout, collate
from trace_dist.data.config import DataConfig
from trace_dist.data.fetch import locate
from trace_dist.data.integrity import SPLITS, DataError, check_mixture, manifest, read_shard
from trace_dist.data.shards import Record, decode
from trace_dist.vocab import Vocab

log = logging.getLogger("trace_dist.data")


@dataclass(frozen=True)
class BadShard:
    """A shard found bad while reading. The datasets yield it like a batch, so that the training
    process logs it (`_loaded`), with the shard in `extra`: a DataLoader worker's own log lines reach
    stderr but no handler of the trainer's (the RunLog shows them in TensorBoard)."""
    url: str
    bad: int  # its unreadable samples
    error: str  # the first error


class ShardReader:
    """Reads whole, verified shards of one prepared set into records, counting bad samples and
    enforcing max_bad_fraction."""

    def __init__(self, cfg: DataConfig, path: str, vocab: Vocab, conditional: bool, split: str):
        meta = manifest(path)
        if conditional and not meta["conditional"]:
            raise DataError(f"{path} was prepared without --conditional; it has no prompts")
        if meta["vocab_size"] != vocab.size:
            raise DataError(f"{path}: prepared with a {meta['vocab_size']}-token vocabulary, "
                            f"the model's has {vocab.size}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        shards = meta["splits"][split]["shards"]
        if not shards:
            raise DataError(f"{path}: the {split} split has no samples")
        self.urls = [locate(path, s["name"]) for s in shards]
        self.counts = [s["samples"] for s in shards]
        self.shards = dict(zip(self.urls, shards))
        self.cfg, self.vocab, self.conditional = cfg, vocab, conditional
        self.good = self.bad = 0
        self.bad_shards: dict[str, str] = {}  # url -> first error
        self.found: list[BadShard] = []  # bad shards not yet yielded (take_found)

    def read(self, url: str) -> tuple[dict[int, Record], int]:
        """{index in shard: record} of the readable samples, and how many were bad.

        The shard's bytes are verified against the manifest's sha256 before anything is decoded:
        a shard that differs in any byte is bad as a whole.
        """
        shard = self.shards[url]
        expected = shard["samples"]
        errors: list[Exception] = []

        def keep_going(exn: Exception) -> bool:
            errors.append(exn)
            return True

        records: dict[int, Record] = {}
        try:
            data = read_shard(url, shard.get("bytes"), shard["sha256"], self.cfg.timeout, self.cfg.retries,
                              self.cfg.retry_backoff)
        except ValueError as exn:
            errors.append(exn)
            data = None
        if data is not None:
            files = wds.tariterators.tar_file_expander(iter([{"url": url, "stream": io.BytesIO(data)}]),
                                                       handler=keep_going)
            for sample in wds.tariterators.group_by_keys(files, handler=keep_going):
                try:
                    index = int(sample["__key__"])
                    records[index] = decode(sample, self.vocab.size, self.conditional)
                except (ValueError, KeyError, UnicodeDecodeError) as exn:
                    errors.append(exn)
                    continue
        records = {i: r for i, r in records.items() if 0 <= i < expected}
        bad = expected - len(records)
        self._account(url, len(records), bad, errors)
        return records, bad

    def draw(self, need: int, seed: int) -> tuple[list[Record], int]:
        """Records of shards drawn with replacement (seeded) until there are `need`, and the bad count.

        At least two shards are pooled when there are two, so that samples of different shards mix.
        """
        draws = iter(wds.ResampledShards(self.urls, seed=seed, worker_seed=_same_for_every_worker,
                                         deterministic=True))
        pool: list[Record] = []
        bad = ndraws = 0
        while len(pool) < need or ndraws < min(2, len(self.urls)):
            url = next(draws)["url"]
            ndraws += 1
            records, n_bad = self.read(url)
            pool += [records[i] for i in sorted(records)]
            bad += n_bad
            if not pool and ndraws >= 10 * len(self.urls):
                raise DataError(f"data: no readable training sample in {ndraws} shard draws: {self.bad_shards}")
        return pool, bad

    def take_found(self) -> list[BadShard]:
        """The bad shards found since the previous call."""
        found, self.found = self.found, []
        return found

    def _account(self, url: str, good: int, bad: int, errors: list[Exception]) -> None:
        self.good += good
        self.bad += bad
        if bad and url not in self.bad_shards:
            self.bad_shards[url] = str(errors[0]) if errors else "samples missing"
            self.found.append(BadShard(url, bad, self.bad_shards[url]))
        seen = self.good + self.bad
        if seen >= self.cfg.bad_check_min_samples and self.bad > self.cfg.max_bad_fraction * seen:
            raise DataError(
                f"data: {self.bad} of {seen} samples were unreadable (> max_bad_fraction="
                f"{self.cfg.max_bad_fraction}); bad shards: " +
                "; ".join(f"{u} ({e})" for u, e in self.bad_shards.items()))


def _loaded(dataset: IterableDataset, num_workers: int) -> Iterator:
    """The items of a DataLoader over `dataset`; a DataError is raised here, as itself, and a
    BadShard is logged here (`extra={"bad_shard": url}`), in this process.

    Raised inside a DataLoader worker, it would arrive re-wrapped around the worker's traceback
    text; so the datasets yield it as an item instead, and it keeps its one-line message.
    """
    for item in DataLoader(dataset, batch_size=None, num_workers=num_workers):
        if isinstance(item, DataError):
            raise item
        if isinstance(item, BadShard):
            log.warning("data: skipped %d bad samples of %s: %s", item.bad, item.url, item.error,
                        extra={"bad_shard": item.url})
            continue
        yield item


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _same_for_every_worker() -> int:
    return 0  # chunk seeds already say which rank and chunk; workers must not change them


class TrainChunks(IterableDataset):
    """Chunks (lists of `chunk_batches` batches) of one rank's endless training stream."""

    def __init__(self, cfg: DataConfig, vocab: Vocab, micro_batch_size: int, rank: int, seed: int,
                 start_step: int, conditional: bool):
        sources = cfg.sources()
        check_mixture([s.path for s in sources])
        self.readers = [ShardReader(cfg, s.path, vocab, conditional, "train") for s in sources]
        self.layouts = [Layout(cfg, vocab, conditional, i) for i in range(len(sources))]
        weights = np.array([s.weight for s in sources])
        self.weights = weights / weights.sum()  # [S]
        self.vocab, self.micro_batch_size, self.rank, self.seed = vocab, micro_batch_size, rank, seed
        self.start_step = start_step
        # A chunk mixes at least shuffle_buffer samples and two shards' worth, so that the shards
        # drawn for it are used up (reading a shard costs more than batching its samples).
        shard_samples = max(sum(r.counts) / len(r.counts) for r in self.readers)
        self.chunk_batches = max(1, math.ceil(max(cfg.shuffle_buffer, 2 * shard_samples) / micro_batch_size))

    def chunk_seed(self, chunk: int, *more: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.rank, chunk, *more]).generate_state(1)[0])

    def chunk(self, chunk: int) -> list[dict[str, torch.Tensor]]:
        need = self.chunk_batches * self.micro_batch_size
        picks = np.random.default_rng(self.chunk_seed(chunk)).choice(len(self.readers), size=need, p=self.weights)
        examples: list = [None] * need
        bad = 0
        for s, (reader, layout) in enumerate(zip(self.readers, self.layouts)):
            slots = np.flatnonzero(picks == s)  # [n_s] the chunk's slots this source fills
            if not len(slots):
                continue
            seed = self.chunk_seed(chunk, s)
            pool, n_bad = reader.draw(len(slots), seed)
            bad += n_bad
            for slot, i in zip(slots, np.random.default_rng(seed).permutation(len(pool))):
                examples[slot] = layout.example(pool[i])
        cut = sum((layout.take_cut() for layout in self.layouts), Counter())
        mbs = self.micro_batch_size
        first = collate(examples[:mbs], self.vocab, bad, cut)  # the chunk's counts go with its first batch
        return [first] + [collate(examples[j * mbs:(j + 1) * mbs], self.vocab, 0) for j in range(1, self.chunk_batches)]

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        worker, num_workers = _worker()
        first = self.start_step // self.chunk_batches
        try:
            for chunk in itertools.count(first + worker, num_workers):
                batches = self.chunk(chunk)
                for reader in self.readers:
                    yield from reader.take_found()
                yield batches[self.start_step - first * self.chunk_batches:] if chunk == first else batches
        except DataError as e:
            yield e  # see _loaded


class TrainLoader:
    """Endless iterable of micro-batches (see the module docstring for its determinism)."""

    def __init__(self, chunks: TrainChunks, num_workers: int):
        self.chunks, self.num_workers = chunks, num_workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batches in _loaded(self.chunks, self.num_workers):
            yield from batches


def train_loader(data_cfg: DataConfig, vocab: Vocab, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, start_step: int = 0, conditional: bool = False) -> TrainLoader:
    """Micro-batch i of rank r is a pure function of (seed, r, i); world_size only validates rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    chunks = TrainChunks(data_cfg, vocab, micro_batch_size, rank, seed, start_step, conditional)
    return TrainLoader(chunks, data_cfg.num_workers)


def _share(lo: int, hi: int, part: int, parts: int) -> tuple[int, int]:
    """The part-th of `parts` contiguous, near-equal pieces of [lo, hi)."""
    n = hi - lo
    return lo + n * part // parts, lo + n * (part + 1) // parts


class EvalBatches(IterableDataset):
    """One rank's share of a split of one source, in batches of exactly batch_size slots (None = padding)."""

    def __init__(self, cfg: DataConfig, vocab: Vocab, split: str, batch_size: int, rank: int, world_size: int,
                 conditional: bool, source: int):
        self.reader = ShardReader(cfg, cfg.sources()[source].path, vocab, conditional, split)
        self.layout = Layout(cfg, vocab, conditional, source)
        self.vocab, self.batch_size = vocab, batch_size
        self.offsets = np.concatenate([[0], np.cumsum(self.reader.counts)])  # [n_shards + 1]
        self.world_size, self.num_workers = world_size, max(cfg.num_workers, 1)
        self.range = _share(0, int(self.offsets[-1]), rank, world_size)

    def num_batches(self, rank: int) -> int:
        rank_range = _share(0, int(self.offsets[-1]), rank, self.world_size)
        return sum(math.ceil((hi - lo) / self.batch_size)
                   for lo, hi in (_share(*rank_range, w, self.num_workers) for w in range(self.num_workers)))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            yield from self._batches()
        except DataError as e:
            yield e  # see _loaded

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, num_workers = _worker()
        lo, hi = _share(*self.range, worker, num_workers)
        slots, bad = [], 0
        for s, url in enumerate(self.reader.urls):
            start, end = max(lo, int(self.offsets[s])), min(hi, int(self.offsets[s + 1]))
            if start >= end:
                continue
            records, _ = self.reader.read(url)
            yield from self.reader.take_found()
            for index in range(start - int(self.offsets[s]), end - int(self.offsets[s])):
                record = records.get(index)
                bad += record is None
                slots.append(record and self.layout.example(record))
                if len(slots) == self.batch_size:
                    yield collate(slots, self.vocab, bad, self.layout.take_cut())
                    slots, bad = [], 0
        if slots:
            yield collate(slots + [None] * (self.batch_size - len(slots)), self.vocab, bad, self.layout.take_cut())


class EvalLoader:
    """Finite; every rank yields `len(loader)` batches, the same number on every rank."""

    def __init__(self, batches: EvalBatches, num_workers: int):
        self.batches, self.num_workers = batches, num_workers
        self.length = max(batches.num_batches(r) for r in range(batches.world_size))

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        count = 0
        for batch in _loaded(self.batches, self.num_workers):
            count += 1
            yield batch
        for _ in range(self.length - count):
            yield collate([None] * self.batches.batch_size, self.batches.vocab, 0)


def eval_loader(data_cfg: DataConfig, vocab: Vocab, split: str, batch_size: int, rank: int, world_size: int,
                conditional: bool = False, source: int = 0) -> EvalLoader:
    """A split of data.sources()[source] (data.path, the first source of a mixture, by default), exactly once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    batches = EvalBatches(data_cfg, vocab, split, batch_size, rank, world_size, conditional, source)
    return EvalLoader(batches, data_cfg.num_workers)


def eval_loaders(data_cfg: DataConfig, vocab: Vocab, split: str, batch_size: int, rank: int, world_size: int,
                 conditional: bool = False) -> Iterator[tuple[str, EvalLoader]]:
    """(name, eval_loader) of each source of data.sources(), in order: a mixture is evaluated per source.
    Each loader is built when its turn comes, so only one source's workers run at a time."""
    sources = data_cfg.sources()
    check_mixture([s.path for s in sources])
    for i, source in enumerate(sources):
        yield source.name, eval_loader(data_cfg, vocab, split, batch_size, rank, world_size, conditional, i)
