"""What runs inside Ray: the per-trial driver and the per-worker training function.

Three levels (Ray Train V2, stack-notes §2.1):
  Tuner -> `run_trial(config)`, one per trial: builds the trial's TraceConfig and a TorchTrainer
        -> `train_worker(loop_config)`, one per rank: calls the one training loop,
           `trace_dist.train.run_training`, with a `report` that hands each validation's metrics
           and DeepSpeed tag directory to `ray.train.report`.
Fault tolerance is Ray's: a dead worker makes Train restart the whole worker group (up to
`max_failures` times) and `ray.train.get_checkpoint()` then returns the last reported tag
directory, which the trainer resumes from (`checkpoint.resume`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trace_dist.config import TraceConfig
from trace_dist.tune.spec import FaultInjection, Objective, apply

ATTEMPTS_FILE = "attempts.jsonl"  # one line per (re)start of a trial's workers, in the trial dir
WORKERS_FILE = "workers.jsonl"  # one line per worker start: rank, node id and address, pid
FAULT_MARKER = ".fault_injected"
PLACEMENT_GROUP_FILE = ".placement_group"  # the id of the trial's current worker-group placement group


@dataclass(frozen=True)
class Plan:
    """Everything a trial needs besides its sampled params (passed with tune.with_parameters)."""

    base: TraceConfig            # the validated base config, paths made absolute
    trials_dir: str              # trial t runs in trials_dir/<trial id>
    storage_path: str            # Ray storage: Train runs are persisted under train-<trial id>
    objective: Objective
    workers: int
    resources_per_worker: dict[str, float]
    use_gpu: bool
    max_failures: int
    fault_injection: Optional[FaultInjection] = None

    def trial_config(self, trial_id: str, params: dict[str, Any]) -> TraceConfig:
        run_dir = str(Path(self.trials_dir) / trial_id)
        return apply(self.base, {**params, "train.output_dir": run_dir, "checkpoint.resume": "none"})


def trial_index(trial_id: str) -> int:
    """Grid/random trial ids are '<hash>_<NNNNN>', the suffix counting trials in creation order."""
    return int(trial_id.rsplit("_", 1)[-1])


# ------------------------------------------------------------------- driver
def run_trial(config: dict, plan: Plan) -> None:
    """Tune function trainable: one TorchTrainer (multi-worker DeepSpeed run) per trial."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = plan.trial_config(trial_id, config["params"])
    fault = plan.fault_injection
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "objective": plan.objective.model_dump(),
        "fail_at_report": fault.at_report if fault and fault.trial == trial_index(trial_id) else None,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                               resources_per_worker=plan.resources_per_worker),
        run_config=ray.train.RunConfig(
            # A stable name: a restarted driver (--resume) finds this run's checkpoints again.
            name=f"train-{trial_id}",
            storage_path=plan.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=plan.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


# ------------------------------------------------------------------- worker
class RayReport:
    """`report(metrics, checkpoint_dir)` for run_training: adds the objective, persists the tag dir.

    Every rank calls it (ray.train.report is a barrier). One rank per node uploads: all local
    ranks wrote their shards into the same tag directory, and Ray merges the nodes' uploads.
    """

    def __init__(self, objective: Objective, run_dir: Path, fail_at_report: Optional[int]):
        self.objective = objective
        self.run_dir = run_dir
        self.fail_at_report = fail_at_report
        self.reports = 0

    def __call__(self, metrics: dict, checkpoint_dir: str) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.reports += 1
        if self.reports == self.fail_at_report and ctx.get_world_rank() == ctx.get_world_size() - 1:
            self._fail_once()
        metrics = {**metrics, "objective": self.objective.value(metrics)}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if ctx.get_local_rank() == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=Path(checkpoint_dir).name,
                         delete_local_checkpoint_after_upload=False)

    def _fail_once(self) -> None:
        """Fault injection (tests): a worker error, once per trial (a marker file in the run dir)."""
        marker = self.run_dir / FAULT_MARKER
        if not marker.exists():
            marker.touch()
            raise RuntimeError(f"fault injection: worker fails at report {self.reports}")


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker = one DeepSpeed rank (Ray already made the process group)."""
    import ray.train

    from trace_dist.train import run_training

    cfg = TraceConfig.model_validate(loop_config["config"])
    report = RayReport(Objective.model_validate(loop_config["objective"]), cfg.run_dir,
                       loop_config["fail_at_report"])
    checkpoint = ray.train.get_checkpoint()
    rank = ray.train.get_context().get_world_rank()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.run_dir / WORKERS_FILE, "a") as f:  # which node ran which rank (its logs are there)
        f.write(json.dumps({"time": time.time(), "rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}) + "\n")
    if rank == 0:
        with open(cfg.run_dir / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps({"time": time.time(), "resume": checkpoint.path if checkpoint else None}) + "\n")
        group = ray.util.get_current_placement_group()
        if group is not None:
            (cfg.run_dir / PLACEMENT_GROUP_FILE).write_text(group.id.hex())
    if checkpoint is None:
        run_training(cfg, report=report)
        return
    with checkpoint.as_directory() as tag_dir:  # local storage: the path itself; remote: one download per node
        run_training(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": tag_dir})}),
                     report=report)

