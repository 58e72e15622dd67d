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
    prior: Literal["recurrent", "independent", "context", "paper"] = Field(
        "recurrent", description="prior mean of z_k: W z_{k-1} | 0 | P h_{k-1} | W z_{k-1} + P h_{k-1} (docs/model.md)")
    posterior: Literal["residual", "standard"] = Field(
        "residual", description="q mean: prior mean + mu_k (TRACE, shared mean) | mu_k alone (the literature's VAEs)")
    prior_variance: Literal["fixed", "learned"] = Field(
        "fixed", description="prior variance I, or exp(Q h_{k-1}) from the text so far (context/paper priors)")
    posterior_norm: Literal["layernorm", "batchnorm", "bn_vae", "none"] = Field(
        "layernorm", description="on mu_k: fixed-gain LN (floor per segment) | BN, fixed gain | BN-VAE: fixed gain, "
                                 "learned shift | none")
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
                and self.prior in ("recurrent", "paper") and self.posterior == "residual":
            raise ValueError("latent_path 'parallel' needs an idempotent W: use idempotent projector/oblique/penalty, "
                             "or latent_path 'scan' for a free W")
        if self.prior_variance == "learned" and self.prior not in ("context", "paper"):
            raise ValueError(f"prior_variance 'learned' needs a prior that reads the text (context or paper), "
                             f"got prior {self.prior!r}")
        if self.prior in ("context", "paper") and self.encoder_scope != "segment_causal" and self.latent == "segments":
            raise ValueError(f"prior {self.prior!r} needs encoder_scope 'segment_causal': the prior of z_k reads "
                             f"h_{{k-1}}, which must not see segments >= k")
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
