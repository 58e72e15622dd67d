"""The special-token ids every component agrees on (read from the prepared tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass

BOS, EOS, PAD, SEP = "<|bos|>", "<|eos|>", "<|pad|>", "<|sep|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SEP]  # ids 0..3 in a tokenizer trained by `trace-dist prepare`


@dataclass(frozen=True)
class Vocab:
    size: int
    bos: int
    eos: int
    pad: int
    sep: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Vocab":
        """From a `tokenizers.Tokenizer` that contains the four special tokens."""
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        return cls(size=tokenizer.get_vocab_size(), bos=ids[BOS], eos=ids[EOS], pad=ids[PAD], sep=ids[SEP])
