"""Prepared records -> the batch dict of docs/INTERFACES.md.

Layout of one example (conditional prompt first):

    tokens : p p p SEP | a a a SEP | b b SEP | c c c c EOS | PAD PAD
    seg_ids: -1 ...-1  |  0 0 0 0  |  1 1 1  |  2 2 2 2 2  |  -1  -1

Every segment ends with `sep` except the last, which ends with `eos`; the separator belongs to
(and is counted in the length of) the segment it closes. Segmentation is chosen here, at load
time: `sentence` uses the stored boundaries, `fixed:N` cuts the ids into N-1 tokens + separator,
so one prepared dataset serves every segmentation (Ray Tune sweeps N without re-preparing).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from trace_dist.data.config import DataConfig, parse_segment
from trace_dist.data.segment import fixed_bounds
from trace_dist.data.shards import Record
from trace_dist.vocab import Vocab


@dataclass
class Example:
    tokens: np.ndarray  # int64 [T]
    seg_ids: np.ndarray  # int64 [T], -1 on the prompt
    num_segments: int
    num_bytes: int  # UTF-8 bytes of the document's stored text (the target only, for conditional data)
    num_words: int  # its whitespace-separated words
    source: int = 0  # index of its prepared set in data.sources() (a mixture's)


CUT_KINDS = ("segments", "tokens", "prompt_tokens")  # what the length limits drop: a batch's `cut_*` counts


class Layout:
    """Applies data.segment and the length limits; counts what the limits cut."""

    def __init__(self, cfg: DataConfig, vocab: Vocab, conditional: bool, source: int = 0):
        self.kind, self.length = parse_segment(cfg.segment)
        self.cfg, self.vocab, self.conditional, self.source = cfg, vocab, conditional, source
        self.cut = Counter()  # CUT_KINDS dropped by the limits since the last take_cut()

    def take_cut(self) -> Counter:
        """What the limits cut since the previous call (the next batch reports it)."""
        cut, self.cut = self.cut, Counter()
        return cut

    def segments(self, record: Record) -> list[np.ndarray]:
        """The record's token ids split into segments (content only, no separators)."""
        if self.kind == "fixed":
            bounds = fixed_bounds(len(record.ids), self.length - 1)  # the separator is one of the N
        else:
            bounds = record.bounds
        return np.split(record.ids, bounds[:-1])

    def example(self, record: Record) -> Example:
        cfg, vocab = self.cfg, self.vocab
        parts, seg_ids = [], []
        budget = cfg.max_tokens
        if self.conditional:
            # The prompt may use at most half the budget; the rest is for the text.
            prompt = record.prompt[: max(budget // 2 - 1, 0)]
            self.cut["prompt_tokens"] += len(record.prompt) - len(prompt)
            parts.append(np.append(prompt, vocab.sep))
            seg_ids.append(np.full(len(prompt) + 1, -1))
            budget -= len(prompt) + 1
        segments = self.segments(record)
        starts = np.cumsum([0] + [len(s) for s in segments[:-1]])  # each segment's first token in record.ids
        spans = []  # (start, end) in record.ids of the tokens kept
        kept = segments[: cfg.max_segments]
        self.cut["segments"] += len(segments) - len(kept)
        self.cut["tokens"] += sum(len(s) for s in segments[len(kept):])
        for k, seg in enumerate(kept):
            room = min(cfg.max_segment_tokens, budget) - 1  # content tokens that fit with the closer
            if room < 1:
                self.cut["segments"] += len(kept) - k
                self.cut["tokens"] += sum(len(s) for s in kept[k:])
                kept = kept[:k]
                break
            self.cut["tokens"] += max(len(seg) - room, 0)
            parts.append(np.append(seg[:room], vocab.sep))
            seg_ids.append(np.full(min(len(seg), room) + 1, k))
            spans.append((starts[k], starts[k] + min(len(seg), room)))
            budget -= min(len(seg), room) + 1
        parts[-1][-1] = vocab.eos  # the last segment closes with eos (records are never empty)
        num_bytes, num_words = self.normalisers(record, spans)
        return Example(np.concatenate(parts).astype(np.int64), np.concatenate(seg_ids).astype(np.int64), len(kept),
                       num_bytes, num_words, self.source)

    def normalisers(self, record: Record, spans: list[tuple[int, int]]) -> tuple[int, int]:
        """(UTF-8 bytes, whitespace words) of the part of the stored text that the kept token spans cover.

        They come from the text, not the tokens, so they do not depend on data.segment. A document
        the limits cut counts only the text the model scores: the byte-level BPE maps every token to
        a fixed byte string whose concatenation is the text (tokenizer.py), so token byte lengths
        place the spans in the text's bytes; adjacent spans merge first, so a word that a segment
        boundary splits counts once. Uncut documents (the usual case) skip all that.
        """
        data = record.text.encode("utf-8")
        if sum(e - s for s, e in spans) == len(record.ids):
            return len(data), len(record.text.split())
        # [n + 1] byte offsets from the text's start (a text that `prepare` cut inside a multi-byte
        # character keeps the whole character, past the last token: the offsets still hold)
        offsets = np.concatenate([[0], np.cumsum(self.token_bytes()[record.ids])])
        runs: list[list[int]] = []
        for s, e in spans:
            if runs and runs[-1][1] == s:
                runs[-1][1] = e
            else:
                runs.append([s, e])
        pieces = [data[offsets[s]:offsets[e]] for s, e in runs]
        # a cut inside a multi-byte character leaves a partial character: neither a word nor a space
        return sum(len(p) for p in pieces), sum(len(p.decode("utf-8", errors="ignore").split()) for p in pieces)

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab size]: UTF-8 bytes of each token of the data's tokenizer (0 for special tokens)."""
        return token_byte_lengths(self.cfg.sources()[self.source].path)


@functools.lru_cache(maxsize=4)
def token_byte_lengths(path: str) -> np.ndarray:
    """int64 [vocab size]: bytes of each token of the byte-level BPE tokenizer of the prepared set at `path`
    (verified against its manifest); loaded once per process, when a limit first cuts a document."""
    from tokenizers import pre_tokenizers

    from trace_dist.data.integrity import DataError, data_tokenizer
    from trace_dist.vocab import SPECIAL_TOKENS

    tokenizer = data_tokenizer(path)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # one character per byte
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if token in SPECIAL_TOKENS:
            continue
        if not set(token) <= alphabet:
            raise DataError(f"{path}: the tokenizer is not byte-level BPE (token {token!r}), so the bytes of a "
                            "cut document cannot be counted")
        lengths[i] = len(token)
    return lengths


def collate(examples: list[Example | None], vocab: Vocab, bad_samples: int,
            cut: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest example; `None` is a padding example (example_mask False). `bad_samples`
    and `cut` (by CUT_KINDS) are counts since the previous batch of the stream."""
    cut = cut or {}
    B = len(examples)
    T = max([len(e.tokens) for e in examples if e is not None] or [1])
    tokens = torch.full((B, T), vocab.pad, dtype=torch.int64)
    seg_ids = torch.full((B, T), -1, dtype=torch.int64)
    num_segments = torch.zeros(B, dtype=torch.int64)
    num_bytes = torch.zeros(B, dtype=torch.int64)
    num_words = torch.zeros(B, dtype=torch.int64)
    source = torch.full((B,), -1, dtype=torch.int64)
    prompt_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        if e is None:
            continue
        n = len(e.tokens)
        tokens[b, :n] = torch.from_numpy(e.tokens)
        seg_ids[b, :n] = torch.from_numpy(e.seg_ids)
        prompt_mask[b, :n] = torch.from_numpy(e.seg_ids < 0)
        num_segments[b] = e.num_segments
        num_bytes[b], num_words[b], source[b] = e.num_bytes, e.num_words, e.source
    return {
        "tokens": tokens,  # [B, T]
        "seg_ids": seg_ids,  # [B, T]
        "loss_mask": seg_ids >= 0,  # [B, T]
        "prompt_mask": prompt_mask,  # [B, T]
        "num_segments": num_segments,  # [B]
        "num_bytes": num_bytes,  # [B] UTF-8 bytes of each document's text (target only), 0 for padding
        "num_words": num_words,  # [B] its whitespace word count, 0 for padding
        "source": source,  # [B] index of its prepared set in data.sources(), -1 for padding
        "example_mask": torch.tensor([e is not None for e in examples], dtype=torch.bool),  # [B]
        "bad_samples": torch.tensor(bad_samples, dtype=torch.int64),  # []
        # every batch carries every kind, so that all ranks all-reduce the same names
        **{f"cut_{k}": torch.tensor(cut.get(k, 0), dtype=torch.int64) for k in CUT_KINDS},  # [] each
    }


def tokens_by_source(batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """{"data/tokens/NAME": predicted tokens (loss_mask) of the batch's examples from each source},
    float64 [] each, ready for `all_reduce_named`; `names` is `[s.name for s in data_cfg.sources()]`."""
    per_example = batch["loss_mask"].sum(1)  # [B]
    return {f"data/tokens/{name}": per_example[batch["source"] == i].sum().double() for i, name in enumerate(names)}
