"""Byte-level BPE: trained on the train split by `prepare`, saved as DIR/tokenizer.json.

Byte-level, with no normalizer and no prefix space, so `decode(encode(text)) == text` for any
UTF-8 text, and token offsets index the original characters (the sentence boundaries rely on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trace_dist.vocab import SPECIAL_TOKENS, Vocab

TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # first, so they get ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def check_special_ids(tokenizer: Tokenizer, origin: str) -> Vocab:
    """The Vocab of a tokenizer whose special tokens have the agreed ids 0..3."""
    vocab = Vocab.from_tokenizer(tokenizer)
    wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if tokenizer.token_to_id(t) != i]
    if wrong:
        raise ValueError(f"{origin}: special tokens {wrong} do not have ids "
                         f"{[SPECIAL_TOKENS.index(t) for t in wrong]} (expected {SPECIAL_TOKENS} = 0..3)")
    return vocab


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, Vocab]:
    """From a prepared data directory (or a tokenizer.json file itself)."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {file} (run `trace-dist prepare` first)")
    tokenizer = Tokenizer.from_file(str(file))
    return tokenizer, check_special_ids(tokenizer, str(file))
