"""Rank 0's record of a run: metrics.jsonl, val_metrics.jsonl, samples.jsonl, TensorBoard, the progress bar.

Other ranks get a RunLog that writes nothing, so the trainer never asks which rank it is to log.
One name per quantity: a training record's key is its TensorBoard tag under `train/` and its key in
metrics.jsonl; a validation metric's key (what Ray Tune receives, and the key in val_metrics.jsonl)
is `val_<name>` and its tag `val/<name>` (`kl_floor` and the sample diversity keep their own names:
`val/kl_floor`, `val/distinct_2`). KL per segment position k is `train/kl_per_segment/kk` and
`val/kl_per_segment/kk`. The data stream's bad-shard warnings (which name the shard) become
TensorBoard text `data/bad_shards` at the step whose batches were being read. A resumed run first
drops what a killed run logged past the checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

from trace_dist.config import TraceConfig
from trace_dist.data.stream import log as data_log
from trace_dist.files import atomic_write
from trace_dist.tblog import TensorBoard

FILES = ("metrics.jsonl", "val_metrics.jsonl", "samples.jsonl")


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


def per_segment(values: dict[int, float]) -> dict[str, float]:
    """{position: mean KL} -> {'kl_per_segment/kk': mean KL}."""
    return {f"kl_per_segment/{k:02d}": v for k, v in values.items()}


def printer(is_main: bool) -> Callable[[str], None]:
    """`[trace-dist] msg` on stderr from rank 0, nothing elsewhere (also for parts built before the RunLog)."""
    def message(msg: str) -> None:
        if is_main:
            print(f"[trace-dist] {msg}", file=sys.stderr, flush=True)
    return message


class RunLog:
    def __init__(self, cfg: TraceConfig, is_main: bool, start_step: int,
                 on_step: Optional[Callable[[dict], None]] = None):
        """start_step: the step the run (re)starts from; `on_step(record)` is called after each
        training record is written (benchmarks time the loop with it)."""
        self.cfg, self.enabled, self.on_step = cfg, is_main, on_step
        self.message = printer(is_main)
        if is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            for name in FILES:
                drop_records_after(cfg.run_dir / name, start_step)
        # events past the resumed step belong to the lost stretch of a killed run: TensorBoard purges them
        self.tb = TensorBoard(cfg.tensorboard_dir, enabled=cfg.tensorboard and is_main, purge_step=start_step + 1)
        self.next_step = start_step + 1  # the step whose batches the stream is reading
        data_log.addFilter(self._bad_shard_text)
        self.bar = None
        if cfg.train.progress and is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _bad_shard_text(self, record) -> bool:
        """A filter on the data stream's logger (not a handler: the record still reaches stderr as
        before): a bad-shard warning (`extra` bad_shard) also becomes TensorBoard text."""
        if hasattr(record, "bad_shard"):
            self.tb.text("data/bad_shards", record.getMessage(), self.next_step)
        return True

    def _jsonl(self, name: str, record: dict) -> None:
        if self.enabled:
            with open(self.cfg.run_dir / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    def config(self, step: int) -> None:
        """The config this run trains with: `config.yaml` in the run directory and TensorBoard text."""
        if self.enabled:
            atomic_write(self.cfg.run_dir / "config.yaml", self.cfg.to_yaml())
            self.tb.text("config", "```yaml\n" + self.cfg.to_yaml() + "\n```", step)

    def step(self, record: dict) -> None:
        """One optimizer step: metrics.jsonl always, TensorBoard every train.log_interval steps."""
        self._jsonl("metrics.jsonl", record)
        step = record["step"]
        self.next_step = step + 1
        if step % self.cfg.train.log_interval == 0 or step == 1:
            self.tb.scalars({k: v for k, v in record.items() if k != "step"}, step, prefix="train/")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.2f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", mfu=f"{record['mfu']:.1%}")
        if self.on_step is not None and self.enabled:
            self.on_step(record)

    def validation(self, step: int, metrics: dict[str, float], kl_per_segment: dict[int, float]) -> None:
        self._jsonl("val_metrics.jsonl", dict(metrics, step=step))
        self.tb.scalars({f"val/{k.removeprefix('val_')}": v for k, v in metrics.items()}, step)
        self.tb.scalars(per_segment(kl_per_segment), step, prefix="val/")
        self.message(f"step {step}: val loss {metrics['val_loss']:.4f}  rec {metrics['val_rec']:.4f}  "
                     f"kl {metrics['val_kl']:.3f}  ppl<= {metrics['val_ppl_bound']:.2f}")
        self.tb.flush()

    def samples(self, step: int, texts: list[str], prompts: Optional[list[str]]) -> None:
        self.tb.text("samples", "\n\n".join(f"{i}. {t}" for i, t in enumerate(texts)), step)
        for i, text in enumerate(texts):
            self._jsonl("samples.jsonl", {"step": step, "text": text, **({"prompt": prompts[i]} if prompts else {})})

    def hparams(self, final_val: dict[str, float], step: int) -> None:
        """The HPARAMS tab entry: the flat config with the final validation metrics."""
        self.tb.hparams(self.cfg.flat(), {f"hparams/{k}": v for k, v in final_val.items()}, step)

    def close(self) -> None:
        data_log.removeFilter(self._bad_shard_text)
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
