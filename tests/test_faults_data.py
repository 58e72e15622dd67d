"""Data-side faults of issue 11 (docs/STATUS.md fault matrix rows P*, T1-T6, R4, E6), on real files.

Each test reproduces a case: a user error ends in one line naming the culprit and exit status 2,
nothing already prepared is lost, and nothing is trained on bytes that differ from what was recorded.
"""

import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_corpus
from test_data_prepare import records

from trace_dist.cli import main as cli
from trace_dist.data import DataError, check_data, check_same_tokenizer, eval_loader, load_tokenizer, manifest
from trace_dist.data import train_loader
from trace_dist.data.config import DataConfig
from trace_dist.data.segment import MAX_SPAN, SentenceSplitter
from trace_dist.data.tokenizer import MAX_WORD, bounded_words, train_tokenizer

REPO = Path(__file__).resolve().parent.parent


def prepare(*args) -> int:
    return cli(["prepare", *map(str, args)])


def one_line_error(capsys, *needles) -> str:
    """The single stderr line of a refused command, checked to name every needle."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("trace-dist prepare: ") and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".prepare-" in p.name or ".old-" in p.name)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(tiny_corpus(80, seed=5)) + "\n")
    return path


def copy_of(data: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(data, dst)
    return dst


def cfg_for(data, **overrides) -> DataConfig:
    base = dict(path=str(data), max_segments=64, max_segment_tokens=512, max_tokens=4096, num_workers=0,
                shuffle_buffer=32)
    return DataConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- shards: sha256 (T3-T6)


def flip_byte(shard: Path) -> None:
    """Flip one bit in the middle of the first ids.npy payload: the tar still parses, the ids are wrong."""
    data = bytearray(shard.read_bytes())
    at = data.index(b"\x93NUMPY") + 200  # inside the first array's data
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))


def test_bit_flipped_shard_is_skipped_named_and_counted(tiny_data, tmp_path, caplog):
    data = copy_of(tiny_data, tmp_path)
    _, vocab = load_tokenizer(data)
    flip_byte(data / "valid-000000.tar")
    n_valid = manifest(data)["splits"]["valid"]["samples"]
    batches = list(eval_loader(cfg_for(data, max_bad_fraction=1.0), vocab, "valid", 8, 0, 1))
    assert sum(int(b["bad_samples"]) for b in batches) == n_valid  # the whole shard, not one sample
    assert not any(b["example_mask"].any() for b in batches)  # nothing decoded from unverified bytes
    assert "valid-000000.tar" in caplog.text and "sha256 mismatch" in caplog.text

    # Every train shard flipped (T4): the stream stops, naming the shards, instead of training; the
    # error raised in a DataLoader worker arrives as itself, one line.
    for shard in data.glob("train-*.tar"):
        flip_byte(shard)
    for num_workers in (0, 1):
        with pytest.raises(DataError, match=r"samples were unreadable.*train-00000\d\.tar \(sha256 mismatch") as e:
            next(iter(train_loader(cfg_for(data, num_workers=num_workers), vocab, 4, 0, 1, seed=0)))
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_foreign_and_truncated_shards_are_bad(tiny_data, tmp_path, corpus, caplog):
    """T3/T5/T6: a shard from another dataset under the right name, a truncated one, a garbage one."""
    assert prepare("--input", corpus, "--output", tmp_path / "other", "--vocab-size", 300,
                   "--valid-fraction", 0.2) == 0
    data = copy_of(tiny_data, tmp_path)
    _, vocab = load_tokenizer(data)
    shutil.copyfile(tmp_path / "other" / "valid-000000.tar", data / "valid-000000.tar")
    shard = data / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    (data / "train-000002.tar").write_bytes(os.urandom(4096))
    bad = list(eval_loader(cfg_for(data, max_bad_fraction=1.0), vocab, "valid", 64, 0, 1))
    assert sum(int(b["bad_samples"]) for b in bad) == manifest(data)["splits"]["valid"]["samples"]
    reader = train_loader(cfg_for(data, max_bad_fraction=1.0), vocab, 4, 0, 1, seed=0).chunks.readers[0]
    for name in ("train-000001.tar", "train-000002.tar"):
        records, n_bad = reader.read(str(data / name))
        assert not records and n_bad == manifest(data)["splits"]["train"]["shards"][int(name[-5])]["samples"]
    assert "bytes, the manifest records" in caplog.text


# ----------------------------------------------------------------------------- manifest.json (T1, T2)


@pytest.mark.parametrize("damage, needle", [
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "splits"}), "splits: Field required"),
    (lambda m: json.dumps({**m, "vocab_size": "512"}), "vocab_size"),
    (lambda m: json.dumps(dict(m, splits=dict(m["splits"], valid=dict(
        m["splits"]["valid"], shards=[dict(m["splits"]["valid"]["shards"][0], name="../../etc/x.tar")])))),
     "splits.valid.shards.0.name"),
    (lambda m: json.dumps(dict(m, splits=dict(m["splits"], test=dict(m["splits"]["test"], samples=1)))),
     "do not add up"),
])
def test_invalid_manifest_is_one_line_naming_the_file(tiny_data, tmp_path, damage, needle):
    data = copy_of(tiny_data, tmp_path)
    file = data / "manifest.json"
    file.write_text(damage(json.loads(file.read_text())))
    for read in (manifest, check_data, lambda d: eval_loader(cfg_for(d), load_tokenizer(tiny_data)[1], "valid",
                                                            4, 0, 1)):
        with pytest.raises(DataError) as e:
            read(data)
        assert str(file) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_missing_manifest_names_the_directory(tmp_path):
    with pytest.raises(DataError, match="run `trace-dist prepare` first"):
        manifest(tmp_path)


# ----------------------------------------------------------------------------- tokenizer identity (T3, R4, E6)


def other_tokenizer(data: Path):
    """A tokenizer of the same size as data's, with two merged-token ids swapped."""
    from tokenizers import Tokenizer

    spec = json.loads(load_tokenizer(data)[0].to_str())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return Tokenizer.from_str(json.dumps(spec))


