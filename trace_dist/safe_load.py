"""Pickle-safe checkpoint reading: no file we load can run code.

DeepSpeed reads its own checkpoints with `torch.load(..., weights_only=False)` in dozens of places
(its checkpoint engine on resume, `zero_to_fp32` for eval/generate/export, `ds_to_universal` and
universal loading), and which of our paths reads a checkpoint is chosen from `trace_meta.json`, a
file the checkpoint's author controls. So the guard cannot be per call site: `install()` makes every
`torch.load` of the process, and of every process it starts, a weights-only load:

  1. `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`: torch then ignores `weights_only=False`; children inherit it
     (the `ds_to_universal` subprocess and its worker pool, anything else we spawn).
  2. The allow-list: exactly the non-tensor classes DeepSpeed puts in our checkpoints (found by
     saving real ZeRO 0-3 checkpoints, with and without optimizer offload, fp32 and bf16, plus their
     universal conversion, and listing what `weights_only=True` refuses).
  3. `torch.load` is wrapped so that a refused, truncated or unreadable file ends in a one-line
     `CheckpointError` naming the file instead of a traceback deep inside DeepSpeed.

The trainer calls `install()` at start-up, `load_for_inference` calls it before reading anything,
and a DeepSpeed tool run as a subprocess goes through `python -m trace_dist.safe_load MODULE ARGS...`
so that the allow-list and the one-line errors hold there too.
"""

from __future__ import annotations

import functools
import os
import pickle
import runpy
import sys

import torch

from trace_dist.errors import CheckpointError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def allowed_classes() -> list[type]:
    """What DeepSpeed pickles besides tensors and plain containers (DeepSpeed 0.19): the ZeRO stage
    and loss scaler in every ZeRO >= 1 optimizer file, and the flat-buffer fragment addresses of
    ZeRO 1/2. `DynamicLossScaler` is what fp16 (GPU only) saves in place of `LossScaler`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _reason(e: Exception) -> str:
    """One line out of torch's multi-paragraph refusal: the line that names what was refused."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "WeightsUnpickler" in line]
    return (named or lines or [type(e).__name__])[0][:300]


def _weights_only_load(load):
    @functools.wraps(load)
    def safe_load(f, *args, weights_only=None, **kwargs):
        try:
            return load(f, *args, weights_only=True, **kwargs)
        except OSError:
            raise  # a missing file is the caller's business (DeepSpeed probes for optional files)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{f}: refused to load, it holds more than tensors and plain data "
                                  f"({_reason(e)})") from None
        except (RuntimeError, EOFError, KeyError, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable (truncated or not a PyTorch file: {_reason(e)})") from None

    safe_load.trace_dist_safe = True
    return safe_load


def install() -> None:
    """Make every torch.load in this process and its children weights-only (idempotent)."""
    os.environ[FORCE_ENV] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # torch refuses both set at once
    torch.serialization.add_safe_globals(allowed_classes())
    if not getattr(torch.load, "trace_dist_safe", False):
        torch.load = _weights_only_load(torch.load)


def main(argv: list[str]) -> int:
    """`python -m trace_dist.safe_load MODULE ARGS...`: run a module (a DeepSpeed tool) with install()."""
    if not argv:
        print("usage: python -m trace_dist.safe_load MODULE [ARGS...]", file=sys.stderr)
        return 2
    install()
    sys.argv = list(argv)
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except CheckpointError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
