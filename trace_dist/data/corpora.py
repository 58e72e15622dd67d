"""English prose corpora that a package registry ships, read offline.

`austen`: Jane Austen's six completed novels (Sense and Sensibility, Pride and Prejudice,
Mansfield Park, Emma, Northanger Abbey, Persuasion; 1811-1818, public domain, Project Gutenberg
texts) as packaged by Debian's `r-cran-janeaustenr` 1.0.0-1 (MIT, Julia Silge): 4.0 MB of text,
718k words, about 1.2M tokens of our 4k BPE. The package stores each novel as an R character
vector (one element per printed line) in R's lazy-load database `data/Rdata.rdb`; it is read
here by a small reader of R's XDR serialization, so neither R nor any Python package for R data
is needed: `apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb DIR`
is enough (or `apt-get install r-cran-janeaustenr`, which also installs R).

    python -m trace_dist.data.corpora austen OUT.txt [--root DIR]   # one document per line

Documents are runs of consecutive paragraphs of one chapter, 60-160 words each (a paragraph
longer than that is cut at sentence ends), so that every document has several sentences to
segment and fits the study's block size without being truncated.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import Iterator, Optional

from trace_dist.errors import UserError

# The Debian package's data file, pinned: a different file means different documents.
AUSTEN_RDB_SHA256 = "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
AUSTEN_SEARCH = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library")
MIN_WORDS, MAX_WORDS = 60, 160


# ------------------------------------------------------------------------------ R serialization
class _RReader:
    """Just enough of R's XDR serialization (version 2/3) for data objects: character, integer,
    double and logical vectors, lists, pairlists (attributes) and symbols. Reads no code."""

    NIL_LIKE = frozenset({254, 253, 252, 251, 242, 241})  # NILVALUE, GLOBALENV, UNBOUND, MISSINGARG, EMPTYENV, BASEENV

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.b, self.i, self.refs = data, 2, []
        version = self._int()
        self.i += 8  # writer and minimal reader R versions
        if version == 3:
            n = self._int()  # native encoding name
            self.i += n

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def _pairlist(self, flags: int) -> dict:
        out = {}
        while True:
            if flags & (1 << 9):
                self.item()  # a pairlist node's own attributes: unused
            tag = self.item() if flags & (1 << 10) else None
            out[tag if tag is not None else len(out)] = self.item()
            flags = self._int()
            if flags & 0xFF == 254:
                return out
            if flags & 0xFF != 2:
                raise ValueError(f"unexpected pairlist tail of R type {flags & 0xFF}")

    def item(self):
        """The next object: str, list, dict (pairlist), or (value, attributes) when it has attributes."""
        flags = self._int()
        kind, has_attr = flags & 0xFF, flags & (1 << 9)
        if kind in self.NIL_LIKE:
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == 1:  # symbol: its name
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 2:
            return self._pairlist(flags)
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None  # NA_character_
            value = self.b[self.i:self.i + n].decode("utf-8" if flags & (1 << 15) or not flags & (1 << 14)
                                                      else "latin-1")
            self.i += n
            return value
        n = self._int()
        if kind in (10, 13):
            value = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == 14:
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif kind in (16, 19):
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R type {kind} is not supported (data objects only)")
        return (value, self.item()) if has_attr else value


def _lazyload_blob(blob: bytes) -> bytes:
    """One lazy-load record: 4-byte big-endian length + zlib stream (R's default compression)."""
    (n,) = struct.unpack_from(">I", blob, 0)
    out = zlib.decompress(blob[4:])
    if len(out) != n:
        raise ValueError(f"lazy-load record: {len(out)} bytes, header says {n}")
    return out


def read_lazyload_db(data_dir: Path) -> dict[str, object]:
    """An R package's data/Rdata.{rdx,rdb} -> {object name: value}."""
    index, _ = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).item()
    variables = index[0]  # list(variables = named list of (offset, length), references, compressed)
    offsets, meta = variables
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    return {name: _RReader(_lazyload_blob(rdb[o:o + n])).item() for (o, n), name in zip(offsets, meta["names"])}