def test_tokenizer_mismatch_is_refused_naming_both_sides(tiny_data, tmp_path):
    tokenizer, _ = load_tokenizer(tiny_data)
    pretty = tmp_path / "saved.json"
    tokenizer.save(str(pretty))  # re-serialized (a checkpoint or an export): still the same tokenizer
    assert pretty.read_bytes() != (tiny_data / "tokenizer.json").read_bytes()
    check_same_tokenizer(tiny_data, pretty, what="export X")
    check_same_tokenizer(tiny_data, (tiny_data / "tokenizer.json").read_bytes(), what="checkpoint Y")
    check_same_tokenizer(tiny_data, tokenizer, what="a loaded model")

    other = other_tokenizer(tiny_data)
    assert other.get_vocab_size() == tokenizer.get_vocab_size()
    for theirs in (other, other.to_str().encode()):
        with pytest.raises(DataError, match=f"checkpoint runs/x/step7 .*{tiny_data}"):
            check_same_tokenizer(tiny_data, theirs, what="checkpoint runs/x/step7")
    with pytest.raises(DataError, match="not a tokenizers JSON file"):
        check_same_tokenizer(tiny_data, b"\x7fELF\x00\x01", what="checkpoint Z")

    # The data directory's own tokenizer.json replaced by another of the same size (T3).
    data = copy_of(tiny_data, tmp_path)
    (data / "tokenizer.json").write_text(other.to_str())
    for load in (load_tokenizer, check_data):
        with pytest.raises(DataError, match=r"tokenizer\.json .* is not the tokenizer the shards were made with"):
            load(data)


def test_check_data_refuses_an_empty_valid_split(corpus, tmp_path, capsys):
    out = tmp_path / "novalid"
    assert prepare("--input", corpus, "--output", out, "--vocab-size", 300, "--valid-fraction", 0) == 0
    assert manifest(out)["splits"]["valid"]["samples"] == 0
    with pytest.raises(DataError, match=f"{out}: the valid split is empty"):
        check_data(out)
    assert check_data(out, splits=("train",))["splits"]["train"]["samples"] > 0


# ----------------------------------------------------------------------------- prepare: output (P9-P13, P19)


