"""Model FLOP utilisation: TRACE's achieved training FLOP/s over this machine's measured matmul peak.

    achieved FLOP/s = model.flops_per_token() x tokens per step / seconds per step
    flops_per_token = 6 (P_stack + C V) + 12 L C T   (decoder: matmul weights fwd+bwd, attention)
                    + 6 P_stack + 12 L C T            (encoder pass over the same shared blocks)
    P_stack = 12 L C^2, C = n_embd, V = vocab, T = block_size, L = n_layer (trace_dist/model/trace.py)
    MFU = achieved FLOP/s / peak FLOP/s

Side by side in one process, same dtype and threads: (1) torch.matmul at the model's GEMM shapes
(tokens x C x 3C/C/4C, tokens x 4C x C, tokens x C x V) and one large square GEMM; the peak is the
fastest of them; (2) TRACE training steps (forward + backward + torch AdamW, no DeepSpeed: the
trainer's own overhead is benchmarks/trainer_overhead.py) on B full-length documents of T = block_size
tokens in K segments, so every position is a real, counted token. Every time is the fastest of
the repeats; the matmuls are timed before and after the model so that a change of load on the
box shows up as a spread. A torch.profiler pass
over one step splits the step time by op kind (why MFU is what it is).
On CUDA the same script runs the model under bf16 autocast and also reports MFU against the GPU's
nominal dense bf16 peak.
Goal: mfu_pct >= 40 at the benchmark size (4 layers, n_embd 384, T 256, vocab 4096).

    python benchmarks/compute_efficiency.py [--quick | --smoke] [--threads 1]
"""

from __future__ import annotations

import time

import common  # first: pins threads
import torch

from trace_dist.mfu import table_peak
from trace_dist.model.trace import TRACE
from trace_dist.model.config import ModelConfig
from trace_dist.vocab import Vocab

# Op-name fragments -> kind, for the profile split (first match wins; the rest is "other").
KINDS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
         ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
         ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy")),
         ("layernorm", ("layer_norm",)),
         ("gelu", ("gelu",)),
         ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
         ("elementwise / copies", ("aten::add", "aten::mul", "aten::copy_", "aten::cat", "aten::where",
                                   "aten::masked", "aten::index", "aten::embedding", "aten::fill_",
                                   "aten::zero_", "aten::sum", "aten::div", "aten::sub", "aten::clone")))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls after one warm-up call (the one least disturbed by
    other jobs on the box; used alike for the matmuls and the model)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_shapes(cfg: ModelConfig, vocab: int, tokens: int) -> dict[str, tuple[int, int, int]]:
    C = cfg.n_embd
    return {"qkv  (N x C x 3C)": (tokens, C, 3 * C), "proj (N x C x C)": (tokens, C, C),
            "fc   (N x C x 4C)": (tokens, C, 4 * C), "fc2  (N x 4C x C)": (tokens, 4 * C, C),
            "head (N x C x V)": (tokens, C, vocab), "square 2048": (2048, 2048, 2048)}


def matmul_rates(shapes: dict, dtype: torch.dtype, device: torch.device, repeats: int) -> dict[str, float]:
    """FLOP/s of torch.matmul per shape (2 M K N FLOPs per product)."""
    rates = {}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        rates[name] = 2 * m * k * n / timed(lambda: torch.matmul(a, b), device, repeats)
    return rates


