"""Seeded sampling helpers shared by `trace-dist eval` and `trace-dist generate`.

Every random draw of evaluation and generation is seeded from printable parts (the run's seed, a
purpose, a document's content hash or a sample's index), never from the rank, so the same inputs give
the same draws on any number of ranks and in any batch composition.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical on every rank and platform."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def seeded_generator(device, *parts) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stable_seed(*parts))


def prior_chunk(model, start: int, count: int, seed: int, gen, device, segment: str,
                latent_path: Optional[str] = None) -> list[list[int]]:
    """Samples start..start+count-1 from the prior, decoded as one KV-cached batch; sample i draws
    only from its own generator, seeded by (seed, "generate", i): the same draws whichever rank,
    process or chunk draws it (the text too, but for float rounding of differently sized batches)."""
    generators = [seeded_generator(device, seed, "generate", start + j) for j in range(count)]
    return model.generate(num=count, gen=gen, generator=generators, segment=segment, latent_path=latent_path)


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)
