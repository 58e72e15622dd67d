"""Shared test setup: CPU DeepSpeed, pinned threads (numbers are compared), tiny prepared data."""

import os

# Before torch is imported anywhere: DeepSpeed on CPU/gloo, one thread per process so that
# 2-rank runs do not oversubscribe the 2 cores and losses compare bit for bit.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
