"""Typed run configuration: YAML files that extend each other, dotted overrides, clear errors.

One `TraceConfig` drives every command. A YAML file may name a parent with `extends:` (a path
relative to that file); keys merge depth-first, the child winning. Command-line overrides are
`dotted.key=value` with YAML-typed values (`kl.beta=0.5`, `model.latent=none`). Validation
happens once, here, before any process starts, and every error names the offending field.
The DeepSpeed part of the run starts from `ds_config.json` and is patched by the typed keys,
so the two never disagree (see `deepspeed_config()`).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trace_dist.data.config import DataConfig
from trace_dist.errors import UserError
from trace_dist.model.config import GenerationConfig, ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the field. The CLI exits 2 on it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Section):
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(8, ge=1, description="documents per rank per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    seed: int = 1234
    output_dir: str = Field("runs/default", description="run directory: checkpoints/, tensorboard/, samples")
    lr: Optional[float] = Field(None, gt=0.0, description="peak learning rate (default: ds_config.json)")
    warmup_steps: Optional[int] = Field(None, ge=0, description="LR warm-up (default: ds_config.json)")
    weight_decay: Optional[float] = Field(None, ge=0.0)
    gradient_clipping: float = Field(1.0, ge=0.0, description="global-norm clip; 0 disables")
    adam: Literal["auto", "torch", "deepspeed"] = Field(
        "auto", description="AdamW kernel: 'deepspeed' = FusedAdam on the GPU, DeepSpeedCPUAdam under "
                            "zero.offload_optimizer; 'torch' = torch.optim.AdamW; 'auto' = deepspeed on CUDA or "
                            "with offload, else torch")
    log_interval: int = Field(10, ge=1)
    eval_interval: int = Field(100, ge=1, description="validate every N steps (and at the end)")
    eval_batches: int = Field(8, ge=1, description="validation micro-batches per rank")
    samples_to_log: int = Field(4, ge=0, description="generated samples logged at each validation")
    max_nonfinite_in_row: int = Field(5, ge=1, description="stop after this many non-finite steps in a row")
    progress: bool = True
    compile: bool = Field(False, description="torch.compile the model under the DeepSpeed engine (inductor)")
    peak_tflops: Optional[float] = Field(None, gt=0.0, description="peak TFLOP/s of one device for train/mfu "
                                                                   "(default: the datasheet table, else a probe)")
    fault_nonfinite_at: list[int] = Field(default_factory=list,
                                          description="fault injection: micro-batch positions whose loss is "
                                                      "made NaN (exercises the non-finite guard)")


class KLConfig(_Section):
    beta: float = Field(1.0, ge=0.0, description="KL weight (the peak, under a schedule)")
    schedule: Literal["constant", "linear", "cyclical"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear: steps from beta_start to beta")
    cycles: int = Field(4, ge=1, description="cyclical: number of cycles over train.max_steps")
    ratio_zero: float = Field(0.25, ge=0.0, le=1.0, description="cyclical: fraction of a cycle at beta_start")
    ratio_increase: float = Field(0.25, ge=0.0, le=1.0, description="cyclical: fraction rising to beta")
    beta_start: float = Field(0.0, ge=0.0)
    free_bits: float = Field(0.0, ge=0.0, description="per latent dimension and segment, nats (Optimus)")

    @model_validator(mode="after")
    def _check(self) -> "KLConfig":
        if self.ratio_zero + self.ratio_increase > 1.0:
            raise ValueError("ratio_zero + ratio_increase must be <= 1")
        return self


RESUME_MODES = ("auto", "none")


class CheckpointConfig(_Section):
    interval: int = Field(100, ge=1, description="save every N optimizer steps (and at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are deleted")
    resume: str = Field("auto", description="'auto' (latest in output_dir, if any), 'none', or a path")


class ZeroConfig(_Section):
    stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False


class EvalConfig(_Section):
    split: Literal["valid", "test"] = "test"
    iw_samples: int = Field(30, ge=1, description="importance samples for NLL/PPL (DELLA: 30)")
    num_samples: int = Field(200, ge=2, description="generated samples for BLEU/Self-BLEU/Distinct")
    batch_size: int = Field(8, ge=1)
    au_delta: float = Field(0.01, gt=0.0)


class TraceConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    kl: KLConfig = KLConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    zero: ZeroConfig = ZeroConfig()
    generation: GenerationConfig = GenerationConfig()
    eval: EvalConfig = EvalConfig()
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    deepspeed_config: Union[str, dict[str, Any]] = Field(
        "ds_config.json", description="base DeepSpeed config, patched by the keys above: a JSON file, or its "
                                      "content (what `resolved()` embeds)")
    tensorboard: bool = True

    @model_validator(mode="after")
    def _check(self) -> "TraceConfig":
        if self.data.max_tokens > self.model.block_size:
            raise ValueError(f"data.max_tokens ({self.data.max_tokens}) exceeds model.block_size "
                             f"({self.model.block_size})")
        if self.data.max_segments > self.model.max_segments:
            raise ValueError(f"data.max_segments ({self.data.max_segments}) exceeds model.max_segments "
                             f"({self.model.max_segments})")
        m = self.model
        if m.activation_checkpointing and m.checkpoint_impl == "fairscale" and m.share_blocks and self.zero.stage > 0:
            raise ValueError("model.checkpoint_impl: fairscale's reentrant recompute gives ZeRO the gradients of "
                             "blocks shared by encoder and decoder twice; use checkpoint_impl torch (or auto), "
                             "model.share_blocks=false, or zero.stage=0")
        if self.generation.max_new_tokens > self.model.block_size:
            # decoding past block_size has no position embedding: IndexError at the first validation
            raise ValueError(f"generation.max_new_tokens ({self.generation.max_new_tokens}) exceeds "
                             f"model.block_size ({self.model.block_size})")
        return self

    # ---------------------------------------------------------------- derived
    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    def deepspeed_config_dict(self, world_size: int = 1) -> dict[str, Any]:
        """ds_config.json patched by the typed keys (the typed keys always win)."""
        ds = copy.deepcopy(self.deepspeed_config if isinstance(self.deepspeed_config, dict)
                           else _load_json(resolve_path(self.deepspeed_config)))
        ds["train_micro_batch_size_per_gpu"] = self.train.micro_batch_size
        ds["gradient_accumulation_steps"] = self.train.grad_accum
        ds["train_batch_size"] = self.train.micro_batch_size * self.train.grad_accum * world_size
        ds["gradient_clipping"] = self.train.gradient_clipping
        zero = ds.setdefault("zero_optimization", {})
        zero["stage"] = self.zero.stage
        if self.zero.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        else:
            zero.pop("offload_optimizer", None)
        ds.setdefault("bf16", {})["enabled"] = self.precision == "bf16"
        ds.setdefault("fp16", {})["enabled"] = self.precision == "fp16"
        optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
        opt = optimizer.setdefault("params", {})
        if str(optimizer.get("type", "")).lower() in ("adam", "adamw"):  # the only ones with a torch_adam switch
            opt["torch_adam"] = self.adam_impl() == "torch"   # DeepSpeed's own kernel otherwise (see adam_impl)
        if self.train.lr is not None:
            opt["lr"] = self.train.lr
        if self.train.weight_decay is not None:
            opt["weight_decay"] = self.train.weight_decay
        sched = ds.get("scheduler", {}).get("params")
        if sched is not None:
            if "total_num_steps" in sched:
                sched["total_num_steps"] = self.train.max_steps
            if self.train.warmup_steps is not None:
                sched["warmup_num_steps"] = self.train.warmup_steps
            if self.train.lr is not None and "warmup_max_lr" in sched:
                sched["warmup_max_lr"] = self.train.lr
        ds.pop("tensorboard", None)  # we write our own events (DeepSpeed no longer logs the loss)
        return ds

    def resolved(self) -> "TraceConfig":
        """This config with every path absolute (from this process's working directory) and the DeepSpeed
        base config embedded: what `trace-dist train` writes once and hands to every rank, so no rank
        re-reads a file that may have changed or resolves a path from another directory or node."""
        raw = self.model_dump(mode="json")
        raw["data"] = self.data.absolute().model_dump(mode="json")  # local paths pinned, URLs kept
        raw["train"]["output_dir"] = os.path.abspath(self.train.output_dir)
        if self.model.init_from:
            raw["model"]["init_from"] = os.path.abspath(self.model.init_from)
        if self.checkpoint.resume not in RESUME_MODES:
            raw["checkpoint"]["resume"] = os.path.abspath(self.checkpoint.resume)
        if isinstance(self.deepspeed_config, str):
            raw["deepspeed_config"] = _load_json(resolve_path(self.deepspeed_config))
        return build_config(raw)

    def adam_impl(self) -> str:
        """'torch' or 'deepspeed' for train.adam. DeepSpeed's AdamW is FusedAdam where the step runs
        on the GPU and DeepSpeedCPUAdam (JIT-built, ~80 s the first time on 2 cores) where ZeRO
        offloads it to the CPU; 'auto' takes it wherever it beats torch's AdamW (CUDA, offload)."""
        if self.train.adam != "auto":
            return self.train.adam
        import torch  # here, so that validating a config never pays for importing torch

        return "deepspeed" if self.zero.offload_optimizer or torch.cuda.is_available() else "torch"

    def flat(self) -> dict[str, Any]:
        """{'model.n_layer': 4, ...}: every leaf under its dotted key (the override syntax)."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def choices(section: type[BaseModel], field: str) -> tuple[str, ...]:
    """The allowed values of a Literal config field (argparse `choices=` take them from here, so each
    list of names lives in the config only)."""
    return typing.get_args(section.model_fields[field].annotation)


# -------------------------------------------------------------------- loading
def resolve_path(path: str | os.PathLike) -> Path:
    """A path as given, else relative to the repository root (for ds_config.json and configs/)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def _load_json(path: Path) -> dict:
    try:
        ds = json.loads(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"deepspeed_config: file not found: {path}") from None
    except OSError as e:  # unreadable, a name too long, ...
        raise ConfigError(f"deepspeed_config: cannot read {path} ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed_config: {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed_config: {path} must hold a JSON object, not {type(ds).__name__}")
    return ds


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    try:
        path = resolve_path(path)
        if path in seen:
            raise ConfigError(f"extends: cycle through {path}")
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:  # a directory, unreadable, a name too long (ENAMETOOLONG from exists() too), ...
        raise ConfigError(f"config file {str(path)[:200]}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (YAML) file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = read_yaml((path.parent / parent) if not Path(parent).is_absolute() else Path(parent), seen + (path,))
    return deep_merge(base, data)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """['kl.beta=0.5', 'model.latent=none'] -> nested dict with YAML-typed values."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and used as a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def build_config(raw: dict) -> TraceConfig:
    try:
        return TraceConfig.model_validate(raw)
    except ValidationError as e:
        lines = [field_error(err, TraceConfig) for err in e.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(paths: list[str | os.PathLike] | str | None = None, overrides: list[str] | None = None) -> TraceConfig:
    """Merge the YAML files left to right, apply dotted overrides, validate."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    raw: dict = {}
    for p in paths or []:
        raw = deep_merge(raw, read_yaml(Path(p)))
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return build_config(raw)


# ------------------------------------------------- generic operations (any config model)
def nest(flat: dict[str, Any]) -> dict:
    """{'kl.beta': 0.5} -> {'kl': {'beta': 0.5}} (dotted keys to the YAML tree; values copied)."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'kl': {'beta': 0.5}} -> {'kl.beta': 0.5}: the inverse of `nest`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def field_error(err: dict, root: type[BaseModel]) -> str:
    """One pydantic error of a `root` model as 'dotted.loc: message'; an unknown key gets the
    closest known key of its section ("did you mean"), or the list of them."""
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        known = known_keys(err["loc"][:-1], root)
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known)}")
    elif err["type"] != "missing" and not isinstance(err.get("input"), (dict, type(None))):
        msg += f" (got {err['input']!r})"
    return f"{loc}: {msg}" if loc else msg


def known_keys(loc: tuple, root: type[BaseModel]) -> list[str]:
    """The field names of the section of `root` at `loc` ([] where loc is not a section)."""
    model: Any = root
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
