"""Model configuration: the TRACE architecture and every baseline switch (see docs/model.md)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- backbone (GPT-2 style: pre-LN, learned positions, GELU MLP, tied embeddings) ---
    n_layer: int = Field(4, ge=1, description="decoder blocks (and encoder blocks)")
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    block_size: int = Field(512, ge=8, description="max positions (tokens per document, prompt included)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    vocab_size: int = Field(0, ge=0, description="0: taken from the data's tokenizer")
    share_blocks: bool = Field(True, description="encoder and decoder share Transformer blocks (DELLA)")
    encoder_scope: Literal["segment_causal", "bidirectional"] = "segment_causal"
    pooling: Literal["attention", "last"] = "attention"
    init_from: Optional[str] = Field(None, description="local Hugging Face GPT-2 directory")

    # --- latent variables ---
    latent: Literal["none", "single", "segments"] = "segments"
    latent_size: int = Field(32, ge=1)
    prior: Literal["recurrent", "independent", "context"] = "recurrent"
    posterior_norm: Literal["layernorm", "batchnorm", "none"] = "layernorm"
    ln_gamma: float = Field(0.5, gt=0.0, description="fixed LayerNorm gain: KL floor d*gamma^2/2 per segment")
    idempotent: Literal["projector", "oblique", "penalty", "free"] = "projector"
    idempotent_rank: Optional[int] = Field(None, ge=1, description="rank of W (projector/oblique); default d/2")
    idempotent_penalty: float = Field(1.0, ge=0.0, description="lambda of ||W^2-W||_F^2 under 'penalty'")
    latent_path: Literal["sequential", "parallel", "scan"] = "parallel"
    inject: Literal["memory", "embedding", "both"] = "both"
    max_segments: int = Field(32, ge=1)
    conditional: bool = False

    # --- memory/compute ---
    activation_checkpointing: bool = False
    checkpoint_impl: Literal["auto", "fairscale", "torch"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.idempotent_rank is not None and self.idempotent_rank > self.latent_size:
            raise ValueError(f"idempotent_rank ({self.idempotent_rank}) must be <= latent_size ({self.latent_size})")
        if self.latent_path == "parallel" and self.idempotent == "free" and self.latent == "segments" \
                and self.prior == "recurrent":
            raise ValueError("latent_path 'parallel' needs an idempotent W: use idempotent projector/oblique/penalty, "
                             "or latent_path 'scan' for a free W")
        return self


class GenerationConfig(BaseModel):
    """Decoding settings (shared by training samples, `trace-dist eval` and `trace-dist generate`)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0, description="0 disables")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=1.0)
    greedy: bool = False
