"""Per-rank model-state memory and communication per step of ZeRO 0/1/2/3, 2 gloo ranks.

Two spawned ranks each build, for every stage in turn, a fresh TRACE engine (quickstart shapes at
n_embd 256, fp32 or --precision bf16, the project's ds_config.json with stage3_param_persistence_threshold 0 so that
ZeRO-3 partitions every parameter) and train a few steps on the built-in corpus. Counted from the
engine's actual tensors, at the moment the inner torch optimizer's step() is called (so the
gradients are the ones held at step time), each byte once (views into one buffer are merged):
  params     module parameters as held (ZeRO-3: the param.ds_tensor partition);
  master     the ZeRO optimizer's fp32 partition where it is a separate copy of the parameters;
  grads      .grad of module and optimizer parameters, ZeRO's partitioned gradient buffers;
  optimizer  the torch optimizer's state (AdamW exp_avg, exp_avg_sq, step);
  buffers    every other tensor the ZeRO optimizer holds at that moment (the reduce_bucket_size
             gradient buckets are already released by then): reported apart, not in the goal.
Communication: torch.distributed's collectives are wrapped in the rank processes (before DeepSpeed
binds them); one whole training step after warm-up is counted, as the payload of each call (the
full tensor: all-reduce buffer, reduce-scatter input, all-gather output), per rank.
Goal: zero3_over_zero0_bytes (params+master+grads+optimizer, ZeRO-3 / ZeRO-0) <= 0.55, and the same in
bf16 (the GPU setting; bf16 params and gradients, fp32 master and Adam moments), whose figures carry
the suffix _bf16 (zero3_over_zero0_bytes_bf16).

    python benchmarks/zero_memory.py [--smoke] [--steps 3] [--precision bf16]
"""

from __future__ import annotations

import functools
import gc
import inspect
import tempfile
import threading
from pathlib import Path

import common  # first: pins threads, DS_ACCELERATOR
import torch

from trace_dist.spawn import run_ranks

# key -> (ZeRO stage, zero_optimization patch): the four stages as ds_config.json has them, then two
# variants that show what the knobs named in docs/scaling.md change.
VARIANTS = {"zero0": (0, {}), "zero1": (1, {}), "zero2": (2, {}), "zero3": (3, {}),
            "zero2_reduce": (2, {"use_multi_rank_bucket_allreduce": False}),
            "zero3_subgroup": (3, {"sub_group_size": 100_000})}
LABELS = {"zero2_reduce": "2, use_multi_rank_bucket_allreduce off", "zero3_subgroup": "3, sub_group_size 1e5"}
CATEGORIES = ("params", "master", "grads", "optimizer")  # claim order: a byte belongs to the first
MB = 2 ** 20

# Collective -> the argument whose bytes are the call's payload (the full, unsharded tensor).
PAYLOAD = {"all_reduce": "tensor", "all_reduce_coalesced": "tensors", "reduce": "tensor", "broadcast": "tensor",
           "reduce_scatter": "input_list", "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input",
           "all_gather": "tensor_list", "all_gather_into_tensor": "output_tensor",
           "_all_gather_base": "output_tensor", "all_to_all_single": "input"}


# ---------------------------------------------------------------------------- communication
class CommCounter:
    """Wraps torch.distributed collectives; counts calls and payload bytes while `on` (outermost
    call only: one collective implemented through another is counted once)."""

    def __init__(self) -> None:
        self.on, self.counts, self._depth = False, {}, threading.local()
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, arg in PAYLOAD.items():
            fn = getattr(c10d, name, None)
            if fn is not None:
                wrapped = self._wrap(name, fn, arg)
                setattr(c10d, name, wrapped)
                setattr(dist, name, wrapped)

    def _wrap(self, name: str, fn, arg: str):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if self.on and depth == 0:
                payload = sig.bind(*args, **kwargs).arguments[arg]
                tensors = payload if isinstance(payload, (list, tuple)) else [payload]
                calls, nbytes = self.counts.get(name, (0, 0))
                self.counts[name] = (calls + 1, nbytes + sum(t.numel() * t.element_size() for t in tensors))
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
        return counted


# ---------------------------------------------------------------------------- memory
def _tensors(obj, depth: int = 3, seen: set | None = None):
    """Tensors reachable from obj through attributes, lists, tuples and dicts (bounded depth)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth - 1, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth - 1, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)) and \
            type(obj).__module__.startswith("deepspeed"):
        yield from _tensors(vars(obj), depth - 1, seen)


def unique_bytes(claims: list[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Bytes per category, each byte of memory counted once, for the first category that claims it."""
    covered: list[tuple[int, int]] = []
    out: dict[str, int] = {}
    for cat, t in claims:
        if t is None or t.numel() == 0 or t.device.type == "meta":
            continue
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        new = hi - lo
        for a, b in covered:
            new -= max(0, min(hi, b) - max(lo, a))
        out[cat] = out.get(cat, 0) + max(new, 0)
        covered.append((lo, hi))
    return out


def snapshot(engine, inner) -> dict[str, int]:
    module = engine.module
    opt_params = [p for g in inner.param_groups for p in g["params"]]
    claims = [("params", getattr(p, "ds_tensor", p.data)) for p in module.parameters()]
    claims += [("master", p) for p in opt_params]
    # fp32 master copies: ZeRO-1/2, ZeRO-3, and DeepSpeed's BF16_Optimizer (bf16 at ZeRO-0)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        claims += [("master", t) for t in getattr(engine.optimizer, name, [])]
    claims += [("grads", p.grad) for p in list(module.parameters()) + opt_params]
    claims += [("grads", t) for t in _tensors(getattr(engine.optimizer, "averaged_gradients", None))]
    for name in ("grad_partitions_flat_buffer", "fp32_groups_gradients_flat"):  # ZeRO-3, BF16_Optimizer
        claims += [("grads", t) for t in _tensors(getattr(engine.optimizer, name, None))]
    claims += [("optimizer", t) for state in inner.state.values() for t in _tensors(state)]
    if engine.optimizer is not inner:  # a ZeRO optimizer: whatever else it holds
        claims += [("buffers", t) for t in _tensors(vars(engine.optimizer))]
    return unique_bytes(claims)


