"""Data configuration: where the prepared shards are (one set or a weighted mixture) and how they are streamed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from trace_dist.data.fetch import is_remote

SEGMENT_PATTERN = re.compile(r"^(sentence|fixed:[1-9][0-9]*)$")


def parse_segment(spec: str) -> tuple[str, int]:
    """'sentence' -> ('sentence', 0); 'fixed:N' -> ('fixed', N)."""
    if not SEGMENT_PATTERN.match(spec):
        raise ValueError(f"segment must be 'sentence' or 'fixed:N' with N >= 1, got {spec!r}")
    kind, _, n = spec.partition(":")
    return kind, int(n or 0)


def check_location(path: str) -> str:
    if path.startswith("pipe:") and "{shard}" not in path:
        raise ValueError(f"a pipe: location needs a {{shard}} placeholder for the file name, got {path!r}")
    return path


Location = Annotated[str, AfterValidator(check_location)]  # a local directory, http(s):// or pipe:


def default_name(path: str) -> str:
    """A source's name from its location: the last part before any {shard} (s3://b/corpus/{shard} -> corpus)."""
    stem = path.split("{shard}")[0].rstrip("/ ")
    return re.sub(r"[^A-Za-z0-9._-]", "_", re.split(r"[/:\s]", stem)[-1]) or "data"


class Source(BaseModel):
    """One prepared set of a mixture."""

    model_config = ConfigDict(extra="forbid")

    path: Location = Field(description="a directory, an http(s) base URL or a pipe: template with {shard}")
    weight: float = Field(gt=0, description="relative share of the documents drawn for training")
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9._-]+$",
                                description="used in logs (data/tokens/NAME); default: the last part of path")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Location = Field("data/pydoc", description="directory written by `trace-dist prepare`, an http(s) base URL "
                                                "or a pipe: command template with {shard} (see docs/data.md)")
    mixture: list[Source] = Field(default_factory=list,
                                  description="weighted prepared sets to draw training documents from; "
                                              "data.path is then the first one's")
    timeout: float = Field(60.0, gt=0, description="seconds allowed for reading one shard (each try)")
    retries: int = Field(3, ge=0, description="retries of a shard read that failed transiently")
    retry_backoff: float = Field(1.0, ge=0, description="seconds before the first retry, doubled for each next")
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

    @model_validator(mode="after")
    def _mixture(self) -> "DataConfig":
        if not self.mixture:
            return self
        paths = [s.path for s in self.mixture]
        if "path" in self.model_fields_set and self.path not in paths:
            raise ValueError(f"data.path ({self.path}) is not a source of data.mixture; leave it out "
                             f"(with a mixture it is the first source's)")
        names = [s.name or default_name(s.path) for s in self.mixture]
        if len(set(names)) != len(names):
            raise ValueError(f"data.mixture: two sources are named alike ({names}); give them distinct `name`s")
        self.path = self.path if "path" in self.model_fields_set else paths[0]
        return self

    def absolute(self) -> "DataConfig":
        """A copy whose local paths are absolute (for processes started in other directories); URLs unchanged."""
        def pin(path: str) -> str:
            return path if is_remote(path) else str(Path(path).resolve())
        return self.model_copy(update={"path": pin(self.path),
                                       "mixture": [s.model_copy(update={"path": pin(s.path)}) for s in self.mixture]})

    def sources(self) -> list[Source]:
        """The prepared sets training draws from, named: data.mixture, or data.path alone with weight 1."""
        mixture = self.mixture or [Source(path=self.path, weight=1.0)]
        return [s.model_copy(update={"name": s.name or default_name(s.path)}) for s in mixture]
