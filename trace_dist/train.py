"""The TRACE training loop on a DeepSpeed engine: `python -m trace_dist.train --config X.yaml [k=v ...]`.

Runs under the `deepspeed` launcher, torchrun, Ray Train (`run_training(cfg, report=...)`) or as
one plain process. Each optimizer step:

    draw grad_accum micro-batches; N = their predicted tokens summed over ranks (one collective)
    for each micro-batch:  seed(seed, rank, data_position)   # noise is a function of position
                           out = engine(batch, beta, free_bits)
                           all ranks agree the loss is finite, else the batch is dropped
                           engine.backward(micro_batch_loss(out, N)); engine.step()
    named sums reduced over ranks in one collective -> RunLog (metrics.jsonl, TensorBoard, progress bar)

The `Trainer` is this loop over parts with one job each: `engine.build_engine` (model, resume,
DeepSpeed), `validator.Validator` (validation, samples, their diversity), `runlog.RunLog` (rank 0's
files, TensorBoard, tqdm), `runlock.RunLock` (one run per directory) and `checkpoint.save`.

Everything a resumed run needs is the checkpoint (model, optimizer, scheduler) plus a few
integers (step, data position, skipped counts): the KL weight is a function of the step, the
data stream a function of (seed, rank, position) and the sampling noise likewise, so a run
killed and resumed reproduces the uninterrupted loss curve exactly.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from trace_dist import checkpoint, mfu
from trace_dist.config import TraceConfig, load_config
from trace_dist.data import tokens_by_source
from trace_dist.distributed import (DistInfo, accumulate, all_reduce_named, all_reduce_sum, init_distributed,
                                    leave_distributed)
from trace_dist.engine import build_engine, full_grad_norm
from trace_dist.metrics import per_text
from trace_dist.errors import UserError
from trace_dist.launch import follow_wrapper
from trace_dist.model.trace import predicted_tokens
from trace_dist.runlock import RunLock
from trace_dist.runlog import RunLog, per_segment, printer
from trace_dist.schedule import kl_beta
from trace_dist.validator import Validator, segment_means, step_seed, to_device

Report = Callable[[dict, str], None]


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits 0."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some Ray workers): no handler
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: TraceConfig, report: Optional[Report] = None, lock_token: Optional[str] = None,
                 on_step: Optional[Callable[[dict], None]] = None):
        """report(val_metrics, checkpoint_dir): after each validation (Ray Tune); lock_token: the run
        lock our launcher holds for us; on_step(record): after each step's record is logged."""
        from trace_dist.data import load_tokenizer, tokenizer_file

        self.cfg, self.report = cfg, report
        self.dist: DistInfo = init_distributed()
        self.lock = self._lock_run_dir(lock_token)
        try:
            self.tokenizer_file = tokenizer_file(cfg.data.path)  # a verified local copy for a remote dataset
            self.sources = [s.name for s in cfg.data.sources()]
            self.tokenizer, self.vocab = load_tokenizer(cfg.data.path)
            self.engine, self.state = build_engine(cfg, self.dist, self.vocab, log=printer(self.dist.is_main))
            self.flops_per_token = self.engine.module.flops_per_token()
            precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
            self.peak = mfu.device_peak(self.dist.device, precision,
                                        configured=cfg.train.peak_tflops and cfg.train.peak_tflops * 1e12)
            self.log = RunLog(cfg, self.dist.is_main, start_step=self.state["step"], on_step=on_step)
            self.log.config(self.state["step"])
            self.validate = Validator(cfg, self.engine, self.dist, self.vocab, self.tokenizer)
        except BaseException:  # a long-lived process (Ray worker, tests) must not keep the directory locked
            if self.lock is not None:
                self.lock.release()
            raise

    def _lock_run_dir(self, held_by: Optional[str]) -> Optional[RunLock]:
        """Rank 0 locks the run directory (unless our launcher holds the lock for us); every rank
        learns whether it could, so all of them stop together before anything is written."""
        lock, error = None, None
        if self.dist.is_main:
            try:
                lock = RunLock.acquire(self.cfg.run_dir, held_by=held_by)
            except UserError as e:
                error = e
        if all_reduce_sum(torch.tensor([float(error is not None)])).item() > 0:
            raise error or UserError(f"rank 0 could not lock {self.cfg.run_dir}")
        return lock

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from trace_dist.data import train_loader

        cfg, d = self.cfg, self.dist
        batches = iter(train_loader(cfg.data, self.vocab, cfg.train.micro_batch_size, d.rank, d.world_size,
                                    cfg.train.seed, start_step=self.state["data_position"],
                                    conditional=cfg.model.conditional))
        self.preempt, self.nonfinite_in_row = Preemption(), 0
        self.grad_norm: Optional[float] = None  # full_grad_norm of the last step, where DeepSpeed has none
        result = {"status": "completed", "last_checkpoint": self.state["step"]}
        self.engine.train()
        try:
            while self.state["step"] < cfg.train.max_steps:
                t0 = time.perf_counter()
                beta = kl_beta(cfg.kl, self.state["step"], cfg.train.max_steps)
                sums, out = self._optimizer_step(batches, beta)
                self.state["step"] += 1
                self.state["tokens"] += int(sums["tokens"].item())
                self.log.step(self._train_record(sums, beta, out, time.perf_counter() - t0))

                step = self.state["step"]
                validate = step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps
                if validate:
                    result["val"] = self._validate(step)
                if sums["preempt"].item() > 0:  # preemption requested on some rank
                    self.log.message(f"preempted at step {step}: saving a checkpoint, then exiting")
                    self._save()
                    return {"status": "preempted", "step": step}
                report = validate and self.report is not None  # Tune wants a checkpoint with each report
                if step % cfg.checkpoint.interval == 0 or step == cfg.train.max_steps or report:
                    tag_dir = self._save()
                    result["last_checkpoint"] = step
                    if report:
                        self.report(dict(result["val"], step=step), str(tag_dir))
            if self.report is None and "val" in result:  # under Tune the tuner writes the trial's hparams
                self.log.hparams(result["val"], self.state["step"])
        finally:
            self.preempt.restore()
            self.log.close()
            if self.lock is not None:
                self.lock.release()
        result.update(self.state)
        return result

    def _optimizer_step(self, batches, beta: float) -> tuple[dict[str, torch.Tensor], object]:
        """grad_accum micro-batches and one DeepSpeed update; returns the named sums over micro-batches
        and ranks (one collective) and the last micro-batch's output. The micro-batches are drawn first
        so that every rank knows the step's global token count before the first backward."""
        drawn = [self._draw(batches) for _ in range(self.cfg.train.grad_accum)]
        global_tokens = global_token_count([batch for _, batch in drawn])
        sums: dict[str, torch.Tensor] = {}
        for i, (position, batch) in enumerate(drawn):
            out, counts = self._finite_forward(position, batch, batches, beta)
            loss = micro_batch_loss(out, global_tokens, self.engine)
            self.engine.backward(loss)
            if i == len(drawn) - 1:  # before step() zeroes them
                self.grad_norm = full_grad_norm(self.engine)
            self.engine.step()
            accumulate(sums, {"loss": loss, "rec": out.rec_sum, "kl": out.kl_sum, "tokens": out.num_tokens,
                              "examples": out.num_examples, "micro_batches": 1.0,
                              "preempt": float(self.preempt.requested), "kl_per_segment": out.kl_per_segment_sum,
                              "segments": out.seg_count, **counts})
        if self.engine.was_step_applied():
            self.nonfinite_in_row = 0
        else:  # DeepSpeed found a non-finite gradient norm and skipped the update
            self.state["skipped_steps"] += 1
            self._nonfinite("gradient norm, update skipped")
        return all_reduce_named(sums), out

    def _draw(self, batches) -> tuple[int, dict]:
        """The next micro-batch and its data position (which seeds its sampling noise)."""
        self.state["data_position"] += 1
        return self.state["data_position"], to_device(next(batches), self.dist.device)

    def _finite_forward(self, position: int, batch: dict, batches, beta: float):
        """Forward `batch`, or, while the loss is non-finite on some rank, the next batch drawn (the
        others are dropped before backward, on all ranks alike); returns the output and the data
        counts of every batch used or dropped: `bad_samples` (skipped by the stream) and any `cut_*`."""
        counts: dict[str, torch.Tensor] = {}
        while True:
            out = self._forward(position, batch, beta)
            accumulate(counts, {k: v for k, v in batch.items() if k == "bad_samples" or k.startswith("cut_")})
            if all_reduce_sum(torch.tensor([float(not torch.isfinite(out.loss))])).item() == 0:
                accumulate(counts, {"bytes": batch["num_bytes"].sum(), "words": batch["num_words"].sum()})
                if len(self.sources) > 1:  # a mixture: the tokens each source contributed
                    accumulate(counts, tokens_by_source(batch, self.sources))
                return out, counts
            self.state["nonfinite_total"] += 1
            self._nonfinite("loss, batch skipped")
            position, batch = self._draw(batches)

    def _forward(self, position: int, batch: dict, beta: float):
        torch.manual_seed(step_seed(self.cfg.train.seed, self.dist.rank, position))
        out = self.engine(batch, beta=beta, free_bits=self.cfg.kl.free_bits)
        if position in self.cfg.train.fault_nonfinite_at:
            out.loss = out.loss * float("nan")
        return out

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_in_row += 1
        self.log.message(f"step {self.state['step']}: non-finite {what} ({self.nonfinite_in_row} in a row)")
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
            raise NonFiniteError(f"{self.nonfinite_in_row} non-finite steps in a row at step {self.state['step']}; "
                                 f"stopping. The last good checkpoint is {self.cfg.checkpoint_dir / 'latest'}")

    def _train_record(self, s: dict[str, torch.Tensor], beta: float, out, seconds: float) -> dict:
        tokens, examples = max(s["tokens"].item(), 1.0), max(s["examples"].item(), 1.0)
        per_device = s["tokens"].item() / seconds / self.dist.world_size
        norm = self.engine.get_global_grad_norm()
        norm = self.grad_norm if norm is None else norm
        record = {
            "step": self.state["step"],
            "loss": s["loss"].item() / max(s["micro_batches"].item(), 1.0),
            "rec": s["rec"].item() / tokens,
            "kl": s["kl"].item() / examples,
            "beta": beta,
            "lr": self.engine.get_lr()[0],
            "tokens": self.state["tokens"],
            "tokens_per_s": s["tokens"].item() / seconds,
            "tokens_per_s_per_device": per_device,
            "mfu": mfu.mfu(per_device, self.flops_per_token, self.peak),
            "samples_per_s": s["examples"].item() / seconds,
            "kl_floor": float(out.kl_floor),  # per segment, nats
            # pre-clipping global norm; absent (never a made-up 0) if neither DeepSpeed nor we have it
            **({} if norm is None else {"grad_norm": float(norm)}),
            "nonfinite_total": self.state["nonfinite_total"],
            "skipped_steps": self.state["skipped_steps"],
            "bad_samples": s["bad_samples"].item(),
        }
        record.update({f"data/{k}": v.item() for k, v in s.items() if k.startswith("cut_")})
        record.update({k: v.item() for k, v in s.items() if k.startswith("data/tokens/")})
        # the per-byte / per-word negative ELBO at beta = 1 (segmentation-fair: docs/eval.md)
        record.update(per_text(s["rec"].item() + s["kl"].item(), max(s["bytes"].item(), 1.0), max(s["words"].item(), 1.0)))
        record.update(per_segment(segment_means(s["kl_per_segment"], s["segments"])))
        record.update({f"aux/{k}": float(v.detach()) for k, v in out.aux.items()})
        return record

    def _validate(self, step: int) -> dict:
        metrics, kl_per_segment, texts, prompts = self.validate(step)
        if texts:
            self.log.samples(step, texts, prompts)
        self.log.validation(step, metrics, kl_per_segment)
        return metrics

    def _save(self) -> Path:
        return checkpoint.save(self.engine, self.cfg, self.state, self.tokenizer_file, self.dist.is_main)


