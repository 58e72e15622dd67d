"""Input corpora -> a stream of `Document`s, with every unusable line counted and located.

Supported inputs (each may be gzip-compressed, `.gz` suffix):
- `*.txt`: one document per line;
- `*.jsonl`: one JSON object per line, `text` (or `prompt` + `target` when conditional);
- `X.wp_source` + `X.wp_target` (WritingPrompts): line i of both files is one example,
  `<newline>` stands for a line break;
- directories (searched recursively for the above) and glob patterns;
- `builtin:pydoc`: the prose of CPython's documentation topics (offline, always present);
- `hf:NAME[:SPLIT]`: a Hugging Face dataset's `text` column, only if `datasets` is installed.

Reading is streaming (one line at a time) so corpora larger than memory work, and a second
pass over the same inputs yields the same documents in the same order (prepare reads twice:
once to train the tokenizer, once to write shards).
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from trace_dist.data.integrity import DataError

SUFFIXES = (".txt", ".jsonl", ".wp_source", ".wp_target")
MAX_REPORTED = 20  # problem messages kept verbatim; the rest are only counted
SNIFF_BYTES = 8192  # a NUL byte in a file's first 8 KiB makes it binary (git's and grep's rule)
MAX_CONTROL_FRACTION = 0.1  # lines with more control characters than this are binary data, not text
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls and DEL, except tab, newline and CR


@dataclass(frozen=True)
class Document:
    text: str
    prompt: Optional[str]  # conditional inputs only
    where: str  # "file:line", for messages


@dataclass
class Problems:
    """Skipped input, counted by reason; the first few messages name file and line."""

    counts: Counter = field(default_factory=Counter)
    messages: list = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.messages) < MAX_REPORTED:
            self.messages.append(f"{where}: {reason}")

    def total(self) -> int:
        return sum(self.counts.values())


def _strip_gz(path: Path) -> str:
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def _kind(path: Path) -> Optional[str]:
    name = _strip_gz(path)
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def expand_inputs(specs: list[str]) -> list[str]:
    """Input arguments -> sorted concrete sources (files and builtin:/hf: names)."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith(("builtin:", "hf:")):
            if spec.startswith("builtin:") and spec != "builtin:pydoc":
                raise DataError(f"unknown builtin corpus {spec!r} (known: builtin:pydoc)")
            out.append(spec)
            continue
        if any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"--input {spec}: the pattern matches no file")
            candidates = [Path(m) for m in matches]
        else:
            candidates = [Path(spec)]
        for path in candidates:
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
                if not found:
                    raise DataError(f"--input {path}: directory holds no {'/'.join(SUFFIXES)} file")
                out += [str(p) for p in found]
            elif path.is_file():
                if not _kind(path):
                    raise DataError(f"--input {path}: unsupported file type (use {', '.join(SUFFIXES)}, "
                                     f"optionally .gz)")
                out.append(str(path))
            else:
                raise DataError(f"--input {path}: no such file or directory")
    # A WritingPrompts pair is one source: keep the .wp_source, require its .wp_target.
    sources = []
    for s in dict.fromkeys(out):
        if s.endswith((".wp_target", ".wp_target.gz")):
            partner = s.replace(".wp_target", ".wp_source")
            if not Path(partner).is_file():
                raise DataError(f"--input {s}: WritingPrompts target without its {partner}")
            continue
        if s.endswith((".wp_source", ".wp_source.gz")):
            partner = s.replace(".wp_source", ".wp_target")
            if not Path(partner).is_file():
                raise DataError(f"--input {s}: WritingPrompts source without its {partner}")
        sources.append(s)
    return sources


def _text_problem(line: str) -> Optional[str]:
    """Why a decoded line is binary data rather than text, or None."""
    if "\x00" in line:
        return "binary data (NUL byte)"
    if len(_CONTROL.findall(line)) > MAX_CONTROL_FRACTION * len(line):
        return "binary data (control characters)"
    return None