def test_failed_overwrite_leaves_the_old_dataset_intact(corpus, tmp_path, capsys):
    out = tmp_path / "data"
    assert prepare("--input", corpus, "--output", out, "--vocab-size", 300) == 0
    before = snapshot(out)
    (tmp_path / "blank.txt").write_text("\n \n")
    assert prepare("--input", tmp_path / "blank.txt", "--output", out, "--overwrite") == 2  # P13
    assert "no usable documents" in capsys.readouterr().err
    assert snapshot(out) == before and leftovers(tmp_path) == []

    # A successful --overwrite replaces the whole dataset (no shard of the old one survives).
    small = tmp_path / "small.txt"
    small.write_text("\n".join(tiny_corpus(10, seed=9)) + "\n")
    assert prepare("--input", small, "--output", out, "--vocab-size", 300, "--overwrite") == 0
    assert manifest(out)["input"]["documents"] == 10 and leftovers(tmp_path) == []
    assert sorted(snapshot(out)) == sorted(["manifest.json", "tokenizer.json"] + [
        s["name"] for split in manifest(out)["splits"].values() for s in split["shards"]])

    # Files prepare did not write are never deleted by --overwrite.
    (out / "notes.md").write_text("mine")
    capsys.readouterr()
    assert prepare("--input", corpus, "--output", out, "--overwrite") == 2
    one_line_error(capsys, out, "notes.md")
    assert (out / "notes.md").read_text() == "mine"


def test_unusable_output_fails_before_the_tokenizer_pass(corpus, tmp_path, capsys, monkeypatch):
    import trace_dist.data.prepare as prep

    def no_work(*args, **kwargs):
        raise AssertionError("the tokenizer pass started")

    monkeypatch.setattr(prep, "train_tokenizer", no_work)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, needle in ((a_file, "is a file"), (a_file / "sub", "cannot write"),
                        (Path("/proc/trace-dist-data"), "cannot write")):
        assert prepare("--input", corpus, "--output", out) == 2
        one_line_error(capsys, out, needle)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert prepare("--input", corpus, "--output", ro / "data") == 2
        one_line_error(capsys, "cannot write")


@pytest.mark.slow
def test_interrupt_is_one_line_and_leaves_the_old_dataset(tmp_path):
    """P19: Ctrl-C mid-prepare: one line, exit 130, the earlier dataset untouched, no staging left."""
    out = tmp_path / "data"
    small = tmp_path / "small.txt"
    small.write_text("\n".join(tiny_corpus(20, seed=2)) + "\n")
    assert prepare("--input", small, "--output", out, "--vocab-size", 300) == 0
    before = snapshot(out)
    big = tmp_path / "big.txt"
    big.write_text("\n".join(tiny_corpus(20000, seed=4)) + "\n")  # tens of seconds of work
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "trace_dist.cli", "prepare", "--input", str(big), "--output",
                             str(out), "--overwrite", "--vocab-size", "300"], env=env, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not leftovers(tmp_path) and time.time() < deadline:  # the staging directory: work has begun
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == \
        f"trace-dist prepare: interrupted; {out} was left as it was"
    assert snapshot(out) == before and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- prepare: partitions (P20)


def test_partitions_prepared_differently_are_refused(corpus, tmp_path, capsys):
    out = tmp_path / "parts"
    common = ["--input", corpus, "--output", out, "--vocab-size", 300]
    assert prepare(*common, "--partition", "0/2", "--seed", 0) == 0
    capsys.readouterr()
    assert prepare(*common, "--partition", "1/2", "--seed", 1) == 2  # refused before any work
    one_line_error(capsys, "1/2", "manifest-p000of002.json", "seed 1 vs 0")
    assert not (out / "manifest.json").exists() and not list(out.glob("*p001of002*"))

    # Same settings, another tokenizer (--tokenizer paths are not compared; the tokenizer's hash is).
    tokenizers = []
    for k, seed in enumerate((3, 4)):
        path = tmp_path / f"tok{k}.json"
        texts = tiny_corpus(50, seed=seed)
        path.write_text(train_tokenizer(texts if k == 0 else [t.upper() for t in texts], 300).to_str())
        tokenizers.append(path)
    out2 = tmp_path / "parts2"
    assert prepare("--input", corpus, "--output", out2, "--tokenizer", tokenizers[0], "--partition", "0/2") == 0
    capsys.readouterr()
    assert prepare("--input", corpus, "--output", out2, "--tokenizer", tokenizers[1], "--partition", "1/2") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "tokenizer_sha256" in err and "manifest-p000of002.json" in err
    assert not (out2 / "manifest.json").exists() and not list(out2.glob("*p001of002*"))
    assert load_tokenizer(out2 / "tokenizer.json")[0].to_str() == tokenizers[0].read_text()  # not replaced
    assert leftovers(out2) == []


