"""What a prepared data directory promises, checked whenever it is read.

`trace-dist prepare` records a sha256 of every shard and of the tokenizer in DIR/manifest.json;
this module is where those records are verified:
- `manifest(DIR)` is the one reader of manifest.json: invalid JSON, missing keys, wrong types,
  shard names that leave DIR or counts that do not add up end in one `DataError` naming the file;
- `read_shard(url, size, sha256)` reads a shard's bytes once (never more than the recorded size),
  hashing them as they arrive, and only then hands them on: nothing is decoded from unverified bytes;
- DIR may be a local directory, an http(s) base URL or a `pipe:` template (see fetch.py); the
  manifest and tokenizer of a remote DIR are read once per process and kept in memory;
- `tokenizer_sha256` hashes a tokenizer's canonical JSON, so a copy re-serialized elsewhere
  (a checkpoint, an export) still matches; `check_same_tokenizer` refuses a checkpoint or model
  whose tokenizer is not the one the data was tokenized with;
- `check_data(DIR)` is the cheap preflight for a training run (manifest, tokenizer, non-empty splits);
  `check_mixture(DIRS)` refuses a mixture whose sources were tokenized differently, and
  `check_sources(data_cfg)` does both for every source of a config.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trace_dist.data import fetch
from trace_dist.errors import UserError

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "trace-dist-shards/1"
SPLITS = ("train", "valid", "test")
SHA256 = r"^[0-9a-f]{64}$"
MAX_SHARD_BYTES = 1 << 32  # bound for shards of manifests that predate the recorded `bytes`
MAX_FILE_BYTES = 1 << 28  # bound for a remote manifest.json or tokenizer.json


class DataError(UserError):
    """A problem with a prepared dataset or a prepare input; the message names the file."""


# ----------------------------------------------------------------------------- manifest.json


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Shard(_Record):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.tar$")  # a plain file name inside DIR
    samples: int = Field(ge=1)
    tokens: int = Field(ge=0)
    segments: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256)
    bytes: Optional[int] = Field(None, ge=512)  # absent in manifests written before it was recorded


class _Split(_Record):
    shards: list[_Shard]
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    segments: int = Field(ge=0)


class _Splits(_Record):
    train: _Split
    valid: _Split
    test: _Split


class _Manifest(_Record):
    format: Literal[FORMAT]
    settings: dict
    conditional: bool
    segment: str = Field(pattern=r"^(sentence|fixed:[1-9][0-9]*)$")
    vocab_size: int = Field(ge=5)
    tokenizer_sha256: str = Field(pattern=SHA256)
    input: dict
    problems: dict
    splits: _Splits


def read_manifest(file: Path) -> dict:
    """A manifest file (manifest.json or a partition's), validated; DataError naming the file otherwise."""
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror or e})")
    return parse_manifest(raw, str(file))


