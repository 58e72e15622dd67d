"""`trace-dist prepare` on real files: round trip, determinism, pairing, partitions, bad input."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_corpus

from trace_dist.data.config import DataConfig
from trace_dist.cli import main as cli
from trace_dist.data.segment import SentenceSplitter
from trace_dist.data import manifest
from trace_dist.data.stream import ShardReader
from trace_dist.data.tokenizer import load_tokenizer


def records(data: Path, split: str, conditional: bool = False):
    """Every readable record of a split, in shard order."""
    _, vocab = load_tokenizer(data)
    reader = ShardReader(DataConfig(path=str(data)), str(data), vocab, conditional, split)
    for url in reader.urls:
        shard, bad = reader.read(url)
        assert bad == 0
        yield from (shard[i] for i in sorted(shard))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n".join(tiny_corpus(120, seed=3)) + "\n")
    return path


def run(*args) -> int:
    """`trace-dist prepare ARGS`: its exit status (user errors print one line and give 2)."""
    return cli(["prepare", *map(str, args)])


def test_round_trip_text_ids_and_sentence_bounds(tiny_data):
    tokenizer, vocab = load_tokenizer(tiny_data)
    splitter = SentenceSplitter()
    seen = 0
    for split in ("train", "valid", "test"):
        for r in records(tiny_data, split):
            assert tokenizer.decode(r.ids.tolist()) == r.text  # no text lost or altered
            starts = np.concatenate([[0], r.bounds[:-1]])
            sentences = [tokenizer.decode(r.ids[a:b].tolist()).strip() for a, b in zip(starts, r.bounds)]
            assert sentences == [s.strip() for s in splitter._segmenter.segment(r.text)]
            seen += 1
    m = manifest(tiny_data)
    assert seen == sum(m["splits"][s]["samples"] for s in m["splits"]) == 400
    assert m["splits"]["train"]["segments"] > 2 * m["splits"]["train"]["samples"]  # multi-sentence docs
    assert vocab.pad == 0 and vocab.bos == 1 and vocab.eos == 2 and vocab.sep == 3


def test_prepare_is_byte_identical_across_runs_and_worker_counts(corpus, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, workers in zip(outs, (1, 2)):
        assert run("--input", corpus, "--output", out, "--vocab-size", 400, "--shard-samples", 16,
                   "--workers", workers) == 0
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and len([f for f in files if f.endswith(".tar")]) > 4
    for name in files:
        if name != "manifest.json":
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    m0, m1 = (manifest(o) for o in outs)
    assert m0["splits"] == m1["splits"]  # same shard hashes and counts


def test_conditional_jsonl_and_writing_prompts_stay_paired(tmp_path):
    pairs = [(f"Prompt number {i} asks for a story.", f"Story {i} begins. It ends with the number {i}.")
             for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in pairs[:20]))
    with gzip.open(tmp_path / "b.wp_source.gz", "wt") as f:
        f.write("".join(p + "\n" for p, _ in pairs[20:]))
    with gzip.open(tmp_path / "b.wp_target.gz", "wt") as f:
        f.write("".join(t.replace(". ", ".<newline>") + "\n" for _, t in pairs[20:]))
    out = tmp_path / "out"
    assert run("--input", tmp_path / "a.jsonl", tmp_path / "b.wp_source.gz", "--output", out,
               "--conditional", "--vocab-size", 300, "--valid-fraction", 0, "--test-fraction", 0) == 0
    tokenizer, _ = load_tokenizer(out)
    got = {}
    for r in records(out, "train", conditional=True):
        assert tokenizer.decode(r.prompt.tolist()) == r.prompt_text
        got[r.prompt_text] = tokenizer.decode(r.ids.tolist()).replace("\n", " ")
    assert got == dict(pairs)
    assert manifest(out)["conditional"] is True


def test_bad_input_is_counted_located_and_fatal_only_when_nothing_remains(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_bytes(b'{"text": "One sentence here. Another one there."}\n'
                     b"\n"
                     b'{"title": "no text field"}\n'
                     b"{not json\n"
                     b'{"text": "caf\xff broken bytes."}\n'
                     b'{"text": "A last good document. It has two sentences."}\n')
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    assert run("--input", good, tmp_path / "empty.txt", "--output", out, "--vocab-size", 300,
               "--valid-fraction", 0, "--test-fraction", 0) == 0
    err = capsys.readouterr().err
    assert f"{good}:2: blank line" in err
    assert f"{good}:3: missing field 'text'" in err
    assert f"{good}:4: invalid JSON" in err
    assert f"{good}:5: not UTF-8" in err
    assert f"{tmp_path / 'empty.txt'}: empty file" in err
    m = manifest(out)
    assert m["splits"]["train"]["samples"] == 2 and m["input"]["problems"] == 5

    # Nothing usable left -> exit 2 with a message; user errors -> exit 2 before any work.
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert run("--input", tmp_path / "blank.txt", "--output", tmp_path / "o2") == 2
    assert "no usable documents" in capsys.readouterr().err
    assert run("--input", tmp_path / "missing.txt", "--output", tmp_path / "o3") == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    assert run("--input", good, "--output", out) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert run("--input", good, "--output", tmp_path / "o4", "--segment", "fixed:0") == 2
    assert "--segment" in capsys.readouterr().err
    assert run("--input", tmp_path / "x.csv", "--output", tmp_path / "o5") == 2
    (tmp_path / "half.wp_source").write_text("a prompt without its story file\n")
    assert run("--input", tmp_path / "half.wp_source", "--output", tmp_path / "o6") == 2
    assert "without its" in capsys.readouterr().err


def test_partitions_are_disjoint_and_merge_into_the_whole(corpus, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["--input", corpus, "--vocab-size", 400, "--shard-samples", 16]
    assert run(*common, "--output", whole) == 0
    for i in range(2):
        assert run(*common, "--output", parts, "--partition", f"{i}/2") == 0
        assert (parts / "manifest.json").exists() == (i == 1)  # merged once every partition is done
    m_whole, m_parts = manifest(whole), manifest(parts)
    assert any("-p001of002-" in s["name"] for s in m_parts["splits"]["train"]["shards"])
    for split in ("train", "valid", "test"):
        for key in ("samples", "tokens", "segments"):
            assert m_parts["splits"][split][key] == m_whole["splits"][split][key]
        ids = [r.meta["id"] for r in records(parts, split)]
        assert len(ids) == len(set(ids))
        assert sorted(ids) == sorted(r.meta["id"] for r in records(whole, split))
    assert (parts / "tokenizer.json").read_bytes() == (whole / "tokenizer.json").read_bytes()


def test_prepare_time_limits_cut_and_split_sentences(corpus, tmp_path):
    out = tmp_path / "out"
    assert run("--input", corpus, "--output", out, "--vocab-size", 300, "--max-segments", 2,
               "--max-segment-tokens", 6) == 0
    tokenizer, _ = load_tokenizer(out)
    stats = manifest(out)["splits"]["train"]
    assert stats["cut_segments"] > 0 and stats["cut_tokens"] > 0 and stats["split_segments"] > 0
    for r in records(out, "train"):
        assert len(r.bounds) <= 2 and np.diff(np.concatenate([[0], r.bounds])).max() <= 5
        assert tokenizer.decode(r.ids.tolist()) == r.text  # the stored text is cut with the ids


def test_builtin_pydoc_is_prose(tmp_path):
    out = tmp_path / "pydoc"
    assert run("--input", "builtin:pydoc", "--output", out, "--vocab-size", 1024) == 0
    m = manifest(out)
    assert m["splits"]["train"]["samples"] > 500
    assert m["splits"]["train"]["segments"] > 2 * m["splits"]["train"]["samples"]
    texts = [r.text for r in records(out, "valid")]
    assert texts and not any(">>>" in t or "::=" in t or "\n" in t for t in texts)