# ----------------------------------------------------------------------------- prepare: inputs and limits


def test_bad_inputs_are_detected_counted_and_named(tmp_path, capsys):
    rng = random.Random(0)
    good = [f"Document {i} starts here. It ends there." for i in range(6)]
    (tmp_path / "a.txt").write_bytes(("\ufeff" + "\n".join(good[:3]) + "\n").encode()  # BOM: not text
                                     + b"ok \x01\x02\x03\x04 bin\x05\x06\n")  # P3: a binary line, no NUL
    (tmp_path / "binary.txt").write_bytes(bytes(rng.randrange(256) for _ in range(20000)))  # P3: has NULs
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"text": good[3]}, {"text": 5}, {"text": ["a"]}, {"title": "x"}, {"text": good[4] + "\u0000"})))  # P6
    (tmp_path / "c.wp_source").write_text("Prompt one.\nPrompt two.\nPrompt three.\n")  # P22: one line longer
    (tmp_path / "c.wp_target").write_text("Story one. It ends.\nStory two. It ends.\n")
    out = tmp_path / "out"
    assert prepare("--input", tmp_path / "a.txt", tmp_path / "binary.txt", tmp_path / "b.jsonl",
                   tmp_path / "c.wp_source", "--output", out, "--vocab-size", 300, "--valid-fraction", 0.001) == 0
    err = capsys.readouterr().err
    for needle in (f"{tmp_path / 'a.txt'}:4: binary data (control characters)",
                   f"{tmp_path / 'binary.txt'}: binary file, not text",
                   f"{tmp_path / 'b.jsonl'}:2: field 'text' is int, not a string",
                   f"{tmp_path / 'b.jsonl'}:3: field 'text' is list, not a string",
                   f"{tmp_path / 'b.jsonl'}:4: missing field 'text'",
                   f"{tmp_path / 'b.jsonl'}:5: field 'text': binary data (NUL byte)",
                   f"{tmp_path / 'c.wp_source'}:3: line has no partner in the .wp_target file",
                   "warning: the valid split is empty (--valid-fraction 0.001)"):  # P4
        assert needle in err, needle
    m = manifest(out)
    assert m["input"]["problems"] == 7
    stored = [r.text for split in ("train", "valid", "test") if m["splits"][split]["samples"]
              for r in records(out, split)]
    assert sorted(stored) == sorted(good[:4] + ["Story one. It ends.", "Story two. It ends."])  # no BOM


def test_tokenizer_and_vocab_size_errors_are_one_line(corpus, tmp_path, capsys):
    binary = tmp_path / "tok.json"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" * 100)
    assert prepare("--input", corpus, "--output", tmp_path / "o1", "--tokenizer", binary) == 2  # P17
    one_line_error(capsys, f"--tokenizer {binary}", "not a tokenizers JSON file")
    assert prepare("--input", corpus, "--output", tmp_path / "o2", "--vocab-size", 99999999999) == 2  # P16
    one_line_error(capsys, "--vocab-size", "99999999999")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and leftovers(tmp_path) == []