def parse_manifest(raw: bytes, file: str) -> dict:
    """The bytes of a manifest, validated; DataError naming `file` otherwise."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e}); prepare the data again")
    try:
        _Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise DataError(f"{file}: invalid manifest: {where}: {first['msg']}{more}; prepare the data again")
    for split in SPLITS:
        shards = data["splits"][split]["shards"]
        if sum(s["samples"] for s in shards) != data["splits"][split]["samples"]:
            raise DataError(f"{file}: invalid manifest: splits.{split}: the shards' samples do not add up "
                            f"to samples={data['splits'][split]['samples']}")
    names = [s["name"] for split in SPLITS for s in data["splits"][split]["shards"]]
    if len(set(names)) != len(names):
        raise DataError(f"{file}: invalid manifest: a shard is listed twice")
    return data


def manifest(path: str | Path) -> dict:
    """DIR/manifest.json of a prepared data directory (or remote location), validated (see `read_manifest`)."""
    if fetch.is_remote(path):
        return parse_manifest(remote_file(str(path), MANIFEST), fetch.locate(path, MANIFEST))
    file = Path(path) / MANIFEST
    if not file.is_file():
        parts = sorted(p.name for p in Path(path).glob("manifest-p*.json"))
        hint = f" (only partition manifests {parts}: not all partitions finished)" if parts else \
            " (run `trace-dist prepare` first)"
        raise DataError(f"no {file}{hint}")
    return read_manifest(file)


# ----------------------------------------------------------------------------- shards


@functools.lru_cache(maxsize=16)
def remote_file(base: str, name: str) -> bytes:
    """A small file (manifest.json, tokenizer.json) of a remote dataset, read once per process."""
    try:
        data, _ = fetch.read(fetch.locate(base, name), MAX_FILE_BYTES)
    except OSError as e:
        raise DataError(f"cannot read {e}")
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{fetch.locate(base, name)}: longer than {MAX_FILE_BYTES} bytes")
    return data


def read_shard(url: str, size: Optional[int], sha256: str, timeout: float = fetch.TIMEOUT,
               retries: int = fetch.RETRIES, backoff: float = fetch.BACKOFF) -> bytes:
    """The verified bytes of one shard; ValueError (with the reason) if they are not what was recorded.

    The shard is read once (a path, an http(s) URL or a `pipe:` command: see fetch.py), at most
    `size` + 1 bytes, so a wrong or endless stream costs no more than the shard itself; it is
    hashed as it arrives. An unreachable shard (after the retries) is a ValueError too.
    """
    limit = MAX_SHARD_BYTES if size is None else size
    try:
        data, digest = fetch.read(url, limit, timeout, retries, backoff)
    except OSError as e:
        raise ValueError(f"unreachable: {e}")
    if len(data) > limit:
        raise ValueError(f"longer than {limit} bytes" + ("" if size is None else ", the size the manifest records"))
    if size is not None and len(data) != size:
        raise ValueError(f"{len(data)} bytes, the manifest records {size}")
    if digest != sha256:
        raise ValueError(f"sha256 mismatch: {digest[:12]}..., the manifest says {sha256[:12]}...")
    return data


# ----------------------------------------------------------------------------- tokenizer identity


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of a `tokenizers.Tokenizer`'s canonical JSON (`to_str()`): equal for equal tokenizers,
    however the file was formatted (prepare writes `to_str()`, `Tokenizer.save` pretty-prints)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def read_tokenizer(source: Union[str, Path, bytes], what: Optional[str] = None):
    """A tokenizer.json (path, or its bytes) -> `tokenizers.Tokenizer`; DataError naming it if unusable."""
    from tokenizers import Tokenizer

    what = what or str(source)
    try:
        text = source.decode("utf-8") if isinstance(source, bytes) else Path(source).read_bytes().decode("utf-8")
        return Tokenizer.from_str(text)
    except OSError as e:
        raise DataError(f"{what}: cannot read the tokenizer ({e.strerror or e})")
    except Exception as e:  # tokenizers raises a bare Exception for anything it cannot parse
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{what}: not a tokenizers JSON file ({reason})")


def verify_tokenizer(data_dir: str | Path, tokenizer, meta: Optional[dict] = None) -> None:
    """DIR/tokenizer.json (already loaded) must be the tokenizer the manifest recorded."""
    meta = meta if meta is not None else manifest(data_dir)
    digest = tokenizer_sha256(tokenizer)
    if digest != meta["tokenizer_sha256"]:
        raise DataError(f"{fetch.locate(data_dir, TOKENIZER_FILE)} (sha256 {digest[:12]}...) is not the tokenizer "
                        f"the shards were made with ({fetch.locate(data_dir, MANIFEST)} says "
                        f"{meta['tokenizer_sha256'][:12]}...)")


def data_tokenizer(data_dir: str | Path, meta: Optional[dict] = None):
    """DIR's tokenizer.json (local or remote), verified against its manifest -> `tokenizers.Tokenizer`."""
    if fetch.is_remote(data_dir):
        tokenizer = read_tokenizer(remote_file(str(data_dir), TOKENIZER_FILE), fetch.locate(data_dir, TOKENIZER_FILE))
    else:
        tokenizer = read_tokenizer(Path(data_dir) / TOKENIZER_FILE)
    verify_tokenizer(data_dir, tokenizer, meta)
    return tokenizer


def check_same_tokenizer(data_dir: str | Path, tokenizer, what: str = "the model") -> None:
    """Refuse to use `data_dir` with a model whose tokenizer differs from the data's; DataError naming both.

    `tokenizer`: a tokenizer.json path, its bytes, or a loaded `tokenizers.Tokenizer`. `what` names
    the other side in the message, e.g. "checkpoint runs/x/checkpoints/step00000100".
    """
    meta = manifest(data_dir)
    if not hasattr(tokenizer, "to_str"):
        tokenizer = read_tokenizer(tokenizer, f"{what}: tokenizer")
    theirs = tokenizer_sha256(tokenizer)
    if theirs != meta["tokenizer_sha256"]:
        raise DataError(f"{what} was trained with another tokenizer (sha256 {theirs[:12]}...) than the data in "
                        f"{data_dir} (sha256 {meta['tokenizer_sha256'][:12]}...); use the data it was trained on")


def check_data(data_dir: str | Path, splits: tuple = ("train", "valid")) -> dict:
    """Preflight for a run: the manifest is valid, the tokenizer is the recorded one, `splits` are not empty.

    Reads manifest.json and tokenizer.json only (no shard), so it is cheap enough for the launcher.
    Returns the manifest.
    """
    meta = manifest(data_dir)
    data_tokenizer(data_dir, meta)
    for split in splits:
        if not meta["splits"][split]["samples"]:
            fraction = meta["settings"].get(f"{split}_fraction")
            hint = f" (prepared with --{split}-fraction {fraction})" if fraction is not None else ""
            raise DataError(f"{data_dir}: the {split} split is empty{hint}; prepare it again with more "
                            f"documents or a larger fraction")
    return meta


def check_mixture(paths: list[str]) -> None:
    """Every source of a mixture must have been tokenized with the same tokenizer; DataError naming two that differ."""
    first = manifest(paths[0])["tokenizer_sha256"]
    for path in paths[1:]:
        theirs = manifest(path)["tokenizer_sha256"]
        if theirs != first:
            raise DataError(f"data.mixture: {path} was tokenized with another tokenizer (sha256 {theirs[:12]}...) "
                            f"than {paths[0]} ({first[:12]}...); prepare them with the same --tokenizer")


def check_sources(data_cfg, splits: tuple = ("train", "valid")) -> None:
    """`check_data` for every source of a DataConfig (data.path, or each of data.mixture), then `check_mixture`."""
    paths = [s.path for s in data_cfg.sources()]
    for path in paths:
        check_data(path, splits)
    check_mixture(paths)
