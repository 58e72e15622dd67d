"""Freeing the workers of trials Tune stopped early (imported only once Ray runs).

ASHA stopping a trial kills its driver and with it the Ray Train controller. Ray Train then
relies on a cleaner that asks the State API whether the controller died; without the dashboard
(a minimal `ray[tune,train]` install, or `include_dashboard=False`) it never learns, the
workers' placement group stays reserved, and every later trial waits for its CPUs/GPUs forever
("worker group startup timed out"). So the search process does it: a few seconds after a trial
ends (its driver is gone by then), it removes the placement group the trial's workers recorded,
if that still exists. A trial that finished by itself has removed its own already.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, remove_placement_group

from trace_dist.tune.trial import PLACEMENT_GROUP_FILE

GRACE_S = 10.0


def release_placement_group(id_file: Path) -> bool:
    """Remove the placement group whose id is in `id_file` if it is still reserved."""
    if not id_file.exists():
        return False
    pg_id = id_file.read_text().strip()
    if ray.util.placement_group_table().get(pg_id, {}).get("state") != "CREATED":
        return False
    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    return True


class ReleaseStoppedTrials(tune.Callback):
    def __init__(self, trials_dir: str):
        self.trials_dir = Path(trials_dir)
        self.ended: dict[str, float] = {}  # trial id -> when Tune ended it

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        for trial_id in [t for t, ended in self.ended.items() if now - ended > GRACE_S]:
            del self.ended[trial_id]
            if release_placement_group(self.trials_dir / trial_id / PLACEMENT_GROUP_FILE):
                print(f"[trace-dist tune] released the workers of stopped trial {trial_id}", flush=True)
