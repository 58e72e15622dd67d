"""One sample <-> the files of a WebDataset tar shard; deterministic shard writing.

A sample `KEY` is stored as `KEY.ids.npy` (int32 token ids, no special tokens), `KEY.bounds.npy`
(int32 sentence end offsets into ids), `KEY.json` (metadata), `KEY.txt` (the text) and, for
conditional data, `KEY.prompt.npy` + `KEY.prompt.txt`. KEY is the sample's index in its shard
(`000042`), which lets the eval stream place every sample without trusting the tar order.

Decoding never unpickles: arrays go through `np.load(allow_pickle=False)`, metadata through json.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np


@dataclass
class Record:
    """A prepared document, as the loaders see it."""

    ids: np.ndarray  # int32 [n]
    bounds: np.ndarray  # int32 [k], strictly increasing, last == n
    prompt: Optional[np.ndarray] = None  # int32 [m], conditional only
    text: str = ""
    prompt_text: Optional[str] = None
    meta: Optional[dict] = None


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def _array(data: bytes, name: str) -> np.ndarray:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.int32 or array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D int32 array, got {array.dtype} {array.shape}")
    return array


def encode(record: Record) -> dict[str, bytes]:
    files = {
        "ids.npy": _npy(record.ids),
        "bounds.npy": _npy(record.bounds),
        "json": json.dumps(record.meta or {}, sort_keys=True).encode(),
        "txt": record.text.encode(),
    }
    if record.prompt is not None:
        files["prompt.npy"] = _npy(record.prompt)
        files["prompt.txt"] = (record.prompt_text or "").encode()
    return files


def decode(sample: dict, vocab_size: int, conditional: bool) -> Record:
    """A grouped WebDataset sample -> Record; ValueError (naming the file) if anything is off."""
    key = sample.get("__key__", "?")
    needed = ("ids.npy", "bounds.npy", "txt") + (("prompt.npy",) if conditional else ())
    missing = [k for k in needed if k not in sample]
    if missing:
        raise ValueError(f"sample {key}: missing {missing}")
    ids = _array(sample["ids.npy"], f"{key}.ids.npy")
    bounds = _array(sample["bounds.npy"], f"{key}.bounds.npy")
    prompt = _array(sample["prompt.npy"], f"{key}.prompt.npy") if conditional else None
    for name, arr in (("ids", ids), ("prompt", prompt)):
        if arr is not None and arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"sample {key}: {name} outside the vocabulary [0, {vocab_size})")
    if not ids.size or not bounds.size or bounds[-1] != ids.size or np.any(np.diff(bounds) <= 0) or bounds[0] <= 0:
        raise ValueError(f"sample {key}: bounds are not increasing offsets ending at len(ids)={ids.size}")
    text = sample["txt"].decode("utf-8")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return Record(ids, bounds, prompt, text, sample.get("prompt.txt", b"").decode("utf-8") or None, meta)


def write_shard(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> str:
    """Write (key, files) samples to a tar at `path` (via a temp name); returns its sha256.

    Every header field that could vary between runs (mtime, owner, mode) is fixed, so the same
    samples always give byte-identical shards.
    """
    tmp = f"{path}.tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    digest = sha256(tmp)
    os.replace(tmp, path)
    return digest


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
