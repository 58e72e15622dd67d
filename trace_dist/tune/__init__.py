"""`trace-dist tune`: Ray Tune searches, each trial a multi-worker DeepSpeed run (see docs/tune.md).

spec.py     the search config: typed, validated against TraceConfig before Ray starts
trial.py    inside Ray: the per-trial driver (a TorchTrainer) and the per-rank worker
results.py  results table, best.yaml, TensorBoard hparams, Pareto plot
rendezvous.py  in the trial workers: rank 0's process-group store listens on MASTER_ADDR only
cleanup.py  frees the workers of trials stopped early (Ray Train needs the State API for it)
cli.py      the command: validate, start/join Ray, Tuner.fit or Tuner.restore, write outputs

Nothing is imported here: the setup hook (rendezvous.install) runs in every Ray worker process
and must not pay for torch.
"""
