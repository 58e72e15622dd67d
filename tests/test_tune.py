"""`trace-dist tune` without a Ray cluster: search-config validation, the Tune param space,
the Pareto front, and the results files."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trace_dist.config import ConfigError
from trace_dist.tune.results import (best_row, format_table, mark_pareto, pareto_front, plot_pareto, write_hparams,
                                     write_results)
from trace_dist.tune.spec import Objective, Plot, grid_points, load_search, num_samples, param_space
from trace_dist.tune.trial import Plan

REPO = Path(__file__).resolve().parent.parent


def write_search(tmp_path, **fields) -> Path:
    """A search file next to a copy of configs/tiny.yaml; `fields` replace the defaults below."""
    doc = {"base": {"config": [str(REPO / "configs/tiny.yaml")], "overrides": {"train.max_steps": 4}},
           "space": {"kl.beta": {"loguniform": [0.1, 1.0]}}}
    doc.update(fields)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# -------------------------------------------------------------- validation
@pytest.mark.parametrize("name", ["quick", "paper"])
def test_shipped_search_configs_validate(name):
    spec, base = load_search(REPO / f"configs/tune/{name}.yaml")
    assert spec.name == name and spec.objective.mode == "min"
    # searches over data.segment rank trials per byte of text, not per token (issue 13)
    assert spec.objective.metric == spec.plot.quality == "val_bpb"
    assert base.zero.stage == 2 and spec.workers >= 2
    assert set(spec.space) >= {"kl.beta", "data.segment"}


def test_base_overrides_apply_over_the_files(tmp_path):
    spec, base = load_search(write_search(tmp_path, base={"config": [str(REPO / "configs/tiny.yaml")],
                                                          "overrides": {"kl.free_bits": 0.25}}))
    assert base.kl.free_bits == 0.25 and base.model.n_layer == 2  # tiny.yaml's value kept


@pytest.mark.parametrize("space, message", [
    ({"kl.betta": {"uniform": [0.1, 1.0]}}, r"space\.kl\.betta: not a key of the training config \(did you mean 'kl\.beta'"),
    ({"model": {"choice": [1]}}, r"space\.model: not a key"),
    ({"kl.beta": {"uniform": [1.0, 0.1]}}, r"space\.kl\.beta.*low \(1\.0\) must be < high"),
    ({"train.lr": {"loguniform": [0.0, 0.1]}}, r"space\.train\.lr.*loguniform: low \(0\.0\) must be > 0"),
    ({"kl.beta": {"lognormal": [0.0, 1.0]}}, r"space\.kl\.beta.*unknown sampling primitive 'lognormal'"),
    ({"kl.beta": {"uniform": [-1.0, 1.0]}}, r"space\.kl\.beta: value -1\.0 gives an invalid training config: "
                                            r"kl\.beta: Input should be greater than or equal to 0"),
    ({"data.segment": {"choice": ["sentence", "fixed:0"]}}, r"space\.data\.segment: value 'fixed:0'"),
    ({"model.n_head": {"randint": [2, 5]}}, r"space\.model\.n_head: value 3 .*divisible"),
    ({"train.output_dir": {"choice": ["a", "b"]}}, r"space\.train\.output_dir: set by the tuner"),
    ({"kl.beta": {"grid": [0.5, 1.0]}}, r"space\.kl\.beta: 'grid' needs search\.algorithm grid or random"),
])
def test_invalid_search_space_names_the_key(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message):
        load_search(write_search(tmp_path, space=space))


@pytest.mark.parametrize("fields, message", [
    ({"trails": 3}, r"trails: unknown key"),
    ({"objective": {"metric": "score", "mode": "max"}}, r"objective: .*needs weights"),
    ({"objective": {"metric": "my_metric"}}, r"objective: .*mode is required for metric 'my_metric'"),
    ({"scheduler": {"type": "hyperband"}}, r"scheduler\.type: Input should be 'asha', 'fifo' or 'none'"),
    ({"search": {"algorithm": "grid"}}, r"space\.kl\.beta: search\.algorithm 'grid' takes only grid/choice"),
    ({"fault_injection": {"trial": 1}}, r"fault_injection: needs search\.algorithm grid or random"),
    ({"fault_injection": {"trial": 1, "at_report": 1}, "search": {"algorithm": "random"}},
     r"fault_injection\.at_report: Input should be greater than or equal to 2"),
    ({"base": {"config": ["nope.yaml"]}}, r"config file not found"),
    ({"base": {"config": [str(REPO / "configs/tiny.yaml")], "overrides": {"kl.bta": 1}}},
     r"base\.overrides\.kl\.bta: not a key"),
])
def test_invalid_search_fields_are_named(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_search(write_search(tmp_path, **fields))


@pytest.mark.parametrize("case", ["bad key", "no data", "no manifest", "bad override", "bad trials",
                                  "trials on resume"])
def test_bad_search_or_data_exits_2_in_one_line_before_ray_starts(tmp_path, tiny_data, case):
    """`trace-dist tune` itself: one line naming the culprit, exit 2, Ray never imported, nothing written."""
    unprepared = tmp_path / "unprepared"  # a directory, but `trace-dist prepare` never wrote it
    unprepared.mkdir()
    data, space, extra, message = {
        "bad key": (tiny_data, {"kl.betta": {"uniform": [0.1, 1.0]}}, [],
                    "space.kl.betta: not a key of the training config (did you mean 'kl.beta'?)"),
        "no data": (tmp_path / "nodata", {"kl.beta": {"uniform": [0.1, 1.0]}}, [], "nodata/manifest.json (run `trace-dist prepare` first)"),
        "no manifest": (unprepared, {"kl.beta": {"uniform": [0.1, 1.0]}}, [], f"no {unprepared}/manifest.json"),
        "bad override": (tiny_data, {"kl.beta": {"uniform": [0.1, 1.0]}}, ["train.max_stpes=3"],
                         "train.max_stpes: not a key of the training config (did you mean 'train.max_steps'?)"),
        "bad trials": (tiny_data, {"kl.beta": {"uniform": [0.1, 1.0]}}, ["--trials", "0"],
                       "--trials: must be at least 1 (got 0)"),
        "trials on resume": (tiny_data, {"kl.beta": {"uniform": [0.1, 1.0]}}, ["--trials", "3", "--resume"],
                             "--trials: a resumed search keeps the trials it was started with"),
    }[case]
    bad = write_search(tmp_path, space=space, base={"config": [str(REPO / "configs/tiny.yaml")],
                                                    "overrides": {"data.path": str(data)}})
    code = ("import sys; from trace_dist.cli import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "tune", "--config", str(bad), *extra], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("trace-dist tune: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_command_line_overrides_apply_last_and_are_recorded(tmp_path):
    search = write_search(tmp_path, base={"config": [str(REPO / "configs/tiny.yaml")],
                                          "overrides": {"train.max_steps": 4, "kl.free_bits": 0.25}})
    spec, base = load_search(search, ["train.max_steps=20", "data.path=/x", "model.n_layer=3"])
    assert (base.train.max_steps, base.data.path, base.model.n_layer, base.kl.free_bits) == (20, "/x", 3, 0.25)
    assert spec.base.overrides == {"train.max_steps": 20, "kl.free_bits": 0.25, "data.path": "/x", "model.n_layer": 3}
    with pytest.raises(ConfigError, match=r"^train\.output_dir: set by the tuner"):
        load_search(search, ["train.output_dir=/y"])
    with pytest.raises(ConfigError, match=r"override 'kl\.beta': expected dotted\.key=value"):
        load_search(search, ["kl.beta"])
    with pytest.raises(ConfigError, match=r"kl\.free_bits: Input should be greater than or equal to 0"):
        load_search(search, ["kl.free_bits=-1"])


def test_trials_from_the_command_line_replace_the_files_and_are_recorded(tmp_path):
    search = write_search(tmp_path, trials=4)
    spec, _ = load_search(search, trials=2)
    assert spec.trials == 2 and num_samples(spec) == 2
    assert load_search(search)[0].trials == 4


# ------------------------------------------------------------- param space
def test_param_space_translates_each_primitive(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    spec, _ = load_search(write_search(tmp_path, space={
        "kl.beta": {"loguniform": [0.1, 1.0]}, "kl.free_bits": {"uniform": [0.0, 0.5]},
        "model.n_layer": {"randint": [1, 3]}, "data.segment": {"choice": ["sentence", "fixed:8"]},
        "train.lr": {"grid": [1e-3, 2e-3]}}, search={"algorithm": "random", "seed": 3}, trials=2))
    space = param_space(spec)["params"]
    assert isinstance(space["kl.beta"], Float) and (space["kl.beta"].lower, space["kl.beta"].upper) == (0.1, 1.0)
    assert isinstance(space["kl.beta"].get_sampler(), Float._LogUniform)
    assert isinstance(space["kl.free_bits"].get_sampler(), Float._Uniform)
    assert isinstance(space["model.n_layer"], Integer) and space["model.n_layer"].upper == 3
    assert isinstance(space["data.segment"], Categorical) and space["data.segment"].categories == ["sentence", "fixed:8"]
    assert space["train.lr"] == {"grid_search": [1e-3, 2e-3]}
    assert num_samples(spec) == 2


def test_grid_search_is_the_capped_product(tmp_path):
    space = {"data.segment": {"grid": ["fixed:8", "fixed:16"]}, "kl.beta": {"choice": [0.5, 1.0]}}
    spec, _ = load_search(write_search(tmp_path, space=space, search={"algorithm": "grid"}))
    assert spec.trials is None and num_samples(spec) == 1
    assert grid_points(spec) == [{"data.segment": s, "kl.beta": b} for s in ("fixed:8", "fixed:16") for b in (0.5, 1.0)]
    spec, _ = load_search(write_search(tmp_path, space=space, search={"algorithm": "grid"}, trials=3))
    assert param_space(spec) == {"params": {"grid_search": grid_points(spec)}} and len(grid_points(spec)) == 3


def test_trial_config_sets_params_and_run_dir(tmp_path):
    spec, base = load_search(write_search(tmp_path))
    plan = Plan(base=base, trials_dir=str(tmp_path / "trials"), storage_path=str(tmp_path / "ray"),
                objective=spec.objective, workers=2, resources_per_worker={"CPU": 1}, use_gpu=False, max_failures=1)
    cfg = plan.trial_config("abc_00003", {"kl.beta": 0.3, "data.segment": "fixed:8"})
    assert cfg.kl.beta == 0.3 and cfg.data.segment == "fixed:8" and cfg.train.max_steps == 4
    assert cfg.train.output_dir == str(tmp_path / "trials" / "abc_00003") and cfg.checkpoint.resume == "none"


def test_objective_value_and_weighted_score():
    assert Objective(metric="val_elbo").mode == "max"
    assert Objective().metric == "val_bpb" and Objective().mode == "min"
    assert Objective().value({"val_bpb": 1.25, "val_ppl_bound": 12.5}) == 1.25
    assert Objective(metric="val_word_ppl").mode == "min" and Plot().quality == "val_bpb"
    score = Objective(metric="score", mode="max", weights={"val_loss": -1.0, "distinct_2": 2.0})
    assert score.value({"val_loss": 3.0, "distinct_2": 0.5, "step": 4}) == pytest.approx(-2.0)
    with pytest.raises(KeyError, match=r"needs metric\(s\) \['distinct_2'\]"):
        score.value({"val_loss": 3.0})


# ------------------------------------------------------------------ pareto
def test_pareto_front_respects_directions():
    pts = [(10.0, 0.2), (12.0, 0.5), (11.0, 0.1), (15.0, 0.5), (9.0, 0.05)]
    # quality min, diversity max: (11, .1) is beaten by (10, .2); (15, .5) by (12, .5)
    assert pareto_front(pts, ("min", "max")) == [True, True, False, False, True]
    # both min: only points with no better-or-equal point on both axes
    assert pareto_front(pts, ("min", "min")) == [False, False, False, False, True]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], ("min", "max")) == [True, True]  # ties do not dominate


# ----------------------------------------------------------------- results
def rows():
    def row(i, status, ppl, dist, beta):
        metrics = {"val_ppl_bound": ppl, "val_elbo": -ppl, **({"distinct_2": dist} if dist is not None else {})}
        return {"trial": f"t_{i:05d}", "status": status, "step": 4, "params": {"kl.beta": beta, "data.segment": "fixed:8"},
                "objective": ppl, "metrics": metrics, "pareto": False, "error": None}
    return [row(0, "completed", 20.0, 0.30, 0.5), row(1, "completed", 18.0, 0.10, 1.0),
            row(2, "stopped", 25.0, 0.20, 0.2), row(3, "error", 30.0, None, 0.1)]


def test_results_files_table_and_best(tmp_path):
    rs = rows()
    mark_pareto(rs, Plot(quality="val_ppl_bound", diversity="distinct_2"))
    assert [r["pareto"] for r in rs] == [True, True, False, False]
    assert best_row(rs, "min")["trial"] == "t_00001" and best_row(rs, "max")["trial"] == "t_00003"
    write_results(rs, tmp_path, {"name": "x"})
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["trial"] for t in table] == ["t_00000", "t_00001", "t_00002", "t_00003"]
    assert table[1]["kl.beta"] == "1.0" and table[1]["distinct_2"] == "0.1" and table[3]["distinct_2"] == ""
    assert table[2]["status"] == "stopped" and table[0]["pareto"] == "True"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["name"] == "x" and data["trials"][1]["metrics"]["val_ppl_bound"] == 18.0
    text = format_table(rs)
    assert text.splitlines()[0].split()[:4] == ["trial", "status", "step", "kl.beta"]
    assert "t_00003  error" in text


def test_plot_and_hparams_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rs = rows()
    mark_pareto(rs, Plot())
    plot_pareto(rs, Plot(), tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_hparams(rs, tmp_path / "trials")
    acc = EventAccumulator(str(tmp_path / "trials" / "t_00001" / "tensorboard")).Reload()
    session = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"kl.beta" in session and b"fixed:8" in session
    assert acc.Scalars("hparams/val_ppl_bound")[-1].value == 18.0
    assert acc.Scalars("hparams/objective")[-1].step == 4


def test_resume_without_a_search_and_rerun_over_one_are_refused(tmp_path, tiny_data, capsys):
    from trace_dist.tune.cli import main

    search = write_search(tmp_path, base={"config": [str(REPO / "configs/tiny.yaml")],
                                          "overrides": {"data.path": str(tiny_data)}})
    out = tmp_path / "out"
    assert main(["--config", str(search), "--output", str(out), "--resume"]) == 2
    assert "--resume: no search to resume" in capsys.readouterr().err
    out.mkdir()
    (out / "search.yaml").write_text("{}")
    assert main(["--config", str(search), "--output", str(out)]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


# ------------------------------------------------------------------ network
@pytest.mark.parametrize("address, loopback", [("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True),
                                               ("127.3.0.1:1", True), ("10.0.0.1:6379", False), ("auto", False),
                                               ("head.cluster:6379", False)])
def test_loopback_cluster_addresses_are_recognised(address, loopback):
    from trace_dist.tune.cli import is_loopback_address

    assert is_loopback_address(address) is loopback


def test_config_nest_and_flatten_are_inverse():
    from trace_dist.config import flatten, nest

    flat = {"kl.beta": 0.5, "model.n_layer": 2, "data.segment": "fixed:8", "precision": "bf16"}
    assert nest(flat) == {"kl": {"beta": 0.5}, "model": {"n_layer": 2}, "data": {"segment": "fixed:8"},
                          "precision": "bf16"}
    assert flatten(nest(flat)) == flat


HOOKED_PROCESS_GROUP = """
import os, sys
from datetime import timedelta

