"""Remote shards (a real HTTP server on 127.0.0.1, `pipe:` commands) and weighted mixtures."""

import itertools
import logging
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch
from conftest import tiny_corpus
from pydantic import ValidationError

from trace_dist.data import (DataError, eval_loader, eval_loaders, load_tokenizer, manifest, tokenizer_file,
                             tokens_by_source, train_loader)
from trace_dist.data.config import DataConfig
from trace_dist.data.fetch import read
from trace_dist.data.prepare import main as prepare
from trace_dist.data.serve import LoopbackServer


def cfg_for(path, **overrides) -> DataConfig:
    base = dict(path=str(path), max_segments=8, max_segment_tokens=24, max_tokens=128, num_workers=0,
                shuffle_buffer=32, retries=2, retry_backoff=0.01, timeout=5)
    return DataConfig(**{**base, **overrides})


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def docs(batches, source, pad=0) -> set:
    """The examples of `source` in batches, as token tuples without padding (pad is id 0: docs/data.md)."""
    return {tuple(row[row != pad].tolist()) for b in batches for row in b["tokens"][b["source"] == source]}


@pytest.fixture(scope="module")
def other_data(tiny_data, tmp_path_factory):
    """A second prepared set with the tiny data's tokenizer (a mixture partner)."""
    root = tmp_path_factory.mktemp("other")
    (root / "corpus.txt").write_text("\n".join(tiny_corpus(200, seed=7)) + "\n")
    assert prepare(["--input", str(root / "corpus.txt"), "--output", str(root / "data"), "--shard-samples", "32",
                    "--tokenizer", str(tiny_data / "tokenizer.json")]) == 0
    return root / "data"


def test_http_streams_equal_local_batch_for_batch(tiny_data):
    _, vocab = load_tokenizer(tiny_data)
    with LoopbackServer(tiny_data) as server:
        remote_tokenizer, remote_vocab = load_tokenizer(server.url)
        assert remote_vocab == vocab and tokenizer_file(server.url).read_text() == remote_tokenizer.to_str()
        for rank in (0, 1):
            same_batches(take(train_loader(cfg_for(server.url), vocab, 4, rank, 2, seed=3), 12),
                         take(train_loader(cfg_for(tiny_data), vocab, 4, rank, 2, seed=3), 12))
            same_batches(list(eval_loader(cfg_for(server.url), vocab, "valid", 8, rank, 2)),
                         list(eval_loader(cfg_for(tiny_data), vocab, "valid", 8, rank, 2)))
        # DataLoader worker processes fetch over HTTP too (the trainer's setting)
        same_batches(take(train_loader(cfg_for(server.url, num_workers=2), vocab, 4, 1, 2, seed=3), 12),
                     take(train_loader(cfg_for(tiny_data), vocab, 4, 1, 2, seed=3), 12))


def test_pipe_template_streams_equal_local(tiny_data):
    _, vocab = load_tokenizer(tiny_data)
    template = f"pipe:cat {tiny_data}/{{shard}}"
    assert manifest(template) == manifest(tiny_data) and load_tokenizer(template)[1] == vocab
    same_batches(take(train_loader(cfg_for(template), vocab, 4, 1, 2, seed=0), 6),
                 take(train_loader(cfg_for(tiny_data), vocab, 4, 1, 2, seed=0), 6))


