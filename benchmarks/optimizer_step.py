"""The offloaded optimizer step: DeepSpeedCPUAdam vs torch AdamW on the quickstart model's parameters.

Under `zero.offload_optimizer` the fp32 master weights, their gradients and the Adam moments live on
the CPU and the step runs there; `train.adam: auto` then picks DeepSpeedCPUAdam (see
TraceConfig.adam_impl). This times exactly that step, side by side in one process, same threads,
on the parameters of configs/quickstart.yaml's TRACE (vocabulary of the built-in corpus) with
random gradients:
  torch     torch.optim.AdamW (foreach; what `train.adam: torch` runs)
  torch_fused  torch.optim.AdamW(fused=True) (not selectable in DeepSpeed; for reference)
  cpu_adam  deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode=True) (JIT-built on first use: reported)
Each repeat runs one step of every optimizer in turn (so load on the box hits them alike); each
time is the fastest repeat. Goal: cpu_adam_over_torch_adam <= 0.5.

    python benchmarks/optimizer_step.py [--smoke] [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common  # first: pins threads, DS_ACCELERATOR
import torch

from trace_dist.config import load_config
from trace_dist.model.trace import TRACE


def params_of_quickstart(smoke: bool) -> list[torch.Tensor]:
    cfg = load_config([common.REPO / "configs/quickstart.yaml"], ["model.n_layer=1"] if smoke else [])
    with tempfile.TemporaryDirectory() as tmp:
        from trace_dist.data import load_tokenizer
        _, vocab = load_tokenizer(common.prepare_pydoc(Path(tmp) / "pydoc"))
    torch.manual_seed(0)
    return [p.detach() for p in TRACE(cfg.model, vocab).parameters()]


def clone_with_grads(params: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    out = []
    for p in params:
        q = torch.nn.Parameter(p.clone())
        q.grad = torch.randn(p.shape, generator=g) * 1e-3
        out.append(q)
    return out


def main(argv=None) -> dict:
    ap = common.arg_parser(__doc__, smoke="tests: a 1-layer model, 3 repeats", threads=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = common.parse(ap, argv)
    repeats = 3 if args.smoke else args.repeats
    base = params_of_quickstart(args.smoke)
    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)

    from deepspeed.ops.adam import DeepSpeedCPUAdam
    t0 = time.perf_counter()
    cpu_adam = DeepSpeedCPUAdam(clone_with_grads(base), adamw_mode=True, **hp)   # JIT-builds cpu_adam once
    build_s = time.perf_counter() - t0
    optimizers = {"torch": torch.optim.AdamW(clone_with_grads(base), foreach=True, **hp),
                  "torch_fused": torch.optim.AdamW(clone_with_grads(base), fused=True, **hp),
                  "cpu_adam": cpu_adam}
    best = {k: float("inf") for k in optimizers}
    for _ in range(repeats + 1):                       # the first round warms up (allocates moments)
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            best[name] = min(best[name], time.perf_counter() - t0)
    # Same hyper-parameters, same gradients: the kernels must agree (DeepSpeed's to ~1e-5).
    ref = optimizers["torch"].param_groups[0]["params"]
    diff = max(max((a - b).abs().max().item() for a, b in zip(ref, o.param_groups[0]["params"]))
               for o in optimizers.values())

    n = sum(p.numel() for p in base)
    print(f"\noffloaded optimizer step, {n / 1e6:.2f} M fp32 parameters (quickstart TRACE), "
          f"{torch.get_num_threads()} thread(s), fastest of {repeats}; cpu_adam JIT build/load {build_s:.1f} s")
    common.table(["optimizer", "step ms", "ns / parameter", "/ torch AdamW"],
                 [[k, f"{v * 1e3:.2f}", f"{v / n * 1e9:.2f}", f"{v / best['torch']:.3f}"] for k, v in best.items()])
    print(f"max |param difference| after {repeats + 1} steps: {diff:.2e}")
    return common.emit({"cpu_adam_over_torch_adam": round(best["cpu_adam"] / best["torch"], 3),
                        "torch_fused_over_torch_adam": round(best["torch_fused"] / best["torch"], 3),
                        "step_ms": {k: round(v * 1e3, 3) for k, v in best.items()}, "parameters": n,
                        "cpu_adam_build_s": round(build_s, 1), "max_param_diff": diff,
                        "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
