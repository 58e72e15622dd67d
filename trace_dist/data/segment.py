"""Segment boundaries as token offsets.

A prepared document stores its token ids and `bounds`, the exclusive end offset of every sentence
(last bound == len(ids)). Sentences come from pysbd on the raw text; their character ends are
mapped to token offsets, so the segments concatenate back to exactly the document's tokens.
Fixed-length segments need no stored boundaries: they are cut at load time (`fixed_bounds`).
"""

from __future__ import annotations

import numpy as np


class SentenceSplitter:
    """pysbd, rule-based (the Golden Rules set), offline and deterministic."""

    def __init__(self, language: str = "en"):
        import pysbd

        self._segmenter = pysbd.Segmenter(language=language, clean=False)

    def char_ends(self, text: str) -> list[int]:
        """End offset (exclusive, trailing whitespace excluded) of each sentence in `text`.

        pysbd returns the sentence strings; they are located in the text left to right rather
        than trusting its char_span mode, which misplaces repeated sentences.
        """
        ends, cursor = [], 0
        for sentence in self._segmenter.segment(text):
            sentence = sentence.strip()
            at = text.find(sentence, cursor) if sentence else -1
            if at >= 0:
                cursor = at + len(sentence)
                ends.append(cursor)
        return ends


def token_bounds(token_starts: np.ndarray, char_ends: list[int], n_tokens: int) -> np.ndarray:
    """Sentence char ends -> token end offsets: a token belongs to the sentence its first char is in.

    token_starts: [n_tokens] char offset where each token starts. A byte-level token such as
    " The" starts at the space after the previous sentence's period, so it opens the next
    sentence, and the whitespace between sentences travels with the sentence it precedes.
    """
    bounds = np.searchsorted(token_starts, np.asarray(char_ends, dtype=np.int64), side="left")
    bounds = np.unique(np.append(bounds, n_tokens))  # sorted, no empty segments
    return bounds[bounds > 0].astype(np.int32)


def split_long(bounds: np.ndarray, max_len: int) -> np.ndarray:
    """Split every segment longer than max_len tokens into max_len-token pieces."""
    starts = np.concatenate([[0], bounds[:-1]])
    pieces = [np.arange(s + max_len, e, max_len) for s, e in zip(starts, bounds) if e - s > max_len]
    return np.union1d(bounds, np.concatenate(pieces)).astype(np.int32) if pieces else bounds


def fixed_bounds(n_tokens: int, length: int) -> np.ndarray:
    """Ends of consecutive `length`-token segments covering n_tokens tokens (the last may be shorter)."""
    return np.append(np.arange(length, n_tokens, length), n_tokens).astype(np.int32)
