"""Loaders on real shards: batch layout, re-segmentation, determinism, resume, eval coverage, corruption."""

import hashlib
import io
import itertools
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from test_data_prepare import records

from trace_dist.data import DataError, eval_loader, load_tokenizer, train_loader
from trace_dist.data.config import DataConfig
from trace_dist.data.prepare import main as prepare


def cfg_for(data, **overrides) -> DataConfig:
    base = dict(path=str(data), max_segments=8, max_segment_tokens=24, max_tokens=128, num_workers=0,
                shuffle_buffer=32)
    return DataConfig(**{**base, **overrides})


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def rows(batch):
    """The real examples of a batch as token tuples without padding."""
    lengths = (batch["seg_ids"] >= 0).sum(1) + batch["prompt_mask"].sum(1)
    return [tuple(batch["tokens"][b, :n].tolist()) for b, n in enumerate(lengths) if batch["example_mask"][b]]


def segments_of(tokens, seg_ids, k):
    return tokens[seg_ids == k]


def test_sentence_layout_matches_the_stored_bounds(tiny_data):
    _, vocab = load_tokenizer(tiny_data)
    cfg = cfg_for(tiny_data, max_segments=16, max_segment_tokens=64)
    batch = next(iter(eval_loader(cfg, vocab, "valid", 64, 0, 1)))
    by_content = {tuple(r.ids.tolist()): r for r in records(tiny_data, "valid")}
    assert batch["tokens"].dtype == torch.int64 and batch["bad_samples"].shape == ()
    assert torch.equal(batch["loss_mask"], batch["seg_ids"] >= 0) and not batch["prompt_mask"].any()
    for b in range(int(batch["example_mask"].sum())):
        tokens, seg_ids, K = batch["tokens"][b].numpy(), batch["seg_ids"][b].numpy(), int(batch["num_segments"][b])
        segs = [segments_of(tokens, seg_ids, k) for k in range(K)]
        assert all(s[-1] == vocab.sep for s in segs[:-1]) and segs[-1][-1] == vocab.eos
        assert (tokens[seg_ids < 0] == vocab.pad).all() and np.all(np.diff(seg_ids[seg_ids >= 0]) >= 0)
        record = by_content[tuple(np.concatenate([s[:-1] for s in segs]).tolist())]  # nothing cut
        assert [len(s) - 1 for s in segs] == np.diff(np.concatenate([[0], record.bounds])).tolist()


def test_fixed_segmentation_is_applied_at_load_time(tiny_data):
    _, vocab = load_tokenizer(tiny_data)
    sentence_batch = next(iter(eval_loader(cfg_for(tiny_data), vocab, "valid", 16, 0, 1)))
    batch = next(iter(eval_loader(cfg_for(tiny_data, segment="fixed:5", max_segments=64), vocab, "valid", 16, 0, 1)))
    for b in range(16):
        tokens, seg_ids = batch["tokens"][b], batch["seg_ids"][b]
        lengths = torch.bincount(seg_ids[seg_ids >= 0]).tolist()
        assert lengths[:-1] == [5] * (len(lengths) - 1) and 1 < lengths[-1] <= 5  # sep counts in the 5
        content = tokens[(seg_ids >= 0) & (tokens > vocab.sep)]
        plain = sentence_batch["tokens"][b]
        assert torch.equal(content, plain[(sentence_batch["seg_ids"][b] >= 0) & (plain > vocab.sep)])
        assert int(batch["num_segments"][b]) == len(lengths)


def test_limits_truncate_and_count(tiny_data):
    _, vocab = load_tokenizer(tiny_data)
    loader = eval_loader(cfg_for(tiny_data, max_segments=2, max_segment_tokens=6, max_tokens=10), vocab,
                         "valid", 8, 0, 1)
    batches = list(loader)
    assert all(b["num_segments"].max() <= 2 and b["tokens"].shape[1] <= 10 for b in batches)
    assert all(torch.bincount(b["seg_ids"][i][b["seg_ids"][i] >= 0]).max() <= 6
               for b in batches for i in range(8) if b["example_mask"][i])
    assert sum(int(b["cut_segments"]) for b in batches) > 0 and sum(int(b["cut_tokens"]) for b in batches) > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_cut_segment_is_counted_in_the_batches(tiny_data, num_workers):
    """The segments beyond max_segments reach the batches' cut_segments exactly (also from DataLoader
    workers); a document's count rides with the batch it lands in (eval) or its chunk's first batch (train)."""
    _, vocab = load_tokenizer(tiny_data)
    whole = cfg_for(tiny_data, max_segments=64, max_segment_tokens=64, max_tokens=4096, num_workers=num_workers)
    cut = whole.model_copy(update={"max_segments": 2})
    full = list(eval_loader(whole, vocab, "valid", 8, 0, 1))
    short = list(eval_loader(cut, vocab, "valid", 8, 0, 1))
    expected = sum(int((b["num_segments"] - 2).clamp(min=0).sum()) for b in full)
    assert expected > 0 and sum(int(b["cut_segments"]) for b in short) == expected
    assert all(int(b["cut_segments"]) == 0 for b in full)
    train = take(train_loader(cut, vocab, 4, 0, 1, seed=3), 6)
    assert sum(int(b["cut_segments"]) for b in train) > 0
    assert {k for k in train[0] if k.startswith("cut_")} == {"cut_segments", "cut_tokens", "cut_prompt_tokens"}


