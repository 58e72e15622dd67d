"""The search configuration (`configs/tune/*.yaml`): typed, validated before Ray starts.

A search names a base training config, a space over dotted keys of that config, an
objective, and how trials are scheduled. Everything here is plain Python + pydantic: a bad
search fails in milliseconds with the offending field named, and no Ray import is paid.

Every sampled key is checked against `TraceConfig` twice: the dotted path must name a leaf
field, and the training config must validate with each representative value of the domain
(every choice/grid value, both bounds of a range). So `kl.beta: {uniform: [-1, 1]}` fails
here, not in trial 7 after an hour.
"""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, model_validator

from trace_dist.config import (ConfigError, TraceConfig, _Section, build_config, deep_merge, field_error, flatten,
                               load_config, nest, parse_overrides, read_yaml)

PRIMITIVES = ("choice", "uniform", "loguniform", "randint", "grid")

# Direction of every metric the objective or the plot may name (what "better" means).
METRIC_MODES: dict[str, str] = {
    "val_bpb": "min", "val_word_ppl": "min", "val_loss": "min", "val_rec": "min", "val_ppl_bound": "min",
    "val_elbo": "max",
    **{f"self_bleu_{n}": "min" for n in range(1, 5)},
    **{f"distinct_{n}": "max" for n in range(1, 5)},
}
DIVERSITY_METRICS = tuple(k for k in METRIC_MODES if k.startswith(("self_bleu_", "distinct_")))
VALIDATION_PREFIX = "val_"  # the trainer's validation metrics (val_loss, val_kl, val_bpb, ...)
MODEL_METRICS = ("kl_floor",)  # reported with each validation: the analytic KL floor per segment (nats)
# Keys the tuner owns in every trial config (one run directory per trial, resume from Ray).
RESERVED_KEYS = ("train.output_dir", "checkpoint.resume")


