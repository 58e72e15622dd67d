"""Rank-0 TensorBoard writer (DeepSpeed >= 0.18.3 no longer logs the loss itself)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class TensorBoard:
    """A SummaryWriter on rank 0 and a no-op elsewhere, so call sites need no rank checks."""

    def __init__(self, log_dir: Path | str, enabled: bool = True, purge_step: int | None = None):
        """purge_step: a resumed run's first step; events at or after it from earlier runs are hidden."""
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step) if enabled else None

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(prefix + k, float(v), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        """The HPARAMS tab entry of this run (in this run's own directory, unlike add_hparams)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(hp, metrics):
            self.writer.file_writer.add_summary(summary)
        self.scalars(metrics, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