def _lines(path: str, problems: Problems) -> Iterator[tuple[int, Optional[str]]]:
    """(line number, decoded line without newline) or (n, None) for a line that is not UTF-8 text.

    A file whose first SNIFF_BYTES hold a NUL byte is binary and skipped whole (one problem);
    a UTF-8 byte order mark at the start of the file is not part of the text.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            if b"\x00" in f.peek(SNIFF_BYTES)[:SNIFF_BYTES]:
                problems.add("binary file, not text (NUL byte in the first 8 KiB)", path)
                return
            n = 0
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    problems.add("not UTF-8", f"{path}:{n}")
                    yield n, None
                    continue
                reason = _text_problem(line)
                if reason:
                    problems.add(reason, f"{path}:{n}")
                yield n, None if reason else line
            if n == 0:
                problems.add("empty file", path)
    except (OSError, EOFError) as e:  # unreadable or a corrupt gzip stream
        problems.add(f"unreadable ({e})", path)


def _nonblank_lines(path: str, problems: Problems) -> Iterator[tuple[str, str]]:
    """("file:line", text) of the decodable, non-blank lines; blank ones are counted."""
    for n, line in _lines(path, problems):
        if line is not None and not line.strip():
            problems.add("blank line", f"{path}:{n}")
        elif line is not None:
            yield f"{path}:{n}", line


def _read_txt(path: str, conditional: bool, problems: Problems) -> Iterator[Document]:
    for where, line in _nonblank_lines(path, problems):
        if conditional:
            problems.add("no prompt (.txt input with --conditional)", where)
        else:
            yield Document(line.strip(), None, where)


def _read_jsonl(path: str, conditional: bool, problems: Problems) -> Iterator[Document]:
    for where, line in _nonblank_lines(path, problems):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.add(f"invalid JSON ({e.msg})", where)
            continue
        if not isinstance(obj, dict):
            problems.add("not a JSON object", where)
            continue
        yield from _read_row(obj, conditional, where, problems)


def _read_writing_prompts(source: str, conditional: bool, problems: Problems) -> Iterator[Document]:
    target = source.replace(".wp_source", ".wp_target")
    unpaired = (None, None)
    for (n, prompt), (m, story) in itertools.zip_longest(_lines(source, problems), _lines(target, problems),
                                                         fillvalue=unpaired):
        if m is None:  # the files must pair up line by line
            problems.add("line has no partner in the .wp_target file", f"{source}:{n}")
            continue
        if n is None:
            problems.add("line has no partner in the .wp_source file", f"{target}:{m}")
            continue
        where = f"{target}:{n}"
        if prompt is None or story is None:
            continue
        story = story.replace("<newline>", "\n").strip()
        prompt = prompt.replace("<newline>", "\n").strip()
        if not story or (conditional and not prompt):
            problems.add("blank line", where)
            continue
        yield Document(story, prompt if conditional else None, where)


_HEADING = re.compile(r"^[*=\-^~]{3,}$")
_SENTENCE_END = re.compile(r"[.!?][\"')]?(\s|$)")


def _is_prose(lines: list[str]) -> bool:
    """A documentation paragraph that reads as sentences, not code, grammar or a heading."""
    text = " ".join(line.strip() for line in lines)
    if any(_HEADING.match(line.strip()) for line in lines) or "::=" in text or ">>>" in text:
        return False
    words = text.split()
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return len(words) >= 8 and letters / len(text) > 0.8 and text.rstrip().endswith((".", "?", "!", ":"))


def pydoc_documents() -> Iterator[tuple[str, str]]:
    """(topic:paragraph, text): prose paragraphs of pydoc topics, whitespace collapsed.

    Paragraphs with a single sentence are joined to the next prose paragraph of the same topic,
    so that every document has several sentences to segment (the point of the corpus).
    """
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        pending: list[str] = []
        for i, block in enumerate(re.split(r"\n\s*\n", topics[topic])):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or not _is_prose(lines):
                continue
            pending.append(" ".join(" ".join(lines).split()))
            text = " ".join(pending)
            if len(_SENTENCE_END.findall(text)) >= 2:
                yield f"{topic}:{i}", text
                pending = []


def _read_pydoc(conditional: bool, problems: Problems) -> Iterator[Document]:
    if conditional:
        raise DataError("builtin:pydoc has no prompts; drop --conditional")
    for where, text in pydoc_documents():
        yield Document(text, None, f"builtin:pydoc:{where}")


def _read_hf(spec: str, conditional: bool, problems: Problems) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"--input {spec}: needs the `datasets` package (pip install trace-dist[datasets])")
    name, _, split = spec[len("hf:"):].partition(":")
    for n, row in enumerate(datasets.load_dataset(name, split=split or "train", streaming=True), 1):
        yield from _read_row(row, conditional, f"{spec}:{n}", problems)


def _read_row(row: dict, conditional: bool, where: str, problems: Problems) -> Iterator[Document]:
    """One JSON object (a .jsonl line or a dataset row) -> zero or one document."""
    keys = ("prompt", "target") if conditional else ("text",)
    for key in keys:
        value = row.get(key)
        if not isinstance(value, str):
            problems.add(f"missing field {key!r}" if value is None else
                         f"field {key!r} is {type(value).__name__}, not a string", where)
            return
        reason = "empty" if not value.strip() else _text_problem(value)
        if reason:
            problems.add(f"field {key!r}: {reason}", where)
            return
    yield Document(row[keys[-1]].strip(), row["prompt"].strip() if conditional else None, where)


def read_documents(sources: list[str], conditional: bool, problems: Problems) -> Iterator[Document]:
    """All documents of the expanded sources, in order; problems are recorded, not raised."""
    for source in sources:
        if source == "builtin:pydoc":
            yield from _read_pydoc(conditional, problems)
        elif source.startswith("hf:"):
            yield from _read_hf(source, conditional, problems)
        else:
            kind = _kind(Path(source))
            if kind == ".txt":
                yield from _read_txt(source, conditional, problems)
            elif kind == ".jsonl":
                yield from _read_jsonl(source, conditional, problems)
            else:
                yield from _read_writing_prompts(source, conditional, problems)
