"""Data configuration: where the prepared shards are and how they are streamed."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEGMENT_PATTERN = re.compile(r"^(sentence|fixed:[1-9][0-9]*)$")


def parse_segment(spec: str) -> tuple[str, int]:
    """'sentence' -> ('sentence', 0); 'fixed:N' -> ('fixed', N)."""
    if not SEGMENT_PATTERN.match(spec):
        raise ValueError(f"segment must be 'sentence' or 'fixed:N' with N >= 1, got {spec!r}")
    kind, _, n = spec.partition(":")
    return kind, int(n or 0)


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field("data/pydoc", description="directory written by `trace-dist prepare`")
    segment: str = Field("sentence", description="'sentence' or 'fixed:N'; may differ from the prepared one")
    max_segments: int = Field(16, ge=1, description="segments kept per document (the rest is cut)")
    max_segment_tokens: int = Field(64, ge=2, description="tokens kept per segment, separator included")
    max_tokens: int = Field(512, ge=8, description="tokens kept per document, prompt included")
    num_workers: int = Field(1, ge=0, description="DataLoader workers per rank")
    shuffle_buffer: int = Field(256, ge=1)
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0,
                                    description="bad samples tolerated before the run stops")
    bad_check_min_samples: int = Field(100, ge=1,
                                       description="samples read before max_bad_fraction is enforced")

    @field_validator("segment")
    @classmethod
    def _segment(cls, v: str) -> str:
        parse_segment(v)
        return v