def global_token_count(micro_batches: list[dict]) -> torch.Tensor:
    """The predicted tokens of an optimizer step's micro-batches on all ranks (one collective)."""
    local = sum(predicted_tokens(b).item() for b in micro_batches)
    return all_reduce_sum(torch.tensor(float(local), dtype=torch.float64))


def micro_batch_loss(out, global_tokens: torch.Tensor, engine) -> torch.Tensor:
    """What one micro-batch hands `engine.backward` so that the update's gradient is that of
    Σ_global (CE + β·KL_fb) / global_tokens + penalty, however the global batch is split.

    DeepSpeed 0.19.8 divides each micro-batch's loss by gradient_accumulation_steps
    (`engine._scale_loss_by_gas`) and averages the gradient over the data-parallel ranks at every
    ZeRO stage (0: `engine.allreduce_bucket`; 1-2: `gradient_reduction_w_predivide`, `average_tensor`;
    3: `__avg_scatter_grads`): a gradient_predivide_factor f is divided out before the reduction and
    multiplied back after, so the net factor is 1/dp_world_size. Multiplying by both undoes that.
    The idempotency penalty is a per-step term: added to every micro-batch unscaled, DeepSpeed's
    averaging leaves it once. A micro-batch whose loss is non-finite is replaced by the next batch
    of the stream and scaled by the same normaliser (the dropped batch's tokens stay in it: the
    step's count is fixed before the first backward)."""
    scale = engine.gradient_accumulation_steps() * engine.dp_world_size / global_tokens.clamp_min(1).item()
    return out.objective * scale + out.penalty


