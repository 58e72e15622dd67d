"""Is the data pipeline fast enough? Stream tokens/s vs the tokens/s training consumes, and prepare MB/s.

Measured side by side in one run, at the configs/quickstart.yaml sizes:
- prepare: `trace-dist prepare` with one worker on the pydoc prose (repeated to ~1 MB), MB of raw
  UTF-8 text per second, tokenizer training included;
- stream: `train_loader` with one DataLoader worker, non-padding tokens per second, from the local
  directory and from the same shards served over HTTP on 127.0.0.1 (`data.path=http://...`: every
  shard fetched through urllib and verified while it streams);
- train: TRACE forward + backward + AdamW step on batches from that loader, one thread (what one
  rank of the quickstart gets on this 2-core box), tokens per second.
Goal: stream_over_train_ratio and stream_over_train_ratio_http >= 20, so data loading never shows
up in a training profile.

    python benchmarks/data_throughput.py [--batches 2000] [--train-steps 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trace_dist.model.trace import TRACE  # noqa: E402  (before trace_dist.config: see the report on import order)
from trace_dist.config import load_config  # noqa: E402
from trace_dist.data import load_tokenizer, train_loader  # noqa: E402
from trace_dist.data.prepare import main as prepare  # noqa: E402
from trace_dist.data.serve import LoopbackServer  # noqa: E402
from trace_dist.data.sources import pydoc_documents  # noqa: E402


def tokens_in(batch) -> int:
    return int(batch["loss_mask"].sum() + batch["prompt_mask"].sum())  # padding excluded


def bench_prepare(root: Path, copies: int) -> tuple[float, float, Path]:
    docs = [text for _, text in pydoc_documents()]
    corpus = root / "pydoc.txt"
    # Copies differ by a marker so the split hash spreads them like distinct documents.
    corpus.write_text("".join(f"{text} ({c})\n" for c in range(copies) for text in docs))
    mb = corpus.stat().st_size / 1e6
    t0 = time.perf_counter()
    assert prepare(["--input", str(corpus), "--output", str(root / "data"), "--workers", "1"]) == 0
    return mb, time.perf_counter() - t0, root / "data"


def bench_stream(cfg, vocab, batches: int) -> tuple[float, list]:
    it = iter(train_loader(cfg.data, vocab, cfg.train.micro_batch_size, rank=0, world_size=1, seed=0))
    kept = [next(it) for _ in range(20)]  # worker start-up and first chunks are not throughput
    t0 = time.perf_counter()
    tokens = sum(tokens_in(next(it)) for _ in range(batches))
    return tokens / (time.perf_counter() - t0), kept


def bench_train(cfg, vocab, batches: list, steps: int) -> float:
    torch.manual_seed(0)
    model = TRACE(cfg.model, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch):
        model(batch, beta=1.0).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up (allocations, lazy inits)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(steps):
        batch = batches[1 + i % (len(batches) - 1)]
        step(batch)
        tokens += tokens_in(batch)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000, help="stream batches timed")
    parser.add_argument("--train-steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--copies", type=int, default=3, help="copies of the pydoc prose to prepare")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        mb, seconds, data = bench_prepare(Path(tmp), args.copies)
        _, vocab = load_tokenizer(data)
        cfg = load_config([REPO / "configs/quickstart.yaml"], [f"data.path={data}", "data.num_workers=1"])
        stream_tps, batches = bench_stream(cfg, vocab, args.batches)
        with LoopbackServer(data) as server:
            http_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": server.url})})
            http_tps, _ = bench_stream(http_cfg, vocab, args.batches)
        train_tps = bench_train(cfg, vocab, batches, args.train_steps)

    mbs = cfg.train.micro_batch_size
    rows = [("prepare (1 worker)", f"{mb / seconds:.3f} MB/s", f"{mb:.2f} MB raw text in {seconds:.1f} s"),
            ("stream (1 DataLoader worker)", f"{stream_tps:,.0f} tok/s", f"{args.batches} batches of {mbs}"),
            ("stream over loopback HTTP", f"{http_tps:,.0f} tok/s", f"{args.batches} batches of {mbs}"),
            ("train (quickstart model, 1 thread)", f"{train_tps:,.0f} tok/s", f"{args.train_steps} AdamW steps"),
            ("stream / train", f"{stream_tps / train_tps:.1f}x", "goal >= 20x"),
            ("stream over HTTP / train", f"{http_tps / train_tps:.1f}x", "goal >= 20x")]
    print(f"{'measure':<38}{'rate':>16}   detail")
    for name, rate, detail in rows:
        print(f"{name:<38}{rate:>16}   {detail}")
    print(json.dumps({"stream_over_train_ratio": round(stream_tps / train_tps, 2),
                      "stream_over_train_ratio_http": round(http_tps / train_tps, 2),
                      "stream_tokens_per_s_http": round(http_tps),
                      "prepare_mb_per_s": round(mb / seconds, 4),
                      "stream_tokens_per_s": round(stream_tps), "train_tokens_per_s": round(train_tps)}))


if __name__ == "__main__":
    main()
