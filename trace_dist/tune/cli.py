"""`trace-dist tune --config configs/tune/X.yaml [--output DIR] [--address auto|HOST:PORT] [--resume] [key=value ...]`.

Validate everything (exit 2 on a bad search or unprepared data, before Ray starts) -> start a
local Ray on 127.0.0.1 only, or join a cluster -> Tuner.fit
(or Tuner.restore(...).fit with --resume) -> results table, best.yaml, hparams, pareto.png.

DIR layout:
    search.yaml            the validated search config, as run
    trials/<trial id>/     each trial's run directory: checkpoints/, tensorboard/, metrics.jsonl, ...
    ray/<name>/            Tune's experiment state; ray/train-<trial id>/ each trial's Ray Train run
    results.csv, results.json, best.yaml, pareto.png
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys
from pathlib import Path

import yaml

from trace_dist.config import ConfigError, TraceConfig
from trace_dist.launch import preflight
from trace_dist.tune.results import (best_row, collect, format_table, mark_pareto, plot_pareto, write_hparams,
                                     write_results)
from trace_dist.tune.spec import SearchConfig, apply, load_search, num_samples, param_space
from trace_dist.tune.trial import Plan, run_trial

DRIVER_CPU = 0.01  # what each trial's driver (run_trial) reserves


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace-dist tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="search config (configs/tune/*.yaml)")
    p.add_argument("--output", help="output directory (default: the config's `output`, else runs/tune/<name>)")
    p.add_argument("--address", help="join a running Ray cluster ('auto' or HOST:PORT); "
                                     "default: start a local Ray instance")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in the output directory")
    p.add_argument("--trials", type=int, help="number of trials (replaces the config's `trials`)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value of the base training config (after base.overrides)")
    return p


def preflight_trials(spec: SearchConfig, base: TraceConfig, trials_dir: Path) -> None:
    """What `trace-dist train` checks before it starts its ranks, for every data directory a trial
    may read, so a bad one fails here in one line, not inside Ray in every trial."""
    paths = spec.space["data.path"].representatives() if "data.path" in spec.space else [base.data.path]
    for path in paths:
        preflight(apply(base, {"data.path": str(Path(path).resolve()), "train.output_dir": str(trials_dir)}),
                  cuda=spec.use_gpu)


def storage_for(spec: SearchConfig, out: Path) -> str:
    if spec.storage_path is None:
        return str(out / "ray")
    return spec.storage_path if "://" in spec.storage_path else str(Path(spec.storage_path).resolve())


def prepare(args: argparse.Namespace) -> tuple[SearchConfig, Plan, Path]:
    """Everything that can fail on bad input, without Ray. Raises ConfigError."""
    if args.trials is not None and args.resume:
        raise ConfigError("--trials: a resumed search keeps the trials it was started with; drop --trials")
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials: must be at least 1 (got {args.trials})")
    spec, base = load_search(args.config, args.overrides, trials=args.trials)
    base = base.resolved()  # Ray workers run in other directories and on other nodes
    out = Path(args.output or spec.output or f"runs/tune/{spec.name}").resolve()
    preflight_trials(spec, base, out / "trials")
    storage = storage_for(spec, out)
    state = f"{storage}/{spec.name}"
    if args.resume and not (out / "search.yaml").exists():
        raise ConfigError(f"--resume: no search to resume in {out} (search.yaml is missing)")
    if not args.resume and (out / "search.yaml").exists():
        raise ConfigError(f"{out} already holds a search ({state}); pass --resume to continue it "
                          "or choose another --output")
    plan = Plan(base=base, trials_dir=str(out / "trials"), storage_path=storage, objective=spec.objective,
                workers=spec.workers, resources_per_worker=spec.resources_per_worker, use_gpu=spec.use_gpu,
                max_failures=spec.max_failures, fault_injection=spec.fault_injection)
    return spec, plan, out


# Ray's own switch for "this machine only" (what it does on macOS): with it, the node address is
# 127.0.0.1, and gcs_server, raylet, the agents and every worker listen and connect there. Without
# it Ray turns any loopback address it is given into the machine's external IP and listens on all
# interfaces (and turns a loopback --address into the external IP, where a loopback head does not
# listen). It is read when `ray` is imported, and it stops `ray start --address` from joining.
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# The trial workers' collectives: Ray Train sets MASTER_ADDR to the node address (127.0.0.1), but
# gloo (CPU) and NCCL's bootstrap (GPU) pick their own interface, by default not the loopback one.
LOCAL_COLLECTIVES_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
LOOPBACK = "127.0.0.1"
USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"
# Run in every Ray worker process when it starts: rank 0's process-group store then listens on
# MASTER_ADDR alone (torch's listens on all interfaces; rendezvous.py).
STORE_HOOK = "trace_dist.tune.rendezvous.install"


def is_loopback_address(address: str) -> bool:
    """'127.0.0.1:6379', 'localhost:6379': a Ray cluster on this machine's loopback."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or 'auto'
        return False