import psutil

from trace_dist.ports import free_port
from trace_dist.tune.rendezvous import install, torch_create_store

install()                                   # what Ray runs first in every worker process
assert "torch" not in sys.modules, "the setup hook imported torch"
import torch.distributed as dist            # Ray Train's worker, then init_process_group("env://")


def listening(port):
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.status == "LISTEN" and c.laddr.port == port}


port = free_port()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1, timeout=timedelta(seconds=60))
assert listening(port) == {"127.0.0.1"}, listening(port)
install()                                   # again, torch loaded: idempotent
wide_port = free_port()
wide = torch_create_store()("127.0.0.1", wide_port, 0, 1, timedelta(seconds=30))
assert listening(wide_port) - {"127.0.0.1", "::ffff:127.0.0.1"}, "torch's own store now listens on loopback only"
dist.destroy_process_group()
print("ok")
"""


def test_setup_hook_imports_no_torch_and_the_store_then_listens_on_master_addr_only():
    """Ray runs the hook in every worker process, most of which never load torch; in those that do,
    rank 0's TCPStore server (created inside init_process_group) listens on MASTER_ADDR alone,
    where torch's own listens on every interface."""
    r = subprocess.run([sys.executable, "-c", HOOKED_PROCESS_GROUP], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert r.returncode == 0 and r.stdout.split() == ["ok"], r.stderr[-3000:]


def test_results_table_has_the_validation_metrics_and_the_kl_floor():
    from trace_dist.tune.results import columns

    rows = [{"params": {"kl.beta": 0.5}, "metrics": {"val_loss": 1.0, "kl_floor": 4.0, "distinct_2": 0.5, "step": 8}}]
    assert columns(rows) == (["kl.beta"], ["val_loss", "kl_floor", "distinct_2"])