# ------------------------------------------------------------------------------ Austen
def find_austen(root: Optional[Path] = None) -> Path:
    """The janeaustenr package's data/ directory under `root` (an extracted .deb or an R library)."""
    cands = [root] if root else [Path(p) for p in AUSTEN_SEARCH]
    for base in cands:
        for sub in ("", "janeaustenr", "usr/lib/R/site-library/janeaustenr"):
            d = Path(base) / sub / "data"
            if (d / "Rdata.rdb").exists() and (d / "Rdata.rdx").exists():
                return d
    raise UserError(f"janeaustenr data not found under {', '.join(map(str, cands))}: install it with "
                    f"`apt-get install r-cran-janeaustenr`, or `apt-get download r-cran-janeaustenr && "
                    f"dpkg-deb -x r-cran-janeaustenr_*.deb DIR` and pass DIR")


_HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume|END OF|THE END|FINIS)\b|^[^a-z]*$")
# A sentence end: . ! ? (maybe closing quotes/brackets) then space; titles like "Mr." are excluded below.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_TITLES = ("Mr.", "Mrs.", "Dr.", "St.", "Col.", "Capt.")


def _sentences(paragraph: str) -> list[str]:
    parts, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        if paragraph[:m.start()].endswith(_TITLES):
            continue
        parts.append(paragraph[start:m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    return parts + [tail] if tail else parts


def _paragraphs(lines: list[str]) -> Iterator[Optional[str]]:
    """Unwrapped prose paragraphs; None marks a heading (a chapter break: documents never span one)."""
    block: list[str] = []
    for line in lines + [""]:
        if line.strip():
            block.append(line.strip())
            continue
        if block:
            text = " ".join(" ".join(block).replace("_", "").split())
            yield None if _HEADING.match(text) or len(text.split()) < 3 else text
            block = []


def pack_documents(paragraphs: Iterator[Optional[str]]) -> Iterator[str]:
    """Consecutive paragraphs -> documents of MIN_WORDS..MAX_WORDS words (one chapter each).

    A paragraph over MAX_WORDS is cut at sentence ends; a chapter's last short run is kept if it
    has at least MIN_WORDS / 2 words."""
    pending: list[str] = []
    count = 0

    def flush(minimum: int):
        nonlocal pending, count
        text = " ".join(pending)
        pending, count = [], 0
        return text if len(text.split()) >= minimum else None

    for para in paragraphs:
        if para is None:
            done = flush(MIN_WORDS // 2) if pending else None
            if done:
                yield done
            continue
        for sentence in _sentences(para):
            n = len(sentence.split())
            if pending and count + n > MAX_WORDS:
                done = flush(MIN_WORDS // 2)
                if done:
                    yield done
            pending.append(sentence)
            count += n
        if count >= MIN_WORDS:
            yield flush(0)
    if pending and count >= MIN_WORDS // 2:
        yield flush(0)


def austen_documents(root: Optional[Path] = None) -> Iterator[tuple[str, str]]:
    """(novel:index, text) for the six novels, in a fixed order; verifies the pinned data file."""
    data_dir = find_austen(root)
    digest = hashlib.sha256((data_dir / "Rdata.rdb").read_bytes()).hexdigest()
    if digest != AUSTEN_RDB_SHA256:
        raise UserError(f"{data_dir / 'Rdata.rdb'}: sha256 {digest} is not the pinned r-cran-janeaustenr "
                        f"1.0.0-1 data ({AUSTEN_RDB_SHA256}); the documents would differ")
    novels = read_lazyload_db(data_dir)
    for novel in AUSTEN_NOVELS:
        lines = novels[novel]
        lines = lines[0] if isinstance(lines, tuple) else lines  # a vector with attributes
        for i, text in enumerate(pack_documents(_paragraphs([line or "" for line in lines]))):
            yield f"{novel}:{i}", text


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="write a packaged corpus as one document per line")
    p.add_argument("corpus", choices=["austen"])
    p.add_argument("output", type=Path)
    p.add_argument("--root", type=Path, help="extracted .deb or R library holding janeaustenr")
    args = p.parse_args(argv)
    try:
        docs = [text for _, text in austen_documents(args.root)]
    except UserError as e:
        print(f"corpora: {e}", file=sys.stderr)
        return 2
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text("\n".join(docs) + "\n", encoding="utf-8")
    tmp.replace(args.output)  # complete before it replaces anything
    print(f"{len(docs)} documents, {sum(len(d.split()) for d in docs)} words -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
