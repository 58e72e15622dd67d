"""The TRACE training loop on a DeepSpeed engine: `python -m trace_dist.train --config X.yaml [k=v ...]`.

Runs under the `deepspeed` launcher, torchrun, Ray Train (`run_training(cfg, report=...)`) or as
one plain process. Each optimizer step:

    for each micro-batch:  seed(seed, rank, data_position)   # noise is a function of position
                           out = engine(batch, beta, free_bits)
                           all ranks agree the loss is finite, else the batch is dropped
                           engine.backward(out.loss); engine.step()
    reduce sums over ranks -> TensorBoard / metrics.jsonl / progress bar

Everything a resumed run needs is the checkpoint (model, optimizer, scheduler) plus three
integers (step, data position, skipped counts): the KL weight is a function of the step, the
data stream a function of (seed, rank, position) and the sampling noise likewise, so a run
killed and resumed reproduces the uninterrupted loss curve exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from trace_dist import checkpoint
from trace_dist.config import TraceConfig, load_config
from trace_dist.distributed import DistInfo, all_reduce_sum, init_distributed
from trace_dist.errors import UserError
from trace_dist.files import atomic_write
from trace_dist.launch import follow_wrapper
from trace_dist.runlock import RunLock
from trace_dist.schedule import kl_beta
from trace_dist.tblog import TensorBoard

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


def step_seed(seed: int, rank: int, position: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + position) % (2**63 - 1)


def segment_means(kl_sums: torch.Tensor, counts: torch.Tensor) -> dict[int, float]:
    """Mean KL at each segment position that some example reached: {position: mean}."""
    return {k: (kl_sums[k] / counts[k]).item() for k in range(len(counts)) if counts[k] > 0}


def drop_records_after(path: Path, step: int) -> None:
    """Remove the records of steps after `step` from a jsonl log (a killed run logged steps that its
    resume runs again), keeping every earlier line as it was."""
    if not path.exists():
        return
    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line torn by the kill
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [x for x in lines if keep(x)]
    if len(kept) != len(lines):
        atomic_write(path, "".join(kept))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: TraceConfig, report: Optional[Report] = None, lock_token: Optional[str] = None):
        import deepspeed

        from trace_dist.data import load_tokenizer
        from trace_dist.model import TRACE

        self.cfg, self.report = cfg, report
        self.dist: DistInfo = init_distributed()
        self.lock = self._lock_run_dir(lock_token)
        self.tokenizer_file = Path(cfg.data.path) / "tokenizer.json"
        self.tokenizer, self.vocab = load_tokenizer(cfg.data.path)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = TRACE(cfg.model, self.vocab)

        resume = checkpoint.find_resume(cfg, warn=self.log)
        ds_config = cfg.deepspeed_config_dict(self.dist.world_size)
        load_tag = None
        if resume is not None:
            save_dir, load_tag, meta = resume
            if meta["world_size"] != self.dist.world_size and meta.get("zero_stage", 0) > 0:
                self.log(f"checkpoint {load_tag} was written by {meta['world_size']} ranks, resuming on "
                         f"{self.dist.world_size}: converting it to DeepSpeed's universal format")
                load_tag = checkpoint.to_universal(save_dir, load_tag, self.dist.is_main)
                ds_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                    config=ds_config)
        self.state = {"step": 0, "data_position": 0, "nonfinite_total": 0, "skipped_steps": 0, "tokens": 0}
        if resume is not None:
            _, client = self.engine.load_checkpoint(str(save_dir), tag=load_tag)
            self.state.update(client["trace"])
            self.log(f"resumed from {save_dir / resume[1]} at step {self.state['step']}")
        self._prompts: Optional[list[list[int]]] = None  # conditional: the prompts samples continue
        # events past the resumed step belong to the lost stretch of a killed run: TensorBoard purges them
        self.tb = TensorBoard(cfg.tensorboard_dir, enabled=cfg.tensorboard and self.dist.is_main,
                              purge_step=self.state["step"] + 1)
        if self.dist.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "val_metrics.jsonl", "samples.jsonl"):
                drop_records_after(cfg.run_dir / name, self.state["step"])
            atomic_write(cfg.run_dir / "config.yaml", cfg.to_yaml())
            self.tb.text("config", "```yaml\n" + cfg.to_yaml() + "\n```", self.state["step"])

    # ------------------------------------------------------------------ helpers
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

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[trace-dist] {msg}", file=sys.stderr, flush=True)

    def _jsonl(self, name: str, record: dict) -> None:
        if self.dist.is_main:
            with open(self.cfg.run_dir / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _save(self) -> Path:
        return checkpoint.save(self.engine, self.cfg, self.state, self.tokenizer_file, self.dist.is_main)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from trace_dist.data import train_loader

        cfg, d = self.cfg, self.dist
        batches = iter(train_loader(cfg.data, self.vocab, cfg.train.micro_batch_size, d.rank, d.world_size,
                                    cfg.train.seed, start_step=self.state["data_position"],
                                    conditional=cfg.model.conditional))
        self.preempt, self.nonfinite_in_row = Preemption(), 0
        bar = None
        if cfg.train.progress and d.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.max_steps, initial=self.state["step"], desc="train", dynamic_ncols=True)
        result = {"status": "completed", "last_checkpoint": self.state["step"]}
        self.engine.train()
        try:
            while self.state["step"] < cfg.train.max_steps:
                t0 = time.perf_counter()
                beta = kl_beta(cfg.kl, self.state["step"], cfg.train.max_steps)
                sums, out = self._optimizer_step(batches, beta)
                self.state["step"] += 1
                self.state["tokens"] += int(sums[3].item())
                record = self._train_record(sums, beta, out, time.perf_counter() - t0)
                self._log_step(record, bar)

                step = self.state["step"]
                validate = step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps
                if validate:
                    result["val"] = self.validate()
                if sums[6].item() > 0:  # preemption requested on some rank
                    self.log(f"preempted at step {step}: saving a checkpoint, then exiting")
                    self._save()
                    return {"status": "preempted", "step": step}
                report = validate and self.report is not None  # Tune wants a checkpoint with each report
                if step % cfg.checkpoint.interval == 0 or step == cfg.train.max_steps or report:
                    tag_dir = self._save()
                    result["last_checkpoint"] = step
                    if report:
                        self.report(dict(result["val"], step=step), str(tag_dir))
            if self.report is None and "val" in result:  # under Tune the tuner writes the trial's hparams
                self.tb.hparams(self.cfg.flat(), {f"hparams/{k}": v for k, v in result["val"].items()},
                                self.state["step"])
        finally:
            self.preempt.restore()
            if bar is not None:
                bar.close()
            self.tb.close()
            if self.lock is not None:
                self.lock.release()
        result.update(self.state)
        return result

    def _optimizer_step(self, batches, beta: float):
        """grad_accum micro-batches and one DeepSpeed update; returns the sums reduced over ranks:
        [loss, rec, kl, tokens, examples, micro-batches, preempt, bad samples, kl/segment[K], count[K]]."""
        K = self.cfg.model.max_segments
        sums = torch.zeros(8 + 2 * K, dtype=torch.float64)
        for _ in range(self.cfg.train.grad_accum):
            out, bad = self._finite_forward(batches, beta)
            self.engine.backward(out.loss)
            self.engine.step()
            sums[:8] += torch.tensor([out.loss.item(), out.rec_sum.item(), out.kl_sum.item(), out.num_tokens.item(),
                                      out.num_examples.item(), 1.0, float(self.preempt.requested), bad],
                                     dtype=torch.float64)
            sums[8:] += torch.cat([out.kl_per_segment_sum.detach(), out.seg_count]).double().cpu()
        if self.engine.was_step_applied():
            self.nonfinite_in_row = 0
        else:  # DeepSpeed found a non-finite gradient norm and skipped the update
            self.state["skipped_steps"] += 1
            self._nonfinite("gradient norm, update skipped")
        return all_reduce_sum(sums), out

    def _finite_forward(self, batches, beta: float):
        """Draw micro-batches until one has a finite loss on every rank (the others are dropped
        before backward, on all ranks alike); returns it and the bad samples the stream reported."""
        bad = 0.0
        while True:
            out, batch = self._forward(next(batches), beta)
            bad += batch["bad_samples"].item()
            if all_reduce_sum(torch.tensor([float(not torch.isfinite(out.loss))])).item() == 0:
                return out, bad
            self.state["nonfinite_total"] += 1
            self._nonfinite("loss, batch skipped")

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_in_row += 1
        self.log(f"step {self.state['step']}: non-finite {what} ({self.nonfinite_in_row} in a row)")
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
            raise NonFiniteError(f"{self.nonfinite_in_row} non-finite steps in a row at step {self.state['step']}; "
                                 f"stopping. The last good checkpoint is {self.cfg.checkpoint_dir / 'latest'}")

    def _log_step(self, record: dict, bar) -> None:
        self._jsonl("metrics.jsonl", record)
        step = self.state["step"]
        if step % self.cfg.train.log_interval == 0 or step == 1:
            self.tb.scalars({k: v for k, v in record.items() if k != "step"}, step, prefix="train/")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")

    def _forward(self, batch: dict, beta: float):
        self.state["data_position"] += 1
        torch.manual_seed(step_seed(self.cfg.train.seed, self.dist.rank, self.state["data_position"]))
        batch = to_device(batch, self.dist.device)
        out = self.engine(batch, beta=beta, free_bits=self.cfg.kl.free_bits)
        if self.state["data_position"] in self.cfg.train.fault_nonfinite_at:
            out.loss = out.loss * float("nan")
        return out, batch

    def _train_record(self, sums: torch.Tensor, beta: float, out, seconds: float) -> dict:
        n_micro = max(sums[5].item(), 1.0)
        tokens, examples = max(sums[3].item(), 1.0), max(sums[4].item(), 1.0)
        record = {
            "step": self.state["step"],
            "loss": sums[0].item() / n_micro,
            "rec": sums[1].item() / tokens,
            "kl": sums[2].item() / examples,
            "beta": beta,
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": sums[3].item() / seconds,
            "samples_per_s": sums[4].item() / seconds,
            "kl_floor_per_segment": float(out.kl_floor),
            "nonfinite_total": self.state["nonfinite_total"],
            "skipped_steps": self.state["skipped_steps"],
            "bad_samples": sums[7].item(),
        }
        K = self.cfg.model.max_segments
        record.update({f"kl_per_segment/{k:02d}": v for k, v in segment_means(sums[8:8 + K], sums[8 + K:]).items()})
        record.update({f"aux/{k}": float(v.detach()) for k, v in out.aux.items()})
        return record

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict:
        from trace_dist.data import eval_loader

        cfg, d = self.cfg, self.dist
        self.engine.eval()
        K = cfg.model.max_segments
        sums = torch.zeros(4 + 2 * K, dtype=torch.float64)
        loader = eval_loader(cfg.data, self.vocab, "valid", cfg.train.micro_batch_size, d.rank, d.world_size,
                             conditional=cfg.model.conditional)
        for i, batch in enumerate(loader):
            if i >= cfg.train.eval_batches:
                break
            torch.manual_seed(step_seed(cfg.train.seed + 1, d.rank, i))
            out = self.engine(to_device(batch, d.device), beta=1.0, free_bits=0.0)
            sums += torch.cat([torch.stack([out.rec_sum.double(), out.kl_sum.double(), out.num_tokens.double(),
                                            out.num_examples.double()]).cpu(),
                               out.kl_per_segment_sum.double().cpu(), out.seg_count.double().cpu()])
        sums = all_reduce_sum(sums)
        tokens, examples = max(sums[2].item(), 1e-9), max(sums[3].item(), 1e-9)
        nelbo_per_token = (sums[0].item() + sums[1].item()) / tokens
        latent = self.engine.module.latent
        metrics = {
            "val_loss": nelbo_per_token,
            "val_rec": sums[0].item() / tokens,
            "val_kl": sums[1].item() / examples,
            "val_elbo": -(sums[0].item() + sums[1].item()) / examples,
            "val_ppl_bound": math.exp(nelbo_per_token),
            "val_kl_floor_per_segment": 0.0 if latent is None else latent.kl_floor,
            "val_examples": sums[3].item(),
        }
        step = self.state["step"]
        if cfg.train.samples_to_log:
            metrics.update(self._samples(step))
        self.tb.scalars(metrics, step, prefix="val/")
        self.tb.scalars({f"segment_{k:02d}": v for k, v in segment_means(sums[4:4 + K], sums[4 + K:]).items()},
                        step, prefix="val/kl_per_segment/")
        self._jsonl("val_metrics.jsonl", dict(metrics, step=step))
        self.log(f"step {step}: val loss {metrics['val_loss']:.4f}  rec {metrics['val_rec']:.4f}  "
                 f"kl {metrics['val_kl']:.3f}  ppl<= {metrics['val_ppl_bound']:.2f}")
        self.tb.flush()
        self.engine.train()
        return metrics

    def _valid_prompts(self) -> list[list[int]]:
        """The prompts of the first `samples_to_log` valid documents, read as one rank would read the
        whole split, so every rank continues the same prompts."""
        from trace_dist.data import eval_loader

        if self._prompts is None:
            n, self._prompts = self.cfg.train.samples_to_log, []
            for batch in eval_loader(self.cfg.data, self.vocab, "valid", n, 0, 1, conditional=True):
                for tokens, prompt, real in zip(batch["tokens"], batch["prompt_mask"], batch["example_mask"]):
                    if real and len(self._prompts) < n:
                        self._prompts.append(tokens[prompt].tolist())
                if len(self._prompts) == n:
                    break
        return self._prompts

    def _samples(self, step: int) -> dict:
        """Every rank generates the same samples (ZeRO-3 needs all ranks in the forward); rank 0 logs
        them and their diversity (Distinct-n, Self-BLEU-n: what Tune trades against quality)."""
        from trace_dist import metrics

        cfg = self.cfg
        gen_cfg, prompts = cfg.generation, None
        if cfg.model.conditional:
            prompts = self._valid_prompts()
            # prompt + continuation must fit the model's positions
            room = cfg.model.block_size - max(len(p) for p in prompts)
            gen_cfg = gen_cfg.model_copy(update={"max_new_tokens": max(1, min(gen_cfg.max_new_tokens, room))})
        gen = torch.Generator(device=self.dist.device).manual_seed(cfg.train.seed + step)
        ids = self.engine.module.generate(num=cfg.train.samples_to_log, prompts=prompts, gen=gen_cfg,
                                          generator=gen, segment=cfg.data.segment)
        texts = [self.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        self.tb.text("samples", "\n\n".join(f"{i}. {t}" for i, t in enumerate(texts)), step)
        for i, t in enumerate(texts):
            record = {"step": step, "text": t}
            if prompts is not None:
                record["prompt"] = self.tokenizer.decode(prompts[i], skip_special_tokens=True)
            self._jsonl("samples.jsonl", record)
        diversity = metrics.text_metrics([metrics.words(t) for t in texts])
        return {f"sample_{k}" if k == "len_mean" else k: v for k, v in diversity.items()}


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
    except UserError as e:
        print(f"trace-dist train: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"trace-dist train: {e}", file=sys.stderr)
        return 3
    if result["status"] == "completed":
        print(f"[trace-dist] done: {result['step']} steps; checkpoints in {cfg.checkpoint_dir}; "
              f"TensorBoard: tensorboard --logdir {cfg.tensorboard_dir} --host 127.0.0.1", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
