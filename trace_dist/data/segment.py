"""Segment boundaries as token offsets.

A prepared document stores its token ids and `bounds`, the exclusive end offset of every sentence
(last bound == len(ids)). Sentences come from pysbd on the raw text; their character ends are
mapped to token offsets, so the segments concatenate back to exactly the document's tokens.
Fixed-length segments need no stored boundaries: they are cut at load time (`fixed_bounds`).
"""

from __future__ import annotations

import numpy as np

MAX_SPAN = 10_000  # characters pysbd sees at once: its cost grows faster than linearly with length


class SentenceSplitter:
    """pysbd, rule-based (the Golden Rules set), offline and deterministic."""

    def __init__(self, language: str = "en"):
        import pysbd

        self._segmenter = pysbd.Segmenter(language=language, clean=False)

    def _ends(self, text: str) -> list[int]:
        """pysbd's sentence ends in `text`.

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

    def char_ends(self, text: str, max_span: int = MAX_SPAN) -> list[int]:
        """End offset (exclusive, trailing whitespace excluded) of each sentence in `text`.

        pysbd sees at most max_span characters at a time, so the cost stays linear in the text's
        length (a 120 KB line without punctuation took 12 s in one piece, 1 MB many minutes).
        Every window's last sentence may continue past it, so only the ends before it are kept
        and the next window starts there: the ends are pysbd's own, as for the whole text. A
        window holding no complete sentence is cut at its last whitespace (or at max_span),
        without inventing a sentence end there.
        """
        ends, start = [], 0
        while len(text) - start > max_span:
            window = text[start:start + max_span]
            complete = self._ends(window)[:-1]
            if complete:
                ends += [start + e for e in complete]
                start += complete[-1]
            else:
                cut = max(window.rfind(c) for c in " \n\t")
                start += cut if cut > 0 else max_span
        return ends + [start + e for e in self._ends(text[start:])]


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
