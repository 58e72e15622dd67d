"""docs/scaling.md §3 from measured inputs: projected weak-scaling efficiency of a GPT-2-base TRACE.

Reads benchmarks/results.json (written by run_all.py): zero_memory.py's collective payload per
training step by op and ZeRO variant (2 ranks, fp32, in bytes, over the parameter bytes), and
builds the GPT-2-base TRACE here to count its parameters Ψ and `flops_per_token()`. Then, per ZeRO
variant, link rate and GPU count n (ring cost model; the assumptions are the table in §2):
  compute   = flops_per_token x tokens per GPU per micro-step / (MFU x peak)
  comm      = sum over the measured collectives of  factor(n) x size / bandwidth + hops(n) x alpha x buckets
              all-reduce: factor 2(n-1)/n, hops 2(n-1); reduce, reduce-scatter, all-gather: (n-1)/n, n-1
              size: gradient collectives G = 4 Ψ (fp32 communication), all-gathers P = 2 Ψ (bf16 params)
  efficiency = compute / (compute + comm)     (no overlap: overlap_comm is false)
With gradient accumulation A: ZeRO-0/1 communicate once per optimizer step, ZeRO-2 reduces
gradients every micro-step (read from DeepSpeed's source), ZeRO-3 gathers and reduces every micro-step.
The tables replace the text between the markers in docs/scaling.md, so the document cannot drift
from the measurements; `--check` fails if it has.

    python benchmarks/scaling_projection.py [--check] [--results benchmarks/results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DOC = REPO / "docs/scaling.md"
START, END = "<!-- scaling_projection.py: start -->", "<!-- scaling_projection.py: end -->"

# Assumptions (docs/scaling.md §2).
TOKENS_PER_GPU = 8 * 1024          # 8 documents of T = 1024 per micro-step
MFU, PEAK = 0.40, 989e12           # assumed 40 % of H100/H200 dense bf16
ALPHA, BUCKETS = 5e-6, 3           # per-hop latency; bucket calls per collective (Ψ / 5e7-element buckets)
LINKS_GBIT = (100, 200, 400)
LINK_EFFICIENCY = 0.8
GPUS = (8, 16, 32, 64, 128, 256)
GRAD_OPS = {"all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
            "all_reduce_coalesced"}
GATHER_OPS = {"all_gather", "all_gather_into_tensor", "_all_gather_base"}
NAMES = {"all_reduce": "all-reduce G", "reduce": "reduce G", "reduce_scatter_tensor": "reduce-scatter G",
         "reduce_scatter": "reduce-scatter G", "all_gather_into_tensor": "all-gather P", "all_gather": "all-gather P"}
# zero_memory.py's variants with their own collectives (zero3_subgroup is a memory knob: ZeRO-3's traffic)
LABELS = {"zero0": "0", "zero1": "1", "zero2": "2", "zero2_reduce": "2, bucket all-reduce off", "zero3": "3"}


def gpt2_base():
    """Ψ and training FLOPs per token of the GPT-2-base TRACE the projection is for."""
    from trace_dist.model.trace import TRACE
    from trace_dist.model.config import ModelConfig
    from trace_dist.vocab import Vocab

    import torch

    cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, latent_size=32, max_segments=32)
    with torch.device("meta"):        # shapes only: no 125 M parameters allocated
        model = TRACE(cfg, Vocab(size=50257 + 3, bos=50257, eos=50256, pad=50258, sep=50259))
    return sum(p.numel() for p in model.parameters()), model.flops_per_token()


def collectives(results: dict) -> tuple[dict[str, dict[str, float]], dict]:
    """{variant: {op: payload / parameter bytes}} from zero_memory.py's figures (ops under 1 % dropped:
    the overflow-check scalars), and the measurement's provenance."""
    bench = results["benchmarks"]["zero_memory.py"]["figures"]
    param_bytes = 4 * bench["n_params"]
    out = {}
    for variant, ops in bench["comm_bytes_by_op"].items():
        if variant not in LABELS:
            continue
        out[variant] = {op: b / param_bytes for op, b in ops.items() if b / param_bytes >= 0.01}
    return out, {"date": results.get("date"), "n_params": bench["n_params"]}