def test_pipe_failures_and_hangs_are_bounded(tiny_data):
    with pytest.raises(OSError, match=r"exited with status 3: no such object.*after 2 tries"):
        read("pipe:echo no such object >&2; exit 3", 100, timeout=5, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(OSError, match="did not finish within 0.5 s"):
        read(f"pipe:sleep 30; cat {tiny_data}/manifest.json", 10**6, timeout=0.5, retries=0)
    assert time.monotonic() - t0 < 5  # the child was killed at the deadline


def test_corrupted_shard_served_is_detected_and_skipped(tiny_data, tmp_path, caplog):
    data = tmp_path / "copy"
    shutil.copytree(tiny_data, data)
    shard = data / "valid-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[2000] ^= 0x01  # one bit, same size: only the hash can tell
    shard.write_bytes(bytes(raw))
    _, vocab = load_tokenizer(data)
    samples = manifest(data)["splits"]["valid"]["samples"]
    with LoopbackServer(data) as server, caplog.at_level(logging.WARNING, "trace_dist.data"):
        batches = list(eval_loader(cfg_for(server.url, max_bad_fraction=1.0), vocab, "valid", 8, 0, 1))
        assert sum(int(b["bad_samples"]) for b in batches) == samples and not any(b["example_mask"].any()
                                                                                  for b in batches)
        assert f"{server.url}/valid-000000.tar: sha256 mismatch" in caplog.text
        with pytest.raises(DataError, match=r"valid-000000.tar \(sha256 mismatch"):
            list(eval_loader(cfg_for(server.url, bad_check_min_samples=1), vocab, "valid", 8, 0, 1))


def test_server_gone_mid_run_retries_then_stops_naming_the_shards(tiny_data, caplog):
    _, vocab = load_tokenizer(tiny_data)
    server = LoopbackServer(tiny_data).start()
    try:
        stream = iter(train_loader(cfg_for(server.url, bad_check_min_samples=1), vocab, 4, 0, 1, seed=0))
        first = [next(stream) for _ in range(3)]
        server.stop()
        with caplog.at_level(logging.WARNING, "trace_dist.data"), \
                pytest.raises(DataError, match=r"unreadable.*train-00000\d\.tar \(unreachable: .*after 3 tries"):
            for _ in range(200):
                next(stream)
        assert "retry 2 of 2" in caplog.text
    finally:
        server.stop()
    assert all(b["example_mask"].all() for b in first)


def test_transient_errors_are_retried_and_recover(tiny_data):
    _, vocab = load_tokenizer(tiny_data)
    with LoopbackServer(tiny_data) as server:
        loader = train_loader(cfg_for(server.url), vocab, 4, 0, 1, seed=5)  # reads the manifest
        server.fail_next(2)  # 503 twice for the first shard: the third try (retries=2) gets it
        got = take(loader, 10)
    same_batches(got, take(train_loader(cfg_for(tiny_data), vocab, 4, 0, 1, seed=5), 10))
    assert all(int(b["bad_samples"]) == 0 for b in got)


def test_a_server_back_within_the_retries_is_used_again(tiny_data):
    _, vocab = load_tokenizer(tiny_data)
    server = LoopbackServer(tiny_data).start()
    try:
        loader = train_loader(cfg_for(server.url, retries=4, retry_backoff=0.2), vocab, 4, 0, 1, seed=2)
        server.stop()
        threading.Timer(0.5, server.start).start()  # back on the same port after 0.5 s (retries: 0.2 s, 0.4 s, ...)
        got = take(loader, 10)
    finally:
        time.sleep(0.6)  # the timer has fired
        server.stop()
    same_batches(got, take(train_loader(cfg_for(tiny_data), vocab, 4, 0, 1, seed=2), 10))
    assert all(int(b["bad_samples"]) == 0 for b in got)


def test_a_server_that_never_answers_times_out():
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.monotonic()
        with pytest.raises(OSError, match="/data/train-000000.tar: timed out after 2 tries"):
            read(f"http://127.0.0.1:{silent.getsockname()[1]}/data/train-000000.tar", 100, timeout=0.5, retries=1,
                 backoff=0.01)
        assert time.monotonic() - t0 < 5


def test_mixture_draws_in_proportion_and_resumes_exactly(tiny_data, other_data):
    _, vocab = load_tokenizer(tiny_data)
    with LoopbackServer(other_data) as server:
        mixture = [dict(path=str(tiny_data), weight=3.0, name="tiny"), dict(path=server.url, weight=1.0, name="other")]
        cfg = cfg_for(tiny_data, mixture=mixture)
        batches = take(train_loader(cfg, vocab, 8, 0, 1, seed=1), 60)
        resumed = take(train_loader(cfg, vocab, 8, 0, 1, seed=1, start_step=37), 23)
        same_batches(batches[37:], resumed)
        sources = torch.cat([b["source"] for b in batches])  # [480]
        n = len(sources)
        share = float((sources == 0).sum()) / n
        assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n) and set(sources.tolist()) == {0, 1}
        counts = tokens_by_source(batches[0], [s.name for s in cfg.sources()])
        assert list(counts) == ["data/tokens/tiny", "data/tokens/other"] and all(v > 0 for v in counts.values())
        assert sum(counts.values()) == batches[0]["loss_mask"].sum()
        # Examples tagged 0 are documents of the tiny set, those tagged 1 are not.
        tiny = docs(eval_loader(cfg_for(tiny_data), vocab, "train", 64, 0, 1), 0)
        assert docs(batches, 0) <= tiny and not docs(batches, 1) & tiny
        per_source = {name: loader for name, loader in eval_loaders(cfg, vocab, "valid", 8, 0, 1)}
        assert list(per_source) == ["tiny", "other"]
        for i, (path, loader) in enumerate(zip((tiny_data, other_data), per_source.values())):
            got = list(loader)
            assert sum(int(b["example_mask"].sum()) for b in got) == manifest(path)["splits"]["valid"]["samples"]
            assert all((b["source"][b["example_mask"]] == i).all() for b in got)


