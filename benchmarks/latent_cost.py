"""The cost of TRACE's encoder and latents: a TRACE training step over a plain-LM step.

Side by side in one process, same dtype and threads: TRACE (`model.latent=segments`) and the same
decoder without latents (`model.latent=none`: no encoder pass, no latent module) at the same size,
each trained (forward + backward + torch AdamW, no DeepSpeed: benchmarks/trainer_overhead.py covers
the trainer) on the same B full-length documents of T = block_size tokens in K segments
(compute_efficiency.full_batch). The two models' steps alternate, repeat after repeat, so that a
change of load on the box hits both alike; each time is the fastest of the repeats.
Goal: trace_over_lm_step_ratio <= 2.1 (the encoder re-runs the decoder's blocks over the text,
so ~2x the stack's FLOPs is the floor; the latent module should add little on top).

    python benchmarks/latent_cost.py [--quick | --smoke] [--threads 1]
"""

from __future__ import annotations

import time

import common  # first: pins threads
import torch

from compute_efficiency import full_batch, sync, train_step
from trace_dist.model.trace import TRACE
from trace_dist.model.config import ModelConfig
from trace_dist.vocab import Vocab


def main(argv=None) -> dict:
    ap = common.arg_parser(__doc__, smoke="tests: a 2x64 model, T 64", quick="fewer repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--batch", type=int, default=8, help="documents per step")
    args = ap.parse_args(argv)
    common.pin_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        size, B, repeats = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, latent_size=16, max_segments=4), 2, 2
    else:
        size = dict(n_layer=4, n_head=6, n_embd=384, block_size=256, latent_size=32, max_segments=8)
        B, repeats = args.batch, 5 if args.quick else 9
    vocab = Vocab(size=512 if args.smoke else 4096, bos=1, eos=2, pad=0, sep=3)
    batch = full_batch(vocab, B, size["block_size"], size["max_segments"], device)

    steps, params, times = {}, {}, {}
    for latent in ("segments", "none"):
        torch.manual_seed(0)
        model = TRACE(ModelConfig(**size, latent=latent), vocab).to(device)
        params[latent] = sum(p.numel() for p in model.parameters())
        steps[latent] = train_step(model, batch, device)
        steps[latent]()  # warm-up
        times[latent] = []
    for _ in range(repeats):  # alternate the two, so that load on the box hits both alike
        for latent, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[latent].append(time.perf_counter() - t0)
    trace_s, lm_s = min(times["segments"]), min(times["none"])
    tokens = B * size["block_size"]

    print(f"\nTRACE vs plain LM training step on {device.type}, {torch.get_num_threads()} thread(s); "
          f"{size['n_layer']}x{size['n_embd']} T={size['block_size']} V={vocab.size}, {B} documents/step "
          f"({tokens} tokens, {size['max_segments']} segments each), fastest of {repeats} alternating repeats")
    common.table(["model", "parameters", "step (fwd+bwd+AdamW)", "tokens/s"],
                 [[name, f"{params[latent] / 1e6:.2f} M", f"{s * 1e3:.0f} ms", f"{tokens / s:.0f}"]
                  for name, latent, s in (("TRACE (latent=segments)", "segments", trace_s),
                                          ("plain LM (latent=none)", "none", lm_s))])
    print(f"TRACE / LM step: {trace_s / lm_s:.2f}  (goal <= 2.1)")
    return common.emit({"trace_over_lm_step_ratio": round(trace_s / lm_s, 3), "trace_step_ms": round(trace_s * 1e3, 1),
                        "lm_step_ms": round(lm_s * 1e3, 1), "tokens_per_step": tokens,
                        "threads": torch.get_num_threads(), "device": device.type})


if __name__ == "__main__":
    main()