def run_training(cfg: TraceConfig, report: Optional[Report] = None, lock_token: Optional[str] = None) -> dict:
    """The one training loop (the CLI, the launcher wrapper and Ray Tune trials all come here).
    `lock_token`: the run lock `trace-dist train` holds for these ranks (else rank 0 takes it)."""
    return Trainer(cfg, report, lock_token).train()


# ---------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> tuple[TraceConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m trace_dist.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=[], help="YAML config; repeat to merge left to right")
    p.add_argument("--resume", help="'auto', 'none' or a checkpoint path (sets checkpoint.resume)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # set by `trace-dist train`: host:pid:token of the wrapper (see launch.follow_wrapper)
    p.add_argument("--wrapper", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    return load_config(args.config, overrides), args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
        lock_token = follow_wrapper(args.wrapper) if args.wrapper else None
        result = run_training(cfg, lock_token=lock_token)
    except (UserError, NonFiniteError) as e:
        print(f"trace-dist train: {e}", file=sys.stderr)
        leave_distributed()
        return 3 if isinstance(e, NonFiniteError) else 2
    leave_distributed()
    if result["status"] == "completed":
        print(f"[trace-dist] done: {result['step']} steps; checkpoints in {cfg.checkpoint_dir}; "
              f"TensorBoard: tensorboard --logdir {cfg.tensorboard_dir} --host 127.0.0.1", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