def test_sentence_splitting_and_bpe_costs_are_bounded(monkeypatch):
    """P5: pysbd never sees more than MAX_SPAN characters, BPE training no word above MAX_WORD,
    and both give exactly the unbounded results on normal text."""
    splitter = SentenceSplitter()
    seen = []
    segment = splitter._segmenter.segment
    monkeypatch.setattr(splitter._segmenter, "segment", lambda text: seen.append(len(text)) or segment(text))
    rng = random.Random(1)
    splitter.char_ends("x" * (2 * MAX_SPAN + 1))  # one word: cut at MAX_SPAN
    line = "".join(rng.choice(string.ascii_lowercase + "    ") for _ in range(6000))  # no punctuation
    splitter.char_ends(line, max_span=2000)
    assert max(seen[:3]) <= MAX_SPAN and len(seen) >= 6 and max(seen[3:]) <= 2000
    normal = " ".join(tiny_corpus(60, seed=1))  # ~9k characters of sentences
    assert len(normal) > 4 * 2000 and splitter.char_ends(normal, max_span=2000) == splitter._ends(normal)

    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(3 * MAX_WORD + 5))
    pieces = list(bounded_words([f"before {word} after"]))
    assert "".join(pieces) == f"before {word} after" and max(len(p) for p in pieces) <= MAX_WORD
    assert list(bounded_words(tiny_corpus(50))) == tiny_corpus(50)


@pytest.mark.slow
def test_long_lines_are_prepared_in_bounded_time(tmp_path):
    rng = random.Random(2)
    line = "".join(rng.choice(string.ascii_lowercase + "     ") for _ in range(200_000))
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(100_000))
    (tmp_path / "long.txt").write_text(f"{line}\n{word}\n" + "\n".join(tiny_corpus(20)) + "\n")
    start = time.time()
    assert prepare("--input", tmp_path / "long.txt", "--output", tmp_path / "out", "--vocab-size", 300,
                   "--valid-fraction", 0, "--test-fraction", 0) == 0
    assert manifest(tmp_path / "out")["splits"]["train"]["samples"] == 22
    assert time.time() - start < 120  # unbounded: pysbd minutes on the line, BPE ~20 s per 100k-letter word


# ----------------------------------------------------------------------------- batch normalisers (issue 13)


@pytest.mark.parametrize("segment", ["sentence", "fixed:4", "fixed:32"])
def test_num_bytes_and_num_words_are_the_documents_own(tmp_path_factory, segment):
    data = unicode_data(tmp_path_factory)
    _, vocab = load_tokenizer(data / "plain")
    for conditional in (False, True):
        path = data / ("pairs" if conditional else "plain")
        docs = list(records(path, "train", conditional=conditional))
        batch = next(iter(eval_loader(cfg_for(path, segment=segment), vocab,
                                      "train", len(docs) + 3, 0, 1, conditional=conditional)))
        n = len(docs)  # the target text only: the prompt is not part of the document
        assert batch["num_bytes"].tolist() == [len(r.text.encode("utf-8")) for r in docs] + [0] * 3
        assert batch["num_words"].tolist() == [len(r.text.split()) for r in docs] + [0] * 3
        assert batch["num_bytes"].dtype == batch["num_words"].dtype == batch["tokens"].dtype
        assert int(batch["num_bytes"][:n].sum()) > sum(len(r.text) for r in docs)  # multi-byte characters


_UNICODE: dict = {}


def unicode_data(tmp_path_factory) -> Path:
    """Two small prepared datasets (plain and prompt/target pairs) of multi-byte text, built once."""
    if "root" not in _UNICODE:
        root = tmp_path_factory.mktemp("unicode")
        docs = [f"Der Bär {i} aß Äpfel am Fluss. Ça va très bien, merci {i}! Fin 🙂 {'ok ' * (i % 7)}done."
                for i in range(24)]
        (root / "plain.txt").write_text("\n".join(docs) + "\n")
        (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Écris {i}.", "target": d}) + "\n"
                                                 for i, d in enumerate(docs)))
        common = ["--vocab-size", 300, "--valid-fraction", 0, "--test-fraction", 0]
        tok = root / "plain" / "tokenizer.json"
        assert prepare("--input", root / "plain.txt", "--output", root / "plain", *common) == 0
        assert prepare("--input", root / "pairs.jsonl", "--output", root / "pairs", "--conditional",
                       "--tokenizer", tok, *common) == 0
        _UNICODE["root"] = root
    return _UNICODE["root"]
