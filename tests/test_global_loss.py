"""The loss is a global per-token mean: one ragged global batch split over ranks and accumulation
steps gives the gradient of the unsplit batch (real DeepSpeed engines, gloo ranks)."""

import pytest
import torch

from dist_utils import run_ranks
from model_batches import make_batch, random_segments

EXAMPLES = 8  # the global batch; 1 rank x 4 micro-batches of 2, 2 ranks x 2 of 2, 1 rank x 1 of 8


def _global_batch(vocab, latent_size: int) -> tuple[dict, torch.Tensor]:
    """8 documents of 1..6 segments (ragged: micro-batches of 2 hold 10 to 60 predicted tokens) and the
    posterior noise of each, so that every split samples the same latents."""
    gen = torch.Generator().manual_seed(0)
    examples = [random_segments(gen, k, vocab=vocab) for k in (1, 1, 2, 1, 6, 5, 3, 4)]
    batch = make_batch(examples, vocab=vocab, T=48)
    del batch["bad_samples"]
    eps = torch.randn(EXAMPLES, 6, latent_size, generator=gen)  # [B, K_max, d]
    return batch, eps


def _rows(batch: dict, eps: torch.Tensor, lo: int, hi: int) -> tuple[dict, torch.Tensor]:
    part = {k: v[lo:hi] for k, v in batch.items()}
    return part, eps[lo:hi, :int(part["num_segments"].max())]


def _gradients(data, out, stage: int, grad_accums: list[int]) -> list[dict[str, torch.Tensor]]:
    """On each rank, for each grad_accum: a fresh engine, this rank's share of the global batch in
    grad_accum micro-batches scaled by train.micro_batch_loss, and the full gradient after the last
    backward (reduced over ranks and micro-batches, before the optimizer step)."""
    import deepspeed

    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer
    from trace_dist.distributed import init_distributed
    from trace_dist.engine import build_engine
    from trace_dist.train import global_token_count, micro_batch_loss

    torch.set_num_threads(1)
    dist = init_distributed()
    _, vocab = load_tokenizer(data)
    results = []
    for grad_accum in grad_accums:
        mbs = EXAMPLES // (dist.world_size * grad_accum)
        cfg = load_config(["configs/tiny.yaml"], [
            f"data.path={data}", f"train.output_dir={out}/ga{grad_accum}", f"zero.stage={stage}",
            f"train.micro_batch_size={mbs}", f"train.grad_accum={grad_accum}", "model.idempotent=penalty"])
        engine, _ = build_engine(cfg, dist, vocab, log=lambda message: None)
        engine.train()
        batch, eps = _global_batch(vocab, cfg.model.latent_size)
        first = dist.rank * mbs * grad_accum
        micro = [_rows(batch, eps, lo, lo + mbs) for lo in range(first, first + mbs * grad_accum, mbs)]
        global_tokens = global_token_count([b for b, _ in micro])
        for i, (b, e) in enumerate(micro):
            output = engine(b, beta=0.5, free_bits=0.02, eps=e)
            engine.backward(micro_batch_loss(output, global_tokens, engine))
            if i < grad_accum - 1:
                engine.step()  # not a boundary: only counts the micro-step
        results.append({n: deepspeed.utils.safe_get_full_grad(p).clone()
                        for n, p in engine.module.named_parameters()})
    return results


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_is_the_same_however_the_global_batch_is_split(tiny_data, tmp_path, monkeypatch, stage):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one_rank = run_ranks(_gradients, 1, tiny_data, tmp_path / "one", stage, [4, 1], tmp_path=tmp_path)[0]
    two_ranks = run_ranks(_gradients, 2, tiny_data, tmp_path / "two", stage, [2], tmp_path=tmp_path)
    accum4, whole, accum2 = one_rank[0], one_rank[1], two_ranks[0][0]
    assert torch.equal(torch.cat([g.flatten() for g in accum2.values()]),
                       torch.cat([g.flatten() for g in two_ranks[1][0].values()]))  # ranks agree
    assert max(g.abs().max().item() for g in whole.values()) > 1e-3  # a real gradient
    for name, g in whole.items():
        assert (accum4[name] - g).abs().max().item() <= 1e-6, f"1 rank x 4 vs 1 x 1: {name}"
        assert (accum2[name] - g).abs().max().item() <= 1e-6, f"2 ranks x 2 vs 1 x 1: {name}"