def full_batch(vocab: Vocab, B: int, T: int, K: int, device: torch.device) -> dict:
    """B documents of exactly T tokens in K equal segments (each ends with sep, the last with eos)."""
    g = torch.Generator().manual_seed(0)
    L = T // K
    tokens = torch.randint(4, vocab.size, (B, T), generator=g)
    seg_ids = torch.arange(T).div(L, rounding_mode="floor").clamp(max=K - 1).expand(B, T).clone()
    tokens[:, torch.arange(1, K) * L - 1] = vocab.sep
    tokens[:, -1] = vocab.eos
    batch = dict(tokens=tokens, seg_ids=seg_ids, loss_mask=torch.ones(B, T, dtype=torch.bool),
                 prompt_mask=torch.zeros(B, T, dtype=torch.bool), num_segments=torch.full((B,), K),
                 example_mask=torch.ones(B, dtype=torch.bool), bad_samples=torch.tensor(0))
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model: TRACE, batch: dict, device: torch.device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def profile_split(step) -> dict[str, float]:
    """Share of one step's self CPU time by op kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    split: dict[str, float] = {}
    for ev in prof.key_averages():
        name = ev.key.lower()
        kind = next((k for k, frags in KINDS if any(f.lower() in name for f in frags)), "other")
        split[kind] = split.get(kind, 0.0) + ev.self_cpu_time_total
    total = sum(split.values()) or 1.0
    return {k: v / total for k, v in sorted(split.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> dict:
    ap = common.arg_parser(__doc__, smoke="tests: a 2x64 model, T 64", quick="fewer repeats", threads=1)
    ap.add_argument("--batch", type=int, default=8, help="documents per step")
    args = common.parse(ap, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        cfg, B, repeats = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, latent_size=16,
                                      max_segments=4), 2, 2
    else:
        cfg = ModelConfig(n_layer=4, n_head=6, n_embd=384, block_size=256, latent_size=32, max_segments=8)
        B, repeats = args.batch, 3 if args.quick else 7
    vocab = Vocab(size=512 if args.smoke else 4096, bos=1, eos=2, pad=0, sep=3)
    tokens = B * cfg.block_size
    shapes = gemm_shapes(cfg, vocab.size, tokens)
    if args.smoke:
        shapes["square 2048"] = (256, 256, 256)

    before = matmul_rates(shapes, dtype, device, repeats)
    torch.manual_seed(0)
    model = TRACE(cfg, vocab).to(device)
    step = train_step(model, full_batch(vocab, B, cfg.block_size, cfg.max_segments, device), device)
    seconds = timed(step, device, repeats)
    after = matmul_rates(shapes, dtype, device, repeats)
    split = profile_split(step) if device.type == "cpu" else {}

    rates = {k: max(before[k], after[k]) for k in shapes}
    peak = max(rates.values())
    flops_per_token = model.flops_per_token()
    achieved = flops_per_token * tokens / seconds
    mfu = achieved / peak
    # FLOP-weighted rate of the model's own GEMM mix: what a matmul-only step could reach.
    model_shapes = {k: v for k, v in shapes.items() if not k.startswith("square")}
    mix_flops = {k: 2 * m * kk * n for k, (m, kk, n) in model_shapes.items()}
    mix_rate = sum(mix_flops.values()) / sum(mix_flops[k] / rates[k] for k in model_shapes)

    where = f"{device.type}{' ' + torch.cuda.get_device_name(0) if device.type == 'cuda' else ''}"
    print(f"\ncompute efficiency on {where}, {dtype}, {torch.get_num_threads()} thread(s); model "
          f"{cfg.n_layer}x{cfg.n_embd} T={cfg.block_size} V={vocab.size}, {B} documents/step "
          f"({tokens} tokens), {repeats} timed repeats")
    common.table(["matmul shape", "GFLOP/s before", "GFLOP/s after"],
                 [[k, f"{before[k] / 1e9:.1f}", f"{after[k] / 1e9:.1f}"] for k in shapes])
    rows = [["flops_per_token (model.flops_per_token())", f"{flops_per_token / 1e6:.2f} MFLOP"],
            ["step time (fwd+bwd+AdamW)", f"{seconds * 1e3:.0f} ms"],
            ["achieved", f"{achieved / 1e9:.1f} GFLOP/s"],
            ["measured matmul peak (max above)", f"{peak / 1e9:.1f} GFLOP/s"],
            ["model GEMM mix rate (FLOP-weighted)", f"{mix_rate / 1e9:.1f} GFLOP/s"],
            ["MFU = achieved / peak", f"{100 * mfu:.1f} %  (goal >= 40 %)"],
            ["achieved / GEMM mix rate", f"{100 * achieved / mix_rate:.1f} %"]]
    figures = {"mfu_pct": round(100 * mfu, 2), "achieved_gflops": round(achieved / 1e9, 2),
               "peak_matmul_gflops": round(peak / 1e9, 2), "gemm_mix_gflops": round(mix_rate / 1e9, 2),
               "achieved_over_gemm_mix_pct": round(100 * achieved / mix_rate, 2),
               "flops_per_token": flops_per_token, "tokens_per_s": round(tokens / seconds, 1),
               "step_ms": round(seconds * 1e3, 1), "threads": torch.get_num_threads(), "device": where,
               "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(0)
        nominal = table_peak(name)
        if nominal is not None:
            rows.append(["MFU vs nominal bf16 peak", f"{100 * achieved / nominal:.1f} %  ({nominal / 1e12:.0f} TFLOP/s)"])
            figures["mfu_nominal_bf16_pct"] = round(100 * achieved / nominal, 2)
    common.table(["figure", "value"], rows)
    if split:
        print()
        common.table(["op kind (torch.profiler, self CPU time)", "share of step"],
                     [[k, f"{100 * v:.1f} %"] for k, v in split.items()])
        figures["time_split_pct"] = {k: round(100 * v, 1) for k, v in split.items()}
    return common.emit(figures)


if __name__ == "__main__":
    main()