# ---------------------------------------------------------------------------- one rank
def rank_main(data: str, model_overrides: list[str], steps: int) -> dict:
    counter = CommCounter()  # before DeepSpeed binds torch.distributed's functions
    import deepspeed

    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer, train_loader
    from trace_dist.distributed import init_distributed
    from trace_dist.model.trace import TRACE

    d = init_distributed()
    _, vocab = load_tokenizer(data)
    results = {}
    for key, (stage, patch) in VARIANTS.items():
        cfg = load_config([common.REPO / "configs/quickstart.yaml"],
                          [f"data.path={data}", "data.num_workers=0", "train.micro_batch_size=2",
                           f"zero.stage={stage}", *model_overrides])
        ds = cfg.deepspeed_config_dict(d.world_size)
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0, **patch)
        torch.manual_seed(cfg.train.seed)
        model = TRACE(cfg.model, vocab)
        n_params = sum(p.numel() for p in model.parameters())
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        held: dict = {}
        step_fn = inner.step

        def step_and_count(*args, **kwargs):
            held.update(snapshot(engine, inner))
            return step_fn(*args, **kwargs)
        inner.step = step_and_count
        batches = iter(train_loader(cfg.data, vocab, cfg.train.micro_batch_size, d.rank, d.world_size,
                                    cfg.train.seed))
        for i in range(steps):
            if i == steps - 1:  # the counted step
                counter.on, counter.counts = True, {}
            out = engine(next(batches), beta=1.0)
            engine.backward(out.loss)
            engine.step()
        counter.on = False
        results[key] = {"bytes": dict(held), "comm": dict(counter.counts), "n_params": n_params}
        del engine, model, inner, step_fn, held
        gc.collect()
    return results


# ---------------------------------------------------------------------------- driver
def main(argv=None) -> dict:
    ap = common.arg_parser(__doc__, smoke="tests: a 2x64 model")
    ap.add_argument("--steps", type=int, default=3, help="training steps per stage (the last is counted)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (warm-up, then the counted step)")

    model = (["model.n_layer=2", "model.n_embd=64", "model.n_head=2"] if args.smoke
             else ["model.n_embd=256", "model.n_head=4"]) + [f"precision={args.precision}"]
    with tempfile.TemporaryDirectory() as tmp:
        data = common.prepare_pydoc(Path(tmp) / "data")
        ranks = run_ranks(rank_main, 2, str(data), model, args.steps, tmp_path=tmp)
    r0 = ranks[0]
    n_params, param_bytes = r0["zero0"]["n_params"], 4 * r0["zero0"]["n_params"]
    total = {k: sum(r0[k]["bytes"].get(c, 0) for c in CATEGORIES) for k in VARIANTS}
    comm = {k: sum(b for _, b in r0[k]["comm"].values()) for k in VARIANTS}
    label = {k: LABELS.get(k, str(VARIANTS[k][0])) for k in VARIANTS}
    print(f"\nper-rank memory at the optimizer step, 2 ranks, {args.precision}, {n_params / 1e6:.2f} M parameters "
          f"({param_bytes / MB:.1f} MB fp32); MB, rank 0")
    common.table(["ZeRO", *CATEGORIES, "states total", "/ ZeRO-0", "bytes/param", "other buffers"],
                 [[label[k], *(f"{r0[k]['bytes'].get(c, 0) / MB:.1f}" for c in CATEGORIES), f"{total[k] / MB:.1f}",
                   f"{total[k] / total['zero0']:.3f}", f"{total[k] / n_params:.1f}",
                   f"{r0[k]['bytes'].get('buffers', 0) / MB:.1f}"] for k in VARIANTS])
    ops = sorted({op for k in VARIANTS for op in r0[k]["comm"]})
    print(f"\ncollective payload per training step per rank, MB (calls); fp32 params = {param_bytes / MB:.1f} MB")
    common.table(["ZeRO", *ops, "total", "/ param bytes"],
                 [[label[k], *(f"{r0[k]['comm'][op][1] / MB:.1f} ({r0[k]['comm'][op][0]})" if op in r0[k]["comm"]
                               else "-" for op in ops),
                   f"{comm[k] / MB:.1f}", f"{comm[k] / param_bytes:.2f}"] for k in VARIANTS])
    figures = {"zero3_over_zero0_bytes": round(total["zero3"] / total["zero0"], 4),
               **{f"{k}_over_zero0_bytes": round(total[k] / total["zero0"], 4) for k in VARIANTS if k != "zero0"},
               "n_params": n_params,
               **{f"{k}_state_bytes": total[k] for k in VARIANTS},
               **{f"{k}_comm_over_param_bytes": round(comm[k] / param_bytes, 3) for k in VARIANTS},
               "comm_bytes_by_op": {k: {op: b for op, (_, b) in r0[k]["comm"].items()} for k in VARIANTS},
               "state_bytes_by_kind": {k: r0[k]["bytes"] for k in VARIANTS}}
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    return common.emit({f"{k}{suffix}": v for k, v in figures.items()})


if __name__ == "__main__":
    main()
