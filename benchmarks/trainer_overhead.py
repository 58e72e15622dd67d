"""What does the trainer cost over a bare DeepSpeed loop? tokens/s of `run_training` vs a hand-written loop.

Side by side in one process, same thread count, same model, same DeepSpeed config, same batches:
  A. trainer: `Trainer(cfg).train()` (what `run_training(cfg)` and `trace-dist train` run; its
     public `on_step` hook notes the time when each step's metrics.jsonl line has been written);
  B. bare:    deepspeed.initialize(TRACE) and `out = engine(batch); engine.backward(out.loss);
     engine.step()` on batches from the same `trace_dist.data.train_loader` stream.
Each run builds a fresh engine and trains `--steps` steps from step 0; the first `--warmup` steps
are excluded; runs alternate A B A B ... (`--repeats` each). A step's time is the wall time from
the end of the previous step to the end of this one, so the trainer's per-step bookkeeping
(loss/metric sums, finite check, metrics.jsonl, TensorBoard every log_interval, progress bar) is
inside it; its periodic validation and checkpoint (at the last step here) are outside. Step i
sees the same batch in every run, so on a box shared with other jobs the fastest of the runs at
each step is the estimate least disturbed by them:
  train_over_bare_ratio = tokens / sum_i min_runs(trainer step i)  over  the same for bare
(also printed: the ratio of the median runs' tokens/s). The trainer's bookkeeping is also timed
directly: step time minus the time the trainer itself measures for the step (loop top to the
metrics record: data, forward, backward, step, reductions).
Goal: train_over_bare_ratio >= 0.95.

    python benchmarks/trainer_overhead.py [--quick | --smoke] [--threads 1]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import common  # first: pins threads, DS_ACCELERATOR
import torch

from trace_dist.config import load_config
from trace_dist.data import load_tokenizer, train_loader
from trace_dist.model.trace import TRACE
from trace_dist.train import Trainer


def steps_of(stamps: list[tuple], warmup: int) -> list[tuple[float, int]]:
    """(seconds, tokens) of each step after the first `warmup`."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]


def trainer_run(cfg) -> list[tuple[float, int, float]]:
    """The real Trainer; its public `on_step` hook notes (time, tokens so far, the trainer's own
    step seconds) as each step's metrics.jsonl line has been written."""
    stamps: list[tuple[float, int, float]] = []

    def stamp(record: dict) -> None:
        step_tokens = record["tokens"] - (stamps[-1][1] if stamps else 0)
        stamps.append((time.perf_counter(), record["tokens"], step_tokens / record["tokens_per_s"]))

    Trainer(cfg, on_step=stamp).train()
    return stamps


def bare_run(cfg, vocab) -> list[tuple[float, int]]:
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    model = TRACE(cfg.model, vocab)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=cfg.deepspeed_config_dict(1))
    batches = iter(train_loader(cfg.data, vocab, cfg.train.micro_batch_size, 0, 1, cfg.train.seed,
                                conditional=cfg.model.conditional))
    stamps, tokens = [], 0
    for _ in range(cfg.train.max_steps):
        out = engine(next(batches), beta=cfg.kl.beta, free_bits=cfg.kl.free_bits)
        engine.backward(out.loss)
        engine.step()
        tokens += int(out.num_tokens)
        stamps.append((time.perf_counter(), tokens))
    return stamps


