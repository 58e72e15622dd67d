"""`trace-dist quickstart`: the README's main job, end to end, on the built-in corpus.

    prepare builtin:pydoc -> data/pydoc             (skipped when already prepared)
    trace-dist train --nproc 2                      (DeepSpeed ZeRO-2, 2 CPU ranks or GPUs)
    trace-dist eval on the test split, 2 ranks      (PPL/ELBO/KL/MI/AU, BLEU/Self-BLEU/Distinct)
    trace-dist generate: samples from the prior
and prints where the TensorBoard logs are. Each step is the same command a user would type, run
as a subprocess, so the quickstart exercises exactly what the README documents.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from trace_dist.ports import free_port

CLI = [sys.executable, "-m", "trace_dist.cli"]


def step(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"trace-dist quickstart: '{title}' failed with exit code {rc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trace-dist quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/pydoc", help="where the prepared corpus goes")
    p.add_argument("--output", default="runs/quickstart", help="run directory")
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--nproc", type=int, default=2, help="training and evaluation processes")
    p.add_argument("overrides", nargs="*", help="dotted.key=value for training (e.g. train.max_steps=100)")
    args = p.parse_args(argv)
    data, run = Path(args.data), Path(args.output)

    if (data / "manifest.json").exists():
        print(f"=== prepare: {data} already prepared, reusing it")
    else:
        step("prepare the built-in corpus", CLI + ["prepare", "--input", "builtin:pydoc", "--output", str(data)])
    step(f"train on {args.nproc} processes", CLI + ["train", "--config", args.config, "--nproc", str(args.nproc),
                                                    f"data.path={data}", f"train.output_dir={run}", *args.overrides])
    metrics_file = run / "eval_test.json"
    step(f"evaluate on {args.nproc} processes",
         [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
          "--master_port", str(free_port()), "-m", "trace_dist.cli", "eval", "--checkpoint", str(run),
          "--data", str(data), "--split", "test", "--output", str(metrics_file), "--no-progress"])
    step("sample from the prior", CLI + ["generate", "--checkpoint", str(run), "--num", "4", "--seed", "0",
                                         "--output", str(run / "samples_prior.jsonl")])

    m = json.loads(metrics_file.read_text())["metrics"]
    keys = ["ppl_iw", "bpb_iw", "nll_iw", "elbo", "rec", "kl", "kl_floor", "mi", "au", "bleu_4", "self_bleu_4",
            "distinct_2", "len_mean"]
    print("\n=== test metrics (" + str(metrics_file) + ")")
    for k in keys:
        if k in m:
            v = m[k]
            print(f"  {k:<12} {v:.4f}" if isinstance(v, float) else f"  {k:<12} {v}")
    print(f"\nTensorBoard: tensorboard --logdir {run / 'tensorboard'} --host 127.0.0.1 --port 6006")
    print(f"Checkpoints: {run / 'checkpoints'}  (export: trace-dist export {run} {run / 'export'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
