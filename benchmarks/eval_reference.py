"""The batch-1 likelihood pass of `trace-dist eval` as it was before batching: the reference that
batched evaluation must reproduce (tests/test_evaluate.py) and the "batch-1" side of
benchmarks/eval_throughput.py. It lives with the benchmarks, which the tests already import from.

Each document runs alone (a batch of one, trimmed to its length) and the model draws its own noise
from the global RNG, seeded by (seed, content hash) before each document; nothing is padded. (The
model's `log_weights` now decodes the S samples as one batch; it draws them in the order the former
sample-by-sample loop did, so the numbers are those of the code before batching.)
"""

from __future__ import annotations

import torch

from trace_dist import evaluate, metrics
from trace_dist.sampling import stable_seed


@torch.no_grad()
def likelihood_pass_batch1(model, examples: list[dict], iw_samples: int, seed: int, device
                           ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Trimmed batches of one -> (named float64 sums, one row per document), as
    `evaluate.likelihood_pass` returns them."""
    sums, rows = evaluate.empty_sums(model), []
    for ex in examples:
        key = evaluate.example_key(ex)
        ex = {k: v.to(device) for k, v in ex.items()}
        torch.manual_seed(stable_seed(seed, "likelihood", key))
        out = model(ex)
        lw = model.log_weights(ex, iw_samples)                              # [1, S]
        values = {"rec": out.rec_sum, "kl": out.kl_sum, "kl_per_segment": out.kl_per_segment_sum,
                  "seg_count": out.seg_count, "num_bytes": ex["num_bytes"].sum(), "num_words": ex["num_words"].sum(),
                  **metrics.iw_sums(lw.cpu(), ex["loss_mask"].sum(1).cpu())}
        row = {"key": key, "prompt": ex["tokens"][0][ex["prompt_mask"][0]].tolist(),
               "text": ex["tokens"][0][ex["loss_mask"][0]].tolist()}
        if model.has_latent:
            post = {k: v.cpu() for k, v in model.posterior(ex).items()}
            values.update({f"au_{k}": v for k, v in metrics.au_stats(post["mean"], post["seg_mask"]).items()})
            row.update(innov_mean=post["innov_mean"][0], innov_logvar=post["innov_logvar"][0],
                       seg_mask=post["seg_mask"][0])
        sums = {k: v + values[k].detach().cpu().double() for k, v in sums.items()}
        rows.append(row)
    return sums, rows