def test_train_stream_is_a_pure_function_of_seed_rank_step(tiny_data):
    _, vocab = load_tokenizer(tiny_data)
    cfg = cfg_for(tiny_data)
    loader = train_loader(cfg, vocab, 4, 0, 2, seed=7)
    chunk = loader.chunks.chunk_batches
    n = 3 * chunk  # several chunks
    stream = take(loader, n)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(stream, take(loader, n)))
    # Resume mid-chunk = the uninterrupted stream from there, also with 2 workers sharing the chunks.
    start = chunk + 5
    resumed = take(train_loader(cfg_for(tiny_data, num_workers=2), vocab, 4, 0, 2, seed=7, start_step=start), n - start)
    assert len(resumed) == n - start
    assert all(torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["seg_ids"], b["seg_ids"])
               for a, b in zip(stream[start:], resumed))
    other_rank = take(train_loader(cfg, vocab, 4, 1, 2, seed=7), n)
    other_seed = take(train_loader(cfg, vocab, 4, 0, 2, seed=8), n)
    for other in (other_rank, other_seed):
        assert sum(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(stream, other)) < n // 10
    # Every rank's batches are full: same count of micro-batches and examples per rank.
    for s in (stream, other_rank):
        assert all(b["example_mask"].all() and len(b["example_mask"]) == 4 for b in s)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_ranks_are_disjoint_and_cover_every_sample_once(tiny_data, num_workers):
    _, vocab = load_tokenizer(tiny_data)
    cfg = cfg_for(tiny_data, num_workers=num_workers, max_segments=16, max_segment_tokens=64)
    expected = Counter(tuple(np.append(np.insert(r.ids, r.bounds[:-1], vocab.sep), vocab.eos).tolist())
                       for r in records(tiny_data, "valid"))
    # 3 ranks x 2 workers over a 1-shard split: more readers than shards.
    per_rank = [list(eval_loader(cfg, vocab, "valid", 4, rank, 3)) for rank in range(3)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(eval_loader(cfg, vocab, "valid", 4, 0, 3))
    seen = [Counter(row for b in batches for row in rows(b)) for batches in per_rank]
    assert sum(seen, Counter()) == expected  # with multiplicity: nothing missed, nothing twice


def corrupt(data, tmp_path):
    """A copy of the data with one truncated train shard and one garbage (pickled) sample in valid.

    The valid shard is re-recorded in the manifest (as if prepare itself had written the bad sample),
    so that it passes the sha256 check and the decoder's own defences are what is tested.
    """
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    shard = bad / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    valid = bad / "valid-000000.tar"
    members = []
    with tarfile.open(valid) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            if info.name == "000003.ids.npy":
                buf = io.BytesIO()
                np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
                data = buf.getvalue()
            members.append((info, data))
    with tarfile.open(valid, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    meta = json.loads((bad / "manifest.json").read_text())
    entry = meta["splits"]["valid"]["shards"][0]
    entry.update(sha256=hashlib.sha256(valid.read_bytes()).hexdigest(), bytes=valid.stat().st_size)
    (bad / "manifest.json").write_text(json.dumps(meta))
    return bad


def test_bad_shards_found_in_loader_workers_are_named_in_tensorboard(tiny_data, tmp_path, caplog):
    """A shard a DataLoader worker finds bad reaches the training process's log and, through the
    RunLog, TensorBoard text `data/bad_shards` (at the step being read)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trace_dist.config import load_config
    from trace_dist.runlog import RunLog

    _, vocab = load_tokenizer(tiny_data)
    cfg = load_config(["configs/tiny.yaml"], [f"train.output_dir={tmp_path / 'run'}", "train.progress=false"])
    log = RunLog(cfg, is_main=True, start_step=4)
    bad = cfg_for(corrupt(tiny_data, tmp_path), max_bad_fraction=1.0, num_workers=2)
    list(eval_loader(bad, vocab, "valid", 8, 0, 1))
    log.close()
    assert "valid-000000.tar" in caplog.text  # the log's handlers still get it: the RunLog only listens
    ea = EventAccumulator(str(cfg.tensorboard_dir), size_guidance={"tensors": 0})
    ea.Reload()
    events = ea.Tensors("data/bad_shards/text_summary")  # one per worker that read the shard
    assert events and all(e.step == 5 and "valid-000000.tar" in e.tensor_proto.string_val[0].decode()
                          for e in events)

def test_corrupt_shards_and_samples_are_skipped_and_counted(tiny_data, tmp_path, caplog):
    _, vocab = load_tokenizer(tiny_data)
    bad = corrupt(tiny_data, tmp_path)
    cfg = cfg_for(bad, max_bad_fraction=1.0)
    valid = list(eval_loader(cfg, vocab, "valid", 8, 0, 1))
    n_valid = len(list(records(tiny_data, "valid")))
    assert sum(int(b["bad_samples"]) for b in valid) == 1
    assert sum(int(b["example_mask"].sum()) for b in valid) == n_valid - 1
    assert "valid-000000.tar" in caplog.text
    stream = take(train_loader(cfg, vocab, 4, 0, 1, seed=0), 200)
    assert sum(int(b["bad_samples"]) for b in stream) > 0 and all(b["example_mask"].all() for b in stream)
    assert "train-000001.tar" in caplog.text

    strict = cfg_for(bad, max_bad_fraction=0.001, bad_check_min_samples=10)
    with pytest.raises(DataError, match="train-000001.tar"):
        take(train_loader(strict, vocab, 4, 0, 1, seed=0), 200)


def test_conditional_batches_put_the_prompt_first(tiny_data, tmp_path):
    lines = [f'{{"prompt": "Write about item {i}.", "target": "Item {i} is here. It is number {i}."}}'
             for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert prepare(["--input", str(tmp_path / "pairs.jsonl"), "--output", str(out), "--conditional",
                    "--vocab-size", "300", "--valid-fraction", "0", "--test-fraction", "0"]) == 0
    tokenizer, vocab = load_tokenizer(out)
    batch = next(iter(eval_loader(cfg_for(out), vocab, "train", 30, 0, 1, conditional=True)))
    for b in range(30):
        tokens, prompt = batch["tokens"][b], batch["prompt_mask"][b]
        n_prompt = int(prompt.sum())
        assert prompt[:n_prompt].all() and tokens[n_prompt - 1] == vocab.sep
        assert (batch["seg_ids"][b][prompt] == -1).all()
        i = tokenizer.decode(tokens[: n_prompt - 1].tolist()).split()[-1].rstrip(".")
        assert tokenizer.decode(tokens[n_prompt:].tolist()).startswith(f"Item {i} is here.")
    with pytest.raises(DataError, match="without --conditional"):
        eval_loader(cfg_for(tiny_data), load_tokenizer(tiny_data)[1], "train", 4, 0, 1, conditional=True)


def test_encode_text_equals_prepare_and_the_loader(tmp_path):
    """encode_text(raw text) is the record prepare stores, and Layout + collate of it the loader's example,
    with the prepare-time limits (long sentences split, sentences past --max-segments cut) and prompts."""
    from trace_dist.data import encode_text
    from trace_dist.data.batch import Layout, collate

    sentences = "Item {i} is here. It is a remarkably long sentence about the number {i}."
    docs = [{"prompt": f"Tell me about item {i}.", "target": " ".join([sentences.format(i=i)] * (i % 3 + 1))}
            for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    assert prepare(["--input", str(tmp_path / "pairs.jsonl"), "--output", str(out), "--conditional",
                    "--vocab-size", "300", "--valid-fraction", "0", "--test-fraction", "0",
                    "--max-segments", "4", "--max-segment-tokens", "12"]) == 0
    tokenizer, vocab = load_tokenizer(out)
    stored = list(records(out, "train", conditional=True))             # input order: one shard, nothing skipped
    cfg = cfg_for(out, max_segments=3, max_segment_tokens=10)           # load-time limits cut further
    batch = next(iter(eval_loader(cfg, vocab, "train", len(docs), 0, 1, conditional=True)))
    stats = Counter()
    for i, (doc, record) in enumerate(zip(docs, stored, strict=True)):
        mine = encode_text(doc["target"], tokenizer, doc["prompt"], max_segments=4, max_segment_tokens=12,
                           stats=stats)
        for field in ("ids", "bounds", "prompt"):
            assert np.array_equal(getattr(mine, field), getattr(record, field)), (i, field)
        assert (mine.text, mine.prompt_text) == (record.text, record.prompt_text)
        one = collate([Layout(cfg, vocab, conditional=True).example(mine)], vocab, 0)
        n = one["tokens"].shape[1]
        for key in ("tokens", "seg_ids", "prompt_mask", "loss_mask"):
            assert torch.equal(one[key][0], batch[key][i, :n]), (i, key)
        assert int(one["num_segments"][0]) == int(batch["num_segments"][i])
    assert stats["split_segments"] > 0 and stats["cut_segments"] > 0   # both limits were exercised
    with pytest.raises(ValueError, match="special-token"):
        encode_text("A text with <|sep|> inside.", tokenizer)
    with pytest.raises(ValueError, match="empty"):
        encode_text("", tokenizer)