def start_ray(spec: SearchConfig, address: str | None) -> None:
    """Join a cluster, or start a local one that only talks over 127.0.0.1 (anyone who can reach a
    Ray port can run code on the machine), with the CPUs max_concurrency trials need."""
    cpus = spec.resources_per_worker.get("CPU", 1.0)
    env = {"DS_ACCELERATOR": "cuda" if spec.use_gpu else "cpu",
           "OMP_NUM_THREADS": str(max(1, int(cpus))), "TOKENIZERS_PARALLELISM": "false"}
    if address is None or is_loopback_address(address):
        # Before `import ray`; a loopback cluster's address then stays 127.0.0.1 for this driver too.
        os.environ.update(LOCAL_ONLY_ENV)  # inherited by gcs_server, raylet and every worker
    # Ray's usage statistics are on unless switched off: a local Ray would query the cloud metadata
    # address (169.254.169.254, seen by the loopback test) and report to usage-stats.ray.io. Off
    # unless the user opts in (RAY_USAGE_STATS_ENABLED=1).
    os.environ.setdefault(USAGE_STATS_ENV, "0")
    import ray

    if address:
        ray.init(address=address, runtime_env={"env_vars": {**env, **spec.env}, "worker_process_setup_hook": STORE_HOOK})
        return
    # Enough logical CPUs for max_concurrency trials (they may exceed the physical ones: a
    # 2-core laptop still runs 2-worker trials side by side, just slower).
    need = math.ceil(spec.max_concurrency * (spec.workers * cpus + DRIVER_CPU))
    info = ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, _node_ip_address=LOOPBACK,
                    runtime_env={"env_vars": {**env, **LOCAL_COLLECTIVES_ENV, **spec.env},
                                 "worker_process_setup_hook": STORE_HOOK})
    if info.address_info["node_ip_address"] != LOOPBACK:  # Ray changed how it resolves addresses
        ray.shutdown()
        raise RuntimeError(f"local Ray came up on {info.address_info['node_ip_address']}, not {LOOPBACK}")


def trial_name(trial) -> str:
    return trial.trial_id


def build_tuner(spec: SearchConfig, plan: Plan, resume: bool):
    from ray import tune

    from trace_dist.tune.cleanup import ReleaseStoppedTrials

    # The driver only waits on its TorchTrainer: a sliver of a CPU (Ray refuses 0), the rest to workers.
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": DRIVER_CPU})
    path = f"{plan.storage_path}/{spec.name}"
    if resume:
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    if spec.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, max_concurrent = OptunaSearch(seed=spec.search.seed), spec.max_concurrency
    else:
        from ray.tune.search import BasicVariantGenerator

        # A SearchGenerator takes the cap itself (Tune ignores max_concurrent_trials for it).
        search_alg = BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=spec.max_concurrency)
        max_concurrent = None
    scheduler = None
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        s = spec.scheduler
        scheduler = ASHAScheduler(time_attr="step", max_t=s.max_t or plan.base.train.max_steps,
                                  grace_period=s.grace_period or plan.base.train.eval_interval,
                                  reduction_factor=s.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric="objective", mode=spec.objective.mode, num_samples=num_samples(spec),
                                    max_concurrent_trials=max_concurrent, search_alg=search_alg,
                                    scheduler=scheduler, trial_name_creator=trial_name,
                                    trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(name=spec.name, storage_path=plan.storage_path,
                                  callbacks=[ReleaseStoppedTrials(plan.trials_dir)]),
    )


def report(spec: SearchConfig, plan: Plan, out: Path, result_grid) -> int:
    rows = collect(result_grid, plan, f"{plan.storage_path}/{spec.name}")
    mark_pareto(rows, spec.plot)
    best = best_row(rows, spec.objective.mode)
    summary = {"name": spec.name, "objective": spec.objective.model_dump(),
               "best_trial": best["trial"] if best else None}
    write_results(rows, out, summary)
    write_hparams(rows, Path(plan.trials_dir))
    plot_pareto(rows, spec.plot, out / "pareto.png")
    print("\n" + format_table(rows))
    unfinished = [r["trial"] for r in rows if r["status"] == "unfinished"]
    if unfinished:
        print(f"\ntrace-dist tune: search interrupted with {len(unfinished)} unfinished trial(s); continue it with "
              f"--resume --output {out}", file=sys.stderr)
    if best is None:
        print(f"\ntrace-dist tune: no trial reported the objective; see {out / 'results.json'}", file=sys.stderr)
        return 1
    best_cfg = apply(plan.base, {**best["params"], "train.output_dir": str(out / "best"), "checkpoint.resume": "auto"})
    (out / "best.yaml").write_text(best_cfg.to_yaml())
    print(f"\nbest trial {best['trial']}: objective {best['objective']:.6g} with {best['params']}\n"
          f"  train it: trace-dist train --config {out / 'best.yaml'}\n"
          f"  compare:  tensorboard --logdir {plan.trials_dir}\n"
          f"  files:    {out}/results.csv results.json best.yaml pareto.png")
    return 130 if unfinished else 0  # 130: the shell's code for Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec, plan, out = prepare(args)
    except ConfigError as e:
        print(f"trace-dist tune: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (out / "search.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True),
                                                        sort_keys=False))
    start_ray(spec, args.address)
    tuner = build_tuner(spec, plan, args.resume)
    return report(spec, plan, out, tuner.fit())