def comm_seconds(ops: dict[str, float], n: int, psi: int, link_bytes_s: float, micro_steps: int,
                 per_micro: set[str]) -> float:
    """One optimizer step's communication; ops in `per_micro` repeat on every micro-step."""
    total = 0.0
    for op, multiple in ops.items():
        size = (4 if op in GRAD_OPS else 2) * psi * multiple
        factor, hops = (2 * (n - 1) / n, 2 * (n - 1)) if op.startswith("all_reduce") else ((n - 1) / n, n - 1)
        repeats = micro_steps if op in per_micro else 1
        total += repeats * (factor * size / link_bytes_s + hops * ALPHA * BUCKETS)
    return total


def per_micro_ops(variant: str, ops: dict) -> set[str]:
    """Collectives DeepSpeed repeats on every micro-step under gradient accumulation."""
    if variant.startswith("zero3"):
        return set(ops)
    if variant.startswith("zero2"):
        return set(ops) & GRAD_OPS
    return set()


def table(variants: dict, psi: int, flops: float, micro_steps: int) -> list[str]:
    compute = micro_steps * flops * TOKENS_PER_GPU / (MFU * PEAK)
    # variants with the same collectives (and the same accumulation rule) share a row
    rows: dict[tuple, list[str]] = {}
    for v, ops in variants.items():
        per_micro = tuple(sorted(per_micro_ops(v, ops))) if micro_steps > 1 else ()
        key = (tuple(sorted((k, round(m, 2)) for k, m in ops.items())), per_micro)
        rows.setdefault(key, []).append(v)
    lines = ["| ZeRO (collectives per step, measured) | link | comm ms @8 | comm ms @256 | "
             + " | ".join(f"n={n}" for n in GPUS) + " |", "|---" * (4 + len(GPUS)) + "|"]
    for (key, _), names in rows.items():
        ops = variants[names[0]]
        label = " / ".join(LABELS[v] for v in names)
        what = " + ".join(f"{'' if round(m) == 1 else f'{m:.0f} x '}{NAMES.get(op, op)}" for op, m in sorted(ops.items()))
        if micro_steps > 1 and per_micro_ops(names[0], ops):
            what += ", per micro-step: " + "/".join(NAMES.get(o, o).split()[0] for o in sorted(per_micro_ops(names[0], ops)))
        for gbit in LINKS_GBIT:
            bw = gbit / 8 * 1e9 * LINK_EFFICIENCY
            comm = {n: comm_seconds(ops, n, psi, bw, micro_steps, per_micro_ops(names[0], ops)) for n in GPUS}
            eff = " | ".join(f"{100 * compute / (compute + comm[n]):.0f}%" for n in GPUS)
            lines.append(f"| {label} ({what}) | {gbit} Gb/s | {1e3 * comm[8]:.0f} | {1e3 * comm[256]:.0f} | {eff} |")
    return lines


def render(results: dict) -> str:
    psi, flops = gpt2_base()
    variants, source = collectives(results)
    compute_ms = flops * TOKENS_PER_GPU / (MFU * PEAK) * 1e3
    out = [START, "",
           f"Generated by `benchmarks/scaling_projection.py` from `benchmarks/results.json` (run of {source['date']}; "
           f"collectives measured by zero_memory.py on {source['n_params'] / 1e6:.2f} M parameters, 2 ranks) and the "
           f"GPT-2-base TRACE built in the script: **Ψ = {psi / 1e6:.1f} M parameters, flops_per_token = "
           f"{flops / 1e9:.3f} GFLOP**, compute per micro-step {compute_ms:.1f} ms. Do not edit by hand.", "",
           "Gradient accumulation 1 (8 k tokens per GPU per optimizer step):", "",
           *table(variants, psi, flops, 1), "",
           f"Gradient accumulation 8 (64 k tokens per GPU per optimizer step; compute {8 * compute_ms:.0f} ms):", "",
           *table(variants, psi, flops, 8), "", END]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(REPO / "benchmarks/results.json"))
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--check", action="store_true", help="exit 1 if the document differs from the generated tables")
    args = ap.parse_args(argv)
    doc = Path(args.doc)
    text = doc.read_text()
    if START not in text or END not in text:
        print(f"{doc}: markers {START} ... {END} not found", file=sys.stderr)
        return 2
    generated = render(json.loads(Path(args.results).read_text()))
    head, rest = text.split(START, 1)
    new = head + generated + rest.split(END, 1)[1]
    if args.check:
        if new != text:
            print(f"{doc} is out of date: run python benchmarks/scaling_projection.py", file=sys.stderr)
            return 1
        return 0
    doc.write_text(new)
    print(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
