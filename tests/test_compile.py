"""`train.compile: true`: the trainer on a torch.compile'd engine (inductor, CPU) reproduces eager."""

import json
import time

import pytest

from dist_utils import run_ranks

STEPS = 10


def _train_timed(data, root, runs: dict) -> dict[str, tuple[float, int]]:
    """One process, the runs in turn: {name: extra overrides} -> {name: (seconds, graphs dynamo compiled)}."""
    from torch._dynamo.utils import counters

    from trace_dist.config import load_config
    from trace_dist.train import run_training

    results = {}
    for name, extra in runs.items():
        cfg = load_config(["configs/tiny.yaml"], [
            f"data.path={data}", f"train.output_dir={root / name}", f"train.max_steps={STEPS}", "train.samples_to_log=0",
            "train.eval_interval=1000", "train.eval_batches=1", "checkpoint.interval=1000", "model.n_layer=1", *extra])
        graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        run_training(cfg)
        results[name] = time.perf_counter() - t0, counters["stats"]["unique_graphs"] - graphs
    return results


def _records(run_dir, key):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _step_seconds(run_dir):
    tokens = [0] + _records(run_dir, "tokens")  # cumulative
    return [(b - a) / rate for a, b, rate in zip(tokens, tokens[1:], _records(run_dir, "tokens_per_s"))]


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data, tmp_path):
    runs = run_ranks(_train_timed, 1, tiny_data, tmp_path, {"eager": [], "compiled": ["train.compile=true"]},
                     tmp_path=tmp_path, timeout=1500)[0]
    eager, compiled = _records(tmp_path / "eager", "loss"), _records(tmp_path / "compiled", "loss")
    assert "compile: true" in (tmp_path / "compiled" / "config.yaml").read_text()  # the switch reached the run
    assert runs["eager"][1] == 0 and runs["compiled"][1] > 0  # dynamo really compiled the model
    assert len(eager) == len(compiled) == STEPS
    assert compiled == pytest.approx(eager, abs=1e-4)
    # steps 6-10: new batch shapes may still recompile, so this bounds the compiled step time from above
    seconds = {name: sum(_step_seconds(tmp_path / name)[5:]) for name in runs}
    print(f"\n{STEPS} steps + 1 validation: eager {runs['eager'][0]:.1f} s, compiled {runs['compiled'][0]:.1f} s "
          f"({runs['compiled'][1]} graphs); compiled/eager step time, steps 6-10: "
          f"{seconds['compiled'] / seconds['eager']:.2f}")
