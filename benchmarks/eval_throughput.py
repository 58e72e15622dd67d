"""How fast is `trace-dist eval` next to training? Training tokens/s of the quickstart model against its
evaluation's importance-weighted token-forwards/s, batched and batch-1.

In one process, at `--threads` intra-op threads (2: the issue's measurement):
  1. `trace-dist prepare builtin:pydoc` (test split: 58 documents, 5.0 k predicted tokens);
  2. training: the quickstart TRACE (configs/quickstart.yaml), AdamW, `--train-steps` micro-batches of
     8 from `train_loader`, the first `--warmup` untimed:
        train_tokens_per_s = predicted tokens / wall time of forward + backward + optimizer step;
     the trained weights are exported (a few steps make the zero-initialised latent injection
     non-zero, so the decoder reads z);
  3. the likelihood pass over the test split at `--iw-samples` (10): batched (`evaluate.likelihood_pass`,
     default token budget) and batch-1 (benchmarks/eval_reference.py: each document alone, as before
     batching; but `log_weights` now decodes a document's S samples together, which the code before
     did one by one, so batch-1 here is already faster than that code), alternating, `--repeats`
     each, the fastest of each kept (the box is shared):
        eval_iw_token_forwards_per_s = predicted tokens x S / wall time of the batched pass;
     both must give the same figures (checked: `same_figures`);
  4. prior samples: `--num-samples` texts from the prior in chunks of eval.batch_size (what
     `trace-dist eval` does today) and in one chunk (one generation batch): CPU seconds of each.
     Every sample draws from its own generator, seeded by its index, so the texts agree but for the
     float rounding of differently sized matmuls, which can flip a token (`prior_texts_differing`:
     how many of the samples differ);
  5. the whole `trace-dist eval` in this process (`--iw-samples 10 --num-samples 100`, generation
     included): eval_seconds (its recorded wall time) and eval_cpu_seconds (this process's CPU time,
     the figure that means something on a shared box).
Printed last: eval_over_train_token_ratio = eval_iw_token_forwards_per_s / train_tokens_per_s.
Goals: eval_over_train_token_ratio >= 2; eval_seconds <= 10.

    python benchmarks/eval_throughput.py [--quick | --smoke] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import common  # first: pins threads, DS_ACCELERATOR
import torch

from trace_dist import evaluate
from trace_dist.checkpoint import load_for_inference
from trace_dist.config import load_config
from trace_dist.data import eval_loader, load_tokenizer, train_loader
from trace_dist.ports import free_port
from trace_dist.model.trace import TRACE
from trace_dist.sampling import prior_chunk

from eval_reference import likelihood_pass_batch1  # also the tests' oracle

SMOKE = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.latent_size=8"]


def train_throughput(cfg, vocab, steps: int, warmup: int) -> tuple[TRACE, float]:
    """(the trained model, predicted tokens per second of forward + backward + AdamW step)."""
    torch.manual_seed(cfg.train.seed)
    model = TRACE(cfg.model, vocab).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    batches = iter(train_loader(cfg.data, vocab, cfg.train.micro_batch_size, 0, 1, cfg.train.seed))
    tokens, seconds = 0, 0.0
    for step in range(warmup + steps):
        batch = next(batches)
        start = time.perf_counter()
        out = model(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            seconds += time.perf_counter() - start
            tokens += int(out.num_tokens)
    return model.eval(), tokens / seconds


def export(model, cfg, tokenizer, out: Path) -> Path:
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(cfg.to_yaml())
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def timed(fn, *args, clock=time.perf_counter) -> tuple[float, object]:
    start = clock()
    result = fn(*args)
    return clock() - start, result


def prior_samples(model, cfg, num: int, chunk: int) -> list[list[int]]:
    """`num` prior samples in chunks of `chunk` (as `trace-dist eval` draws them on one rank)."""
    return [ids for start in range(0, num, chunk)
            for ids in prior_chunk(model, start, min(chunk, num - start), cfg.train.seed, cfg.generation, "cpu",
                                   cfg.data.segment)]


def whole_eval(export_dir: Path, iw: int, num_samples: int, extra: list[str]) -> dict:
    """`trace-dist eval` in this process (world size 1) -> its JSON report."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = export_dir / "eval_test.json"
    assert evaluate.main(["--checkpoint", str(export_dir), "--iw-samples", str(iw), "--num-samples",
                          str(num_samples), "--output", str(out), "--no-progress", *extra]) == 0
    return json.loads(out.read_text())


