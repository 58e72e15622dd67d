"""Validation during training: loss, reconstruction, KL (per segment position), the PPL bound, the
bound in bits per byte (`val_bpb`) and per word (`val_word_ppl`), and a few generated samples with their
diversity.

Collective: every rank evaluates `train.eval_batches` micro-batches of its part of the valid split
(named sums, one reduction) and generates the same samples (ZeRO-3 needs every rank in each
forward). A conditional model continues the prompts of the first valid documents.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from trace_dist.config import TraceConfig
from trace_dist.distributed import DistInfo, accumulate, all_reduce_named
from trace_dist.metrics import per_text


def step_seed(seed: int, rank: int, position: int) -> int:
    """The sampling-noise seed of one micro-batch: a function of its position, so resumes reproduce it."""
    return (seed * 1_000_003 + rank * 7_919 + position) % (2**63 - 1)


def segment_means(kl_sums: torch.Tensor, counts: torch.Tensor) -> dict[int, float]:
    """Mean KL at each segment position that some example reached: {position: mean}."""
    return {k: (kl_sums[k] / counts[k]).item() for k in range(len(counts)) if counts[k] > 0}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Validator:
    def __init__(self, cfg: TraceConfig, engine, dist: DistInfo, vocab, tokenizer):
        self.cfg, self.engine, self.dist, self.vocab, self.tokenizer = cfg, engine, dist, vocab, tokenizer
        self._prompts: Optional[list[list[int]]] = None  # conditional: the prompts samples continue

    @torch.no_grad()
    def __call__(self, step: int) -> tuple[dict[str, float], dict[int, float], list[str], Optional[list[str]]]:
        """-> (metrics by name, mean KL per segment position, sample texts, their prompts or None)."""
        self.engine.eval()
        try:
            metrics, kl_per_segment = self._losses()
            texts, prompts = self._samples(step) if self.cfg.train.samples_to_log else ([], None)
        finally:
            self.engine.train()
        if texts:
            metrics.update(self._diversity(texts))
        return metrics, kl_per_segment, texts, prompts

    def _losses(self) -> tuple[dict[str, float], dict[int, float]]:
        from trace_dist.data import eval_loader

        cfg, d = self.cfg, self.dist
        sums: dict[str, torch.Tensor] = {}
        loader = eval_loader(cfg.data, self.vocab, "valid", cfg.train.micro_batch_size, d.rank, d.world_size,
                             conditional=cfg.model.conditional)
        for i, batch in enumerate(loader):
            if i >= cfg.train.eval_batches:
                break
            torch.manual_seed(step_seed(cfg.train.seed + 1, d.rank, i))
            out = self.engine(to_device(batch, d.device), beta=1.0, free_bits=0.0)
            accumulate(sums, {"rec": out.rec_sum, "kl": out.kl_sum, "tokens": out.num_tokens,
                              "examples": out.num_examples, "kl_per_segment": out.kl_per_segment_sum,
                              "segments": out.seg_count, "bytes": batch["num_bytes"].sum(),
                              "words": batch["num_words"].sum()})
        s = all_reduce_named(sums)
        tokens, examples = max(s["tokens"].item(), 1e-9), max(s["examples"].item(), 1e-9)
        rec, kl = s["rec"].item(), s["kl"].item()
        text = per_text(rec + kl, max(s["bytes"].item(), 1e-9), max(s["words"].item(), 1e-9))
        latent = self.engine.module.latent
        metrics = {
            "val_loss": (rec + kl) / tokens,  # the per-token negative ELBO
            "val_rec": rec / tokens,
            "val_kl": kl / examples,
            "val_elbo": -(rec + kl) / examples,
            "val_ppl_bound": math.exp((rec + kl) / tokens),
            # the same bound per byte and per word of the text: comparable across data.segment
            "val_bpb": text["bpb"],
            "val_word_ppl": text["word_ppl"],
            "kl_floor": 0.0 if latent is None else latent.kl_floor,  # per segment, nats
            "val_examples": s["examples"].item(),
        }
        return metrics, segment_means(s["kl_per_segment"], s["segments"])

    def _samples(self, step: int) -> tuple[list[str], Optional[list[str]]]:
        cfg = self.cfg
        gen_cfg, prompts = cfg.generation, None
        if cfg.model.conditional:
            prompts = self._valid_prompts()
            # prompt + continuation must fit the model's positions
            room = cfg.model.block_size - max(len(p) for p in prompts)
            gen_cfg = gen_cfg.model_copy(update={"max_new_tokens": max(1, min(gen_cfg.max_new_tokens, room))})
        gen = torch.Generator(device=self.dist.device).manual_seed(cfg.train.seed + step)
        ids = self.engine.module.generate(num=cfg.train.samples_to_log, prompts=prompts, gen=gen_cfg,
                                          generator=gen, segment=cfg.data.segment)
        decode = lambda x: self.tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
        return [decode(x) for x in ids], None if prompts is None else [decode(p) for p in prompts]

    def _valid_prompts(self) -> list[list[int]]:
        """The prompts of the first `samples_to_log` valid documents, read as one rank would read the
        whole split, so every rank continues the same prompts."""
        from trace_dist.data import eval_loader

        if self._prompts is None:
            n, self._prompts = self.cfg.train.samples_to_log, []
            for batch in eval_loader(self.cfg.data, self.vocab, "valid", n, 0, 1, conditional=True):
                for tokens, prompt, real in zip(batch["tokens"], batch["prompt_mask"], batch["example_mask"]):
                    if real and len(self._prompts) < n:
                        self._prompts.append(tokens[prompt].tolist())
                if len(self._prompts) == n:
                    break
        return self._prompts

    @staticmethod
    def _diversity(texts: list[str]) -> dict[str, float]:
        """Distinct-n, Self-BLEU-n and length of the samples: what Tune trades against quality."""
        from trace_dist import metrics

        diversity = metrics.text_metrics([metrics.words(t) for t in texts])
        return {f"sample_{k}" if k == "len_mean" else k: v for k, v in diversity.items()}
