"""After a search: the results table, best.yaml, TensorBoard hparams and the Pareto plot.

A row is a plain dict (one per trial), so everything here except `collect` runs without Ray:
    {"trial": id, "status": completed|stopped|unfinished|error, "step": int, "params": {dotted key: value},
     "objective": float|None, "metrics": {name: value}, "pareto": bool, "error": str|None}
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from trace_dist.tune.spec import DIVERSITY_METRICS, METRIC_MODES, MODEL_METRICS, VALIDATION_PREFIX, Plot


def is_table_metric(name: str) -> bool:
    """Every validation metric the trainer reports, under its own name (so a metric it adds or
    renames needs no change here), and the diversity metrics."""
    return name.startswith(VALIDATION_PREFIX) or name in MODEL_METRICS or name in DIVERSITY_METRICS


def _number(x: Any) -> Optional[float]:
    """A finite float, else None (metrics may be absent, NaN or not numbers)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


# ------------------------------------------------------------------ collect
def collect(result_grid, plan, experiment_path: str) -> list[dict]:
    """One row per trial from a Tune ResultGrid (the only function here that touches Ray objects).

    Statuses come from the experiment state Tune saved (after Ctrl-C it still says RUNNING for
    the trials cut short, where the in-memory grid already says TERMINATED): an error is
    `error`, a trial still running or pending is `unfinished`, a terminated one short of
    train.max_steps was `stopped` by the scheduler.
    """
    from ray.tune import ExperimentAnalysis

    saved = {t.trial_id: t.status for t in ExperimentAnalysis(experiment_path).trials}
    rows = []
    for result in result_grid:
        trial = Path(result.path).name  # trial dirs are named by trial id (see cli.trial_name)
        params = dict((result.config or {}).get("params", {}))
        metrics = {k: v for k, v in (result.metrics or {}).items() if _number(v) is not None}
        step = int(metrics.get("step", 0))
        if result.error is not None or saved.get(trial) == "ERROR":
            status = "error"
        elif saved.get(trial) != "TERMINATED":
            status = "unfinished"
        else:
            status = "completed" if step >= plan.trial_config(trial, params).train.max_steps else "stopped"
        rows.append({"trial": trial, "status": status, "step": step, "params": params,
                     "objective": _number(metrics.get("objective")),
                     "metrics": {k: v for k, v in metrics.items() if is_table_metric(k)},
                     "pareto": False, "error": None if result.error is None else str(result.error).splitlines()[0]})
    rows.sort(key=lambda r: r["trial"])
    return rows


# ------------------------------------------------------------------- pareto
def pareto_front(points: Sequence[tuple[float, float]], modes: tuple[str, str]) -> list[bool]:
    """True where no other point is at least as good on both axes and better on one."""
    sign = [1.0 if m == "min" else -1.0 for m in modes]
    keyed = [(sign[0] * x, sign[1] * y) for x, y in points]  # both axes minimized now

    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    return [not any(dominates(other, p) for other in keyed) for p in keyed]


def mark_pareto(rows: list[dict], plot: Plot) -> None:
    """Set row['pareto'] over the rows that have both plotted metrics."""
    axes = (plot.quality, plot.diversity)
    usable = [r for r in rows if all(_number(r["metrics"].get(a)) is not None for a in axes)]
    front = pareto_front([(r["metrics"][axes[0]], r["metrics"][axes[1]]) for r in usable],
                         (METRIC_MODES[axes[0]], METRIC_MODES[axes[1]]))
    for r, on_front in zip(usable, front):
        r["pareto"] = on_front


def best_row(rows: list[dict], mode: str) -> Optional[dict]:
    """The trial with the best last-reported objective (errored trials count if they reported)."""
    scored = [r for r in rows if r["objective"] is not None]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r["objective"])


# ------------------------------------------------------------------ writing
def columns(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(param keys, metric names) present in any row: params and validation metrics in first-seen
    (the trainer's) order, then the diversity metrics."""
    params: list[str] = []
    validation: list[str] = []
    for r in rows:
        params += [k for k in r["params"] if k not in params]
        validation += [m for m in r["metrics"]
                       if (m.startswith(VALIDATION_PREFIX) or m in MODEL_METRICS) and m not in validation]
    return params, validation + [m for m in DIVERSITY_METRICS if any(m in r["metrics"] for r in rows)]


def flat(rows: list[dict]) -> tuple[list[str], list[list[Any]]]:
    params, metrics = columns(rows)
    header = ["trial", "status", "step", *params, "objective", *metrics, "pareto", "error"]
    body = [[r["trial"], r["status"], r["step"], *(r["params"].get(p) for p in params), r["objective"],
             *(r["metrics"].get(m) for m in metrics), r["pareto"], r["error"] or ""] for r in rows]
    return header, body


def write_results(rows: list[dict], out: Path, summary: dict) -> None:
    """results.csv (one line per trial) and results.json (the rows plus the search summary)."""
    header, body = flat(rows)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)
    (out / "results.json").write_text(json.dumps({**summary, "trials": rows}, indent=1))


def format_table(rows: list[dict]) -> str:
    header, body = flat(rows)
    header, body = header[:-1], [line[:-1] for line in body]  # errors are in the files, not the table

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return "" if x is None else str(x)

    cells = [header] + [[cell(x) for x in line] for line in body]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_hparams(rows: list[dict], trials_dir: Path) -> None:
    """An hparams summary in each trial's TensorBoard run: `tensorboard --logdir trials/` compares them.

    (The trainer leaves this to the tuner under Tune: only the tuner knows the searched keys.)
    """
    from trace_dist.tblog import TensorBoard

    for r in rows:
        metrics = {f"hparams/{k}": v for k, v in {**r["metrics"], "objective": r["objective"]}.items()
                   if v is not None}
        tb = TensorBoard(trials_dir / r["trial"] / "tensorboard")
        tb.hparams(r["params"], metrics, r["step"])
        tb.close()


def plot_pareto(rows: list[dict], plot: Plot, path: Path) -> None:
    """Quality (y) against diversity (x) of every trial, the Pareto front joined and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, d = plot.quality, plot.diversity
    usable = [r for r in rows if _number(r["metrics"].get(q)) is not None and _number(r["metrics"].get(d)) is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if usable:
        ax.scatter([r["metrics"][d] for r in usable], [r["metrics"][q] for r in usable], c="tab:blue",
                   label="trials")
        front = sorted((r for r in usable if r["pareto"]), key=lambda r: r["metrics"][d])
        ax.plot([r["metrics"][d] for r in front], [r["metrics"][q] for r in front], "o-", c="tab:red",
                label="Pareto front")
        for r in usable:
            ax.annotate(r["trial"].rsplit("_", 1)[-1], (r["metrics"][d], r["metrics"][q]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no trial reported both {q} and {d}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"{d} ({'higher' if METRIC_MODES[d] == 'max' else 'lower'} is better)")
    ax.set_ylabel(f"{q} ({'higher' if METRIC_MODES[q] == 'max' else 'lower'} is better)")
    ax.set_title("diversity vs quality per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