def main() -> None:
    ap = common.arg_parser(__doc__, smoke="a 1-layer model, 8 documents, seconds (the tests)",
                           quick="fewer training steps and repeats", threads=2)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iw-samples", type=int, default=10)
    ap.add_argument("--num-samples", type=int, default=100)
    args = common.parse(ap)
    if args.quick:
        args.train_steps, args.repeats = 15, 2
    overrides, extra = [], []
    if args.smoke:
        args.train_steps, args.warmup, args.repeats, args.iw_samples, args.num_samples = 2, 1, 1, 2, 4
        overrides, extra = SMOKE, ["--max-documents", "8", "generation.max_new_tokens=8"]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = common.prepare_pydoc(tmp / "pydoc")
        cfg = load_config([str(common.REPO / "configs/quickstart.yaml")],
                          [f"data.path={data}", f"train.output_dir={tmp / 'run'}", *overrides])
        tokenizer, vocab = load_tokenizer(data)
        model, train_tps = train_throughput(cfg, vocab, args.train_steps, args.warmup)
        export_dir = export(model, cfg, tokenizer, tmp / "export")

        model, cfg, _, vocab = load_for_inference(export_dir)
        examples = [ex for b in eval_loader(cfg.data, vocab, "test", cfg.eval.batch_size, 0, 1)
                    for ex in evaluate.single_examples(b)]
        if args.smoke:
            examples = examples[:8]
        tokens = sum(int(ex["loss_mask"].sum()) for ex in examples)
        S, seed = args.iw_samples, cfg.train.seed
        batched_s, batch1_s = math.inf, math.inf
        for _ in range(args.repeats):
            t, batched = timed(evaluate.likelihood_pass, model, examples, S, seed, "cpu", evaluate.TOKEN_BUDGET, False)
            batched_s = min(batched_s, t)
            t, batch1 = timed(likelihood_pass_batch1, model, examples, S, seed, "cpu")
            batch1_s = min(batch1_s, t)
        figures = [evaluate.finish_likelihood(sums, sorted(rows, key=lambda r: r["key"]), 0.0, cfg.eval.au_delta, seed)
                   for sums, rows in (batched, batch1)]
        same = all(math.isclose(figures[0][k], figures[1][k], rel_tol=1e-6) for k in ("nll_iw", "elbo", "kl"))
        cpu = time.process_time
        chunked_cpu, chunked = timed(prior_samples, model, cfg, args.num_samples, cfg.eval.batch_size, clock=cpu)
        one_cpu, one = timed(prior_samples, model, cfg, args.num_samples, args.num_samples, clock=cpu)
        eval_cpu, report = timed(whole_eval, export_dir, S, args.num_samples, extra, clock=cpu)

    eval_tps = tokens * S / batched_s
    common.table(["pass", "seconds", "IW token-forwards/s"],
                 [["likelihood, batched", f"{batched_s:.2f}", f"{eval_tps:.0f}"],
                  ["likelihood, batch-1", f"{batch1_s:.2f}", f"{tokens * S / batch1_s:.0f}"],
                  ["whole eval (+ generation)", f"{report['wall_time_s']:.2f}", ""]])
    common.table(["prior samples", "CPU seconds"],
                 [[f"chunks of {cfg.eval.batch_size}", f"{chunked_cpu:.2f}"], ["one chunk", f"{one_cpu:.2f}"]])
    common.emit({
        "threads": args.threads, "documents": len(examples), "tokens": tokens, "iw_samples": S,
        "num_samples": args.num_samples, "token_budget": evaluate.TOKEN_BUDGET,
        "train_tokens_per_s": round(train_tps, 1),
        "likelihood_seconds_batched": round(batched_s, 3), "likelihood_seconds_batch1": round(batch1_s, 3),
        "batched_over_batch1_speedup": round(batch1_s / batched_s, 2), "same_figures": same,
        "eval_seconds": report["wall_time_s"], "eval_cpu_seconds": round(eval_cpu, 2),
        "prior_cpu_seconds_chunked": round(chunked_cpu, 2), "prior_cpu_seconds_one_chunk": round(one_cpu, 2),
        "prior_texts_differing": sum(a != b for a, b in zip(chunked, one)),
        "eval_iw_token_forwards_per_s": round(eval_tps, 1),
        "eval_over_train_token_ratio": round(eval_tps / train_tps, 3),
    })


if __name__ == "__main__":
    main()