def test_mixture_of_different_tokenizers_is_refused_naming_both(tiny_data, tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(tiny_corpus(60, seed=3)) + "\n")
    assert prepare(["--input", str(tmp_path / "c.txt"), "--output", str(tmp_path / "d"), "--vocab-size", "300"]) == 0
    _, vocab = load_tokenizer(tiny_data)
    cfg = cfg_for(tiny_data, mixture=[dict(path=str(tiny_data), weight=1), dict(path=str(tmp_path / "d"), weight=1)])
    with pytest.raises(DataError, match=rf"{tmp_path / 'd'} was tokenized with another tokenizer .* than {tiny_data}"):
        train_loader(cfg, vocab, 4, 0, 1, seed=0)


def test_data_config_checks_locations_and_mixtures():
    with pytest.raises(ValidationError, match=r"\{shard\} placeholder"):
        DataConfig(path="pipe:aws s3 cp s3://bucket/corpus/train.tar -")
    with pytest.raises(ValidationError, match="is not a source of data.mixture"):
        DataConfig(path="a", mixture=[dict(path="b", weight=1)])
    with pytest.raises(ValidationError, match="named alike"):
        DataConfig(mixture=[dict(path="x/corpus", weight=1), dict(path="https://h/corpus/", weight=1)])
    cfg = DataConfig(mixture=[dict(path="pipe:gsutil cat gs://b/wiki/{shard}", weight=2), dict(path="b", weight=1)])
    assert cfg.path == "pipe:gsutil cat gs://b/wiki/{shard}" and [s.name for s in cfg.sources()] == ["wiki", "b"]


@pytest.mark.slow
def test_trace_dist_train_from_http_equals_training_from_the_local_copy(tiny_data, tmp_path):
    """The whole path: `trace-dist train` (pre-launch checks, resolved config, launcher, rank, checkpoint
    with the tokenizer copied from the server) on data served over HTTP gives the local run's loss curve."""
    from test_train import curve

    from trace_dist.cli import main as cli

    def train(path, out):
        args = ["train", "--config", "configs/tiny.yaml", "--nproc", "1", f"data.path={path}",
                f"train.output_dir={out}", "train.max_steps=4", "train.eval_interval=4", "train.samples_to_log=0",
                "checkpoint.interval=4", "data.num_workers=1"]
        assert cli(args) == 0
        return curve(out)

    local = train(tiny_data, tmp_path / "local")
    with LoopbackServer(tiny_data) as server:
        remote = train(server.url, tmp_path / "http")
    assert remote == local and len(local) == 4
    assert (tmp_path / "http" / "checkpoints" / "step00000004" / "tokenizer.json").read_bytes() == \
        (tmp_path / "local" / "checkpoints" / "step00000004" / "tokenizer.json").read_bytes()
