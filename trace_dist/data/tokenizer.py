"""Byte-level BPE: trained on the train split by `prepare`, saved as DIR/tokenizer.json.

Byte-level, with no normalizer and no prefix space, so `decode(encode(text)) == text` for any
UTF-8 text, and token offsets index the original characters (the sentence boundaries rely on it).
"""

from __future__ import annotations

import atexit
import functools
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trace_dist.data.fetch import is_remote, locate
from trace_dist.data.integrity import TOKENIZER_FILE, DataError, data_tokenizer, read_tokenizer, verify_tokenizer
from trace_dist.vocab import SPECIAL_TOKENS, Vocab

MAX_WORD = 256  # longest run of non-space characters BPE training sees in one piece
_LONG_WORD = re.compile(r"\S{%d,}" % (MAX_WORD + 1))


def bounded_words(texts: Iterable[str]) -> Iterator[str]:
    """The texts, with runs of more than MAX_WORD non-space characters cut into MAX_WORD pieces.

    BPE training is quadratic in the length of a word (a 100k-character run takes 20 s, 1 MB
    hours); texts without such runs pass unchanged, so normal corpora train the same tokenizer.
    """
    for text in texts:
        pos = 0
        for run in _LONG_WORD.finditer(text):
            yield text[pos:run.start()]
            yield from (run[0][i:i + MAX_WORD] for i in range(0, len(run[0]), MAX_WORD))
            pos = run.end()
        yield text[pos:]


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
    tokenizer.train_from_iterator(bounded_words(texts), trainer=trainer)
    return tokenizer


def check_special_ids(tokenizer: Tokenizer, origin: str) -> Vocab:
    """The Vocab of a tokenizer whose special tokens have the agreed ids 0..3."""
    wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if tokenizer.token_to_id(t) != i]
    if wrong:
        raise DataError(f"{origin}: special tokens {wrong} do not have ids "
                        f"{[SPECIAL_TOKENS.index(t) for t in wrong]} (expected {SPECIAL_TOKENS} = 0..3)")
    return Vocab.from_tokenizer(tokenizer)


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, Vocab]:
    """From a prepared data directory or remote location (verified against its manifest), or a tokenizer.json."""
    if is_remote(path):
        tokenizer = data_tokenizer(path)
        return tokenizer, check_special_ids(tokenizer, locate(path, TOKENIZER_FILE))
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no tokenizer at {file} (run `trace-dist prepare` first)")
    tokenizer = read_tokenizer(file)
    if path.is_dir():
        verify_tokenizer(path, tokenizer)
    return tokenizer, check_special_ids(tokenizer, str(file))


def tokenizer_file(path: str | Path) -> Path:
    """A local tokenizer.json of the dataset at `path` (to copy into checkpoints): the file itself, or,
    for a remote dataset, a verified copy in a temporary directory removed when the process exits."""
    if not is_remote(path):
        return Path(path) / TOKENIZER_FILE
    return _remote_copy(str(path))


@functools.lru_cache(maxsize=4)
def _remote_copy(path: str) -> Path:
    tokenizer = data_tokenizer(path)
    folder = Path(tempfile.mkdtemp(prefix="trace-dist-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / TOKENIZER_FILE).write_text(tokenizer.to_str())  # to_str(): the form tokenizer_sha256 hashes
    return folder / TOKENIZER_FILE