class Domain(_Section):
    """One sampling primitive: exactly one of the fields is set.

    choice: [a, b, ...]        any values, sampled (Optuna: categorical)
    uniform: [low, high]       float in [low, high]
    loguniform: [low, high]    float, log-uniform, 0 < low
    randint: [low, high]       int in [low, high)  (Ray's convention)
    grid: [a, b, ...]          every value is tried (grid/random search only)
    """

    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None
    grid: Optional[list[Any]] = None

    @model_validator(mode="before")
    @classmethod
    def _one_primitive(cls, data: Any) -> Any:
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(f"expected one sampling primitive as {{name: args}}, one of {', '.join(PRIMITIVES)}; "
                             f"got {data!r}")
        (name,) = data
        if name not in PRIMITIVES:
            raise ValueError(f"unknown sampling primitive {name!r} (known: {', '.join(PRIMITIVES)})")
        return data

    @model_validator(mode="after")
    def _bounds(self) -> "Domain":
        kind, args = self.kind, self.args
        if kind in ("choice", "grid") and not args:
            raise ValueError(f"{kind}: needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not args[0] < args[1]:
            raise ValueError(f"{kind}: low ({args[0]}) must be < high ({args[1]})")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"loguniform: low ({args[0]}) must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(p for p in PRIMITIVES if getattr(self, p) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def representatives(self) -> list[Any]:
        """Values that must all build a valid training config: every listed value (small integer
        ranges too: `n_head` must divide `n_embd` for each), else the two ends."""
        kind, args = self.kind, self.args
        if kind in ("choice", "grid"):
            return list(args)
        if kind == "randint":
            return list(range(*args)) if args[1] - args[0] <= 64 else [args[0], args[1] - 1]
        return [float(args[0]), float(args[1])]

    def to_tune(self) -> Any:
        """The Ray Tune sampling object (imported lazily: validation never pays for Ray)."""
        from ray import tune

        kind, args = self.kind, self.args
        if kind == "grid":
            return tune.grid_search(list(args))
        if kind == "choice":
            return tune.choice(list(args))
        return getattr(tune, kind)(*args)


class BaseSpec(_Section):
    config: list[str] = Field(..., min_length=1, description="training YAMLs, merged left to right "
                                                              "(relative to this search file)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted.key: value, applied after the files")


class Objective(_Section):
    # Per byte, not per token: a search over data.segment compares like with like (a shorter segment
    # adds separators that the per-token figures count as nearly free predictions; docs/eval.md).
    metric: str = Field("val_bpb", description="a reported metric, or 'score' (weighted sum of metrics)")
    mode: Optional[Literal["min", "max"]] = Field(None, description="default: the metric's natural direction")
    weights: dict[str, float] = Field(default_factory=dict, description="score = sum(weight * metric)")

    @model_validator(mode="after")
    def _check(self) -> "Objective":
        if self.metric == "score":
            if not self.weights:
                raise ValueError("metric 'score' needs weights: {metric: weight, ...}")
            if self.mode is None:
                raise ValueError("metric 'score' needs mode: min or max")
        elif self.weights:
            raise ValueError("weights are only used with metric 'score'")
        elif self.mode is None:
            if self.metric not in METRIC_MODES:
                raise ValueError(f"mode is required for metric {self.metric!r} "
                                 f"(known directions: {', '.join(METRIC_MODES)})")
            self.mode = METRIC_MODES[self.metric]  # type: ignore[assignment]
        return self

    def value(self, metrics: dict) -> float:
        """The objective of one report; a missing metric names itself and what was reported."""
        names = self.weights or {self.metric: 1.0}
        missing = [m for m in names if m not in metrics]
        if missing:
            raise KeyError(f"objective needs metric(s) {missing}, the trainer reported {sorted(metrics)}")
        return sum(w * float(metrics[m]) for m, w in names.items())


class Scheduler(_Section):
    type: Literal["asha", "fifo", "none"] = "asha"
    grace_period: Optional[int] = Field(None, ge=1, description="steps before a trial may be stopped "
                                                                "(default: train.eval_interval)")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: Optional[int] = Field(None, ge=1, description="steps (default: train.max_steps of the base)")


class Search(_Section):
    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    seed: int = 0


class Plot(_Section):
    quality: str = "val_bpb"
    diversity: str = "distinct_2"

    @model_validator(mode="after")
    def _known(self) -> "Plot":
        for axis in ("quality", "diversity"):
            if getattr(self, axis) not in METRIC_MODES:
                raise ValueError(f"{axis}: {getattr(self, axis)!r} has no known direction "
                                 f"(one of {', '.join(METRIC_MODES)})")
        return self


class FaultInjection(_Section):
    """Test switch: the last worker of trial number `trial` raises once, when handed report `at_report`.

    It fails before that report reaches Ray, a whole eval interval after report `at_report - 1`,
    whose checkpoint Ray has registered by then: the restarted trial must resume from it.
    """

    trial: int = Field(0, ge=0, description="trial index: the _NNNNN suffix of grid/random trial ids")
    at_report: int = Field(2, ge=2)


class SearchConfig(_Section):
    name: Optional[str] = Field(None, description="experiment name (default: the file's stem)")
    output: Optional[str] = Field(None, description="default --output (default: runs/tune/<name>)")
    base: BaseSpec
    space: dict[str, Domain] = Field(..., min_length=1, description="dotted training-config key -> domain")
    objective: Objective = Objective()
    trials: Optional[int] = Field(None, ge=1, description="samples (optuna/random); cap on grid points "
                                                          "(grid; default all)")
    max_concurrency: int = Field(1, ge=1)
    workers: int = Field(2, ge=1, description="Ray Train workers (DeepSpeed ranks) per trial")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    scheduler: Scheduler = Scheduler()
    search: Search = Search()
    max_failures: int = Field(1, ge=0, description="worker-failure restarts per trial, from its last checkpoint")
    storage_path: Optional[str] = Field(None, description="Ray storage (shared FS for multi-node; "
                                                          "default OUTPUT/ray)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of every Ray worker")
    plot: Plot = Plot()
    fault_injection: Optional[FaultInjection] = None

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        grids = [k for k, d in self.space.items() if d.kind == "grid"]
        if self.search.algorithm == "optuna" and grids:
            raise ValueError(f"space.{grids[0]}: 'grid' needs search.algorithm grid or random "
                             "(Optuna samples; use 'choice')")
        if self.search.algorithm == "grid":
            sampled = [k for k, d in self.space.items() if d.kind not in ("grid", "choice")]
            if sampled:
                raise ValueError(f"space.{sampled[0]}: search.algorithm 'grid' takes only grid/choice domains")
        elif self.trials is None:
            self.trials = 1
        if self.fault_injection is not None and self.search.algorithm == "optuna":
            raise ValueError("fault_injection: needs search.algorithm grid or random (Optuna's trial ids "
                             "carry no index)")
        if self.resources_per_worker.get("CPU", 0) < 0 or self.resources_per_worker.get("GPU", 0) < 0:
            raise ValueError("resources_per_worker: amounts must be >= 0")
        return self

    @property
    def use_gpu(self) -> bool:
        return self.resources_per_worker.get("GPU", 0) > 0


# ------------------------------------------------------------------ loading
def load_search(path: str | Path, overrides: list[str] = (), trials: Optional[int] = None
                ) -> tuple[SearchConfig, TraceConfig]:
    """Parse + validate the search file, its base config and its space. Raises ConfigError.

    `overrides` ('train.max_steps=20', as for `trace-dist train`) join base.overrides, last;
    `trials` (the command line's --trials) replaces the file's `trials`.
    """
    path = Path(path)
    raw = read_yaml(path)  # the training configs' reader: same errors, same `extends:`
    if trials is not None:
        raw["trials"] = trials
    try:
        spec = SearchConfig.model_validate(raw)
    except ValidationError as e:
        lines = [field_error(err, SearchConfig) for err in e.errors()]
        raise ConfigError(f"{path}: invalid search config:\n  " + "\n  ".join(lines)) from None
    command_line = flatten(parse_overrides(list(overrides)))
    for key in command_line:
        check_key(key, "")
    spec.base.overrides.update(command_line)  # so search.yaml records them
    if spec.name is None:
        spec.name = path.stem
    base_paths = [p if Path(p).is_absolute() else str(path.parent / p) for p in spec.base.config]
    for key in spec.base.overrides:
        check_key(key, "base.overrides.")
    base = apply(load_config(base_paths), spec.base.overrides)
    validate_space(spec, base)
    return spec, base


# ------------------------------------------------------------- dotted keys
def check_key(key: str, where: str) -> None:
    """`key` is a searchable leaf of the training config; errors name it as `where + key`."""
    if key in RESERVED_KEYS:
        raise ConfigError(f"{where}{key}: set by the tuner for every trial; remove it")
    known = list(TraceConfig().flat())
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}{key}: not a key of the training config{hint}")