def main(argv=None) -> dict:
    ap = common.arg_parser(__doc__, smoke="tests: configs/tiny.yaml model, a few steps",
                           quick="fewer steps and repeats", threads=1)
    ap.add_argument("--steps", type=int, help="steps per run (default 20; quick 12; smoke 4)")
    ap.add_argument("--warmup", type=int, help="steps excluded at the start of each run (default 3; smoke 1)")
    ap.add_argument("--repeats", type=int, help="runs of each (default 6; quick 4; smoke 1)")
    args = common.parse(ap, argv)
    steps = args.steps or (4 if args.smoke else 12 if args.quick else 20)
    warmup = args.warmup or (1 if args.smoke else 3)
    repeats = args.repeats or (1 if args.smoke else 4 if args.quick else 6)
    if not 1 <= warmup < steps - 1:
        ap.error("need 1 <= --warmup < --steps - 1")
    config = "configs/tiny.yaml" if args.smoke else "configs/quickstart.yaml"

    with tempfile.TemporaryDirectory() as tmp:
        data = common.prepare_pydoc(Path(tmp) / "data")
        _, vocab = load_tokenizer(data)

        def cfg_for(run: str):
            # Validation and the checkpoint only happen at the last step (outside the timed window);
            # keep them short. Everything else is the config as `trace-dist train` would run it.
            return load_config([common.REPO / config], [
                f"data.path={data}", f"train.output_dir={Path(tmp) / run}", f"train.max_steps={steps}",
                "checkpoint.resume=none", "train.eval_batches=1", "train.samples_to_log=0"])

        runs: dict[str, list[list[tuple[float, int]]]] = {"trainer": [], "bare": []}
        bookkeeping = []  # trainer seconds per step outside its own step timer
        for r in range(repeats):  # A B A B ...
            stamps = trainer_run(cfg_for(f"trainer{r}"))
            runs["trainer"].append(steps_of(stamps, warmup))
            bookkeeping += [(b[0] - a[0]) - b[2] for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
            runs["bare"].append(steps_of(bare_run(cfg_for(f"bare{r}"), vocab), warmup))
    cfg = cfg_for("report")

    tokens = [n for _, n in runs["bare"][0]]
    if any([n for _, n in run] != tokens for rs in runs.values() for run in rs):
        raise RuntimeError("the trainer and the bare loop did not see the same batches")
    rates = {k: [sum(tokens) / sum(t for t, _ in run) for run in rs] for k, rs in runs.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: sum(tokens) / sum(min(run[i][0] for run in rs) for i in range(len(tokens))) for k, rs in runs.items()}
    ratio, median_ratio = best["trainer"] / best["bare"], med["trainer"] / med["bare"]
    keep_ms = 1e3 * statistics.median(bookkeeping)
    step_ms = 1e3 * sum(tokens) / med["trainer"] / len(tokens)
    m = cfg.model
    print(f"\ntrainer vs bare DeepSpeed loop: {config} model ({m.n_layer}x{m.n_embd}, ZeRO-{cfg.zero.stage}, "
          f"{cfg.precision}, micro-batch {cfg.train.micro_batch_size}), 1 rank, {args.threads} thread(s), "
          f"{steps} steps/run, first {warmup} excluded, {repeats} runs each interleaved")
    common.table(["loop", "tokens/s (best per step)", "tokens/s (median run)", "runs (tokens/s)"],
                 [[k, f"{best[k]:,.0f}", f"{med[k]:,.0f}", " ".join(f"{x:,.0f}" for x in v)]
                  for k, v in rates.items()]
                 + [["trainer / bare", f"{ratio:.3f}", f"{median_ratio:.3f}", "goal >= 0.95 (best per step)"]])
    print(f"trainer bookkeeping outside its step timer: {keep_ms:.2f} ms/step median "
          f"({100 * keep_ms / step_ms:.2f} % of a {step_ms:.0f} ms step)")
    return common.emit({"train_over_bare_ratio": round(ratio, 4), "median_run_ratio": round(median_ratio, 4),
                        "trainer_tokens_per_s": round(best["trainer"], 1), "bare_tokens_per_s": round(best["bare"], 1),
                        "bookkeeping_ms_per_step": round(keep_ms, 3), "step_ms": round(step_ms, 1),
                        "steps": steps, "warmup": warmup, "repeats": repeats, "threads": args.threads,
                        "config": config})


if __name__ == "__main__":
    main()
