"""Shared test setup: CPU DeepSpeed, pinned threads (numbers are compared), tiny prepared data."""

import os

# Before torch is imported anywhere: DeepSpeed on CPU/gloo, one thread per process so that
# 2-rank runs do not oversubscribe the 2 cores and losses compare bit for bit.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# The tests import the benchmark scripts they check (and eval_reference.py, the batch-1 oracle that
# both sides use) as modules.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


# ----------------------------------------------------------------------------- tiny prepared data

import random  # noqa: E402

import pytest  # noqa: E402

TINY_SUBJECTS = ["The cat", "A small dog", "My neighbour", "The old sailor", "Every student", "The robot",
                 "A quiet child", "The baker", "Our teacher", "The red fox"]
TINY_VERBS = ["watched", "painted", "carried", "found", "cleaned", "followed", "visited", "sold"]
TINY_OBJECTS = ["the garden", "a wooden boat", "the bright moon", "an empty box", "the long road",
                "a green apple", "the city library", "a broken clock"]
TINY_ENDINGS = ["in the morning", "after the rain", "without a word", "with great care", "before dinner"]


def tiny_corpus(num_documents: int = 400, seed: int = 0) -> list[str]:
    """Documents of 2-5 short template sentences ("The cat watched the garden after the rain.")."""
    rng = random.Random(seed)

    def sentence() -> str:
        words = [rng.choice(TINY_SUBJECTS), rng.choice(TINY_VERBS), rng.choice(TINY_OBJECTS)]
        if rng.random() < 0.5:
            words.append(rng.choice(TINY_ENDINGS))
        return " ".join(words) + rng.choice([".", ".", ".", "!", "?"])

    return [" ".join(sentence() for _ in range(rng.randint(2, 5))) for _ in range(num_documents)]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared data directory (`trace-dist prepare` output) for trainer/eval tests, ~1 s to build.

    Contents: 400 generated English documents of 2-5 short template sentences each
    (`tiny_corpus()`: ~8-12 tokens per sentence, ~30 per document, sentence segmentation), a
    byte-level BPE trained with --vocab-size 512 (the small corpus saturates it at ~440 tokens: read
    the size from `load_tokenizer`), split by content hash into roughly 80% train / 10% valid / 10% test, 64 documents per
    shard (train has several shards, valid and test one each). Unconditional. Use it with
    configs/tiny.yaml by overriding `data.path=<tiny_data>`. Treat it as read-only (shared by the
    whole session).
    """
    from trace_dist.data.prepare import main as prepare

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(tiny_corpus()) + "\n")
    out = root / "data"
    rc = prepare(["--input", str(corpus), "--output", str(out), "--vocab-size", "512", "--shard-samples", "64",
                  "--valid-fraction", "0.1", "--test-fraction", "0.1"])
    assert rc == 0, "preparing tiny_data failed"
    return out


def pytest_collection_modifyitems(items):
    """Slow tests first (Ray searches, then the other multi-process ones), so that the two xdist
    workers (pyproject.toml: -n 2) share the long ones instead of one worker ending on them alone.
    Stable: within each class the files keep their order."""
    def rank(item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.path.name == "test_tune_ray.py" else 1

    items.sort(key=rank)