def apply(cfg: TraceConfig, flat: dict[str, Any]) -> TraceConfig:
    """A new validated config: `cfg` with dotted keys set (ConfigError names a bad one)."""
    return build_config(deep_merge(cfg.model_dump(mode="json"), nest(flat)))


def validate_space(spec: SearchConfig, base: TraceConfig) -> None:
    """Each key names a leaf; each representative value builds a valid config with the base."""
    for key, domain in spec.space.items():
        check_key(key, "space.")
        for value in domain.representatives():
            try:
                apply(base, {key: value})
            except ConfigError as e:
                raise ConfigError(f"space.{key}: value {value!r} gives an invalid training config: "
                                  f"{str(e).removeprefix('invalid configuration:').strip()}") from None
    first = {k: d.representatives()[0] for k, d in spec.space.items()}
    try:
        apply(base, first)
    except ConfigError as e:
        raise ConfigError(f"space: the first values {first} together give an invalid training config: {e}") from None


def grid_points(spec: SearchConfig) -> list[dict[str, Any]]:
    """algorithm 'grid': the cartesian product (keys in file order), the first `trials` of it."""
    keys = list(spec.space)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.space[k].args for k in keys))]
    return points[: spec.trials] if spec.trials else points


def param_space(spec: SearchConfig) -> dict:
    """Tune's param_space: {'params': {dotted key: domain}} (grid: one grid_search over points)."""
    from ray import tune

    if spec.search.algorithm == "grid":
        return {"params": tune.grid_search(grid_points(spec))}
    return {"params": {k: d.to_tune() for k, d in spec.space.items()}}


def num_samples(spec: SearchConfig) -> int:
    """Tune's num_samples: each grid point once (grid), else `trials` samples."""
    return 1 if spec.search.algorithm == "grid" else int(spec.trials or 1)
