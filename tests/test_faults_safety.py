"""Checkpoints that must not be trusted, and user errors that must end in one line (fault matrix
2026-11: S1, E1, E5, E12-E17, R3). Real DeepSpeed checkpoints (ZeRO-0 and ZeRO-2, one step of the
tiny config) with a real pickle payload that would create a file if it ever ran."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dist_utils import run_ranks
from trace_dist.errors import CheckpointError, UserError

TINY = "configs/tiny.yaml"


class Payload:
    """Unpickling this runs `touch <marker>` (what an attacker's checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _train_one_step(data, root):
    from trace_dist.config import load_config
    from trace_dist.train import run_training

    for stage in (0, 2):
        cfg = load_config([TINY], [f"data.path={data}", f"train.output_dir={root}/z{stage}", f"zero.stage={stage}",
                                   "train.max_steps=1", "checkpoint.interval=1", "train.samples_to_log=1",
                                   "train.eval_batches=1", "generation.max_new_tokens=8", "data.num_workers=0"])
        run_training(cfg)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Run dirs z0/ and z2/: one optimizer step of the tiny config saved under ZeRO-0 and ZeRO-2."""
    root = tmp_path_factory.mktemp("safety_runs")
    run_ranks(_train_one_step, 1, tiny_data, root, tmp_path=root)
    return root


@pytest.fixture(autouse=True)
def safe_process(monkeypatch):
    """Loading a checkpoint installs the weights-only loader process-wide; restore torch.load and the
    environment after each test so that other test modules see the process as they expect."""
    monkeypatch.setattr(torch, "load", torch.load)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)


def _tag(run):
    return run / "checkpoints" / "step00000001"


def poison(run, tmp_path, filename, marker):
    """A copy of `run` whose `filename` (in the tag dir) also holds the payload, next to real data; the
    author of a hostile checkpoint also writes its trace_meta.json, so the file sizes it lists match."""
    from trace_dist import safe_load

    out = tmp_path / f"poisoned_{run.name}_{filename[:8]}"
    shutil.copytree(run, out)
    target = _tag(out) / filename
    with torch.serialization.safe_globals(safe_load.allowed_classes()):
        state = torch.load(target, map_location="cpu", weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, target)
    meta_file = _tag(out) / "trace_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["files"][filename] = target.stat().st_size
    meta_file.write_text(json.dumps(meta))
    return out, target


POISONED = [("z0", "mp_rank_00_model_states.pt"), ("z2", "mp_rank_00_model_states.pt"),
            ("z2", "zero_pp_rank_0_mp_rank_00_optim_states.pt")]


@pytest.mark.parametrize("run_name,filename", POISONED)
def test_inference_loading_never_runs_a_payload(runs, tmp_path, run_name, filename):
    from trace_dist.checkpoint import load_for_inference

    marker = tmp_path / "pwned"
    poisoned, target = poison(runs / run_name, tmp_path, filename, marker)
    with pytest.raises(CheckpointError, match="refused to load") as e:
        load_for_inference(poisoned)
    assert str(target) in str(e.value) and "posix.system" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    # trace_meta.json is the author's too: whichever stage it claims, the payload never runs
    meta = _tag(poisoned) / "trace_meta.json"
    for claimed in (0, 3):
        meta.write_text(re.sub(r'"zero_stage": \d', f'"zero_stage": {claimed}', meta.read_text()))
        with contextlib.suppress(CheckpointError):
            load_for_inference(poisoned)
        assert not marker.exists()


def test_the_allow_list_reads_real_checkpoints(runs):
    from trace_dist.checkpoint import load_for_inference

    for stage in (0, 2):
        model, *_ = load_for_inference(runs / f"z{stage}")
        assert all(torch.isfinite(p).all() for p in model.parameters())


def _resume_engine(data, root, poisoned):
    """What the trainer does on resume, after its one-line `safe_load.install()` at start-up."""
    import deepspeed

    from trace_dist import safe_load
    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer
    from trace_dist.distributed import init_distributed
    from trace_dist.model.trace import TRACE

    safe_load.install()
    init_distributed()
    cfg = load_config([TINY], [f"data.path={data}", f"train.output_dir={root}", "zero.stage=2"])
    model = TRACE(cfg.model, load_tokenizer(data)[1])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg.deepspeed_config_dict(1))
    try:
        engine.load_checkpoint(str(poisoned / "checkpoints"), tag="step00000001")
    except CheckpointError as e:
        return str(e)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("filename", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_never_runs_a_payload(runs, tiny_data, tmp_path, filename):
    marker = tmp_path / "pwned"
    poisoned, target = poison(runs / "z2", tmp_path, filename, marker)
    (err,) = run_ranks(_resume_engine, 1, tiny_data, tmp_path / "resume", poisoned, tmp_path=tmp_path)
    assert err is not None and str(target) in err and "refused to load" in err
    assert not marker.exists()


@pytest.mark.slow
def test_universal_conversion_never_runs_a_payload(runs, tmp_path):
    """ds_to_universal runs as a subprocess: through `python -m trace_dist.safe_load` it is weights-only
    too, and still converts a clean checkpoint."""
    marker = tmp_path / "pwned"
    poisoned, target = poison(runs / "z2", tmp_path, "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    for src, ok in ((runs / "z2", True), (poisoned, False)):
        out = tmp_path / f"universal_{ok}"
        r = subprocess.run([sys.executable, "-m", "trace_dist.safe_load", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", str(_tag(src)), "--output_folder", str(out), "--no_strict"],
                           capture_output=True, text=True, timeout=300)
        if ok:
            assert r.returncode == 0, r.stderr[-3000:]
            assert (out / "zero").is_dir()
        else:
            assert r.returncode != 0 and str(target) in r.stderr and "refused to load" in r.stderr
    assert not marker.exists()


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "trace_dist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(r, *needles):
    """Exit 2 and a last stderr line `trace-dist <cmd>: ...` naming every needle, no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith("trace-dist ") and all(str(n) in lines[-1] for n in needles), lines[-1]


@pytest.mark.slow
def test_cli_commands_refuse_a_payload_in_one_line(runs, tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    poisoned, target = poison(runs / "z2", tmp_path, "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    one_line_error(cli("generate", "--checkpoint", poisoned, "--num", "1"), target, "refused to load")
    one_line_error(cli("eval", "--checkpoint", poisoned, "--data", tiny_data, "--no-progress"), target)
    one_line_error(cli("export", poisoned, tmp_path / "export"), target)
    assert not marker.exists() and not (tmp_path / "export" / "model.safetensors").exists()


# ------------------------------------------------------------------ broken checkpoints: one line each
def test_truncated_and_missing_checkpoints(runs, tmp_path):
    from trace_dist.checkpoint import load_for_inference

    with pytest.raises(CheckpointError, match="no complete TRACE checkpoint"):
        load_for_inference(tmp_path / "nothing")
    for stage, filename in (("z0", "mp_rank_00_model_states.pt"), ("z2", "zero_pp_rank_0_mp_rank_00_optim_states.pt")):
        broken = tmp_path / f"truncated_{stage}"
        shutil.copytree(runs / stage, broken)
        target = _tag(broken) / filename
        os.truncate(target, target.stat().st_size // 2)
        with pytest.raises(CheckpointError, match=f"{filename} is truncated"):  # the sizes trace_meta.json lists
            load_for_inference(broken)
        forget_file_list(broken)                                # a checkpoint without the list: the loader
        with pytest.raises(CheckpointError, match="unreadable") as e:
            load_for_inference(broken)
        assert str(target) in str(e.value) and "\n" not in str(e.value)
    shard_lost = tmp_path / "shard_lost"                   # one rank's optimizer shard deleted
    shutil.copytree(runs / "z2", shard_lost)
    (_tag(shard_lost) / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"):
        load_for_inference(shard_lost)
    forget_file_list(shard_lost)
    with pytest.raises(CheckpointError, match=f"{_tag(shard_lost)}: incomplete ZeRO checkpoint"):
        load_for_inference(shard_lost)


def forget_file_list(run):
    """trace_meta.json as written before it listed the checkpoint's files (or as a hostile author writes it)."""
    meta_file = _tag(run) / "trace_meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]
    meta_file.write_text(json.dumps(meta))


def test_changed_model_size_names_the_first_parameter(runs):
    from trace_dist.checkpoint import load_for_inference, require_matching_model, saved_shapes
    from tokenizers import Tokenizer

    from trace_dist.config import load_config
    from trace_dist.model.trace import TRACE
    from trace_dist.vocab import Vocab

    for stage in ("z0", "z2"):
        with pytest.raises(CheckpointError, match=r"parameter \S+ has shape \[\d+, 32\] in the checkpoint but "
                                                  r"\[\d+, 64\]") as e:
            load_for_inference(runs / stage, ["model.n_embd=64"])
        assert "\n" not in str(e.value)
    # resume: the trainer's check before deepspeed.initialize, from the saved shapes alone
    cfg = load_config([_tag(runs / "z2") / "config.yaml"], ["model.n_embd=64"])
    vocab = Vocab.from_tokenizer(Tokenizer.from_file(str(_tag(runs / "z2") / "tokenizer.json")))
    model = TRACE(cfg.model, vocab)
    with pytest.raises(CheckpointError, match="has shape"):
        require_matching_model(model, saved_shapes(_tag(runs / "z2")), _tag(runs / "z2"))
    cfg = load_config([_tag(runs / "z2") / "config.yaml"])
    require_matching_model(TRACE(cfg.model, vocab), saved_shapes(_tag(runs / "z2")), _tag(runs / "z2"))


def test_export_refuses_a_file_target_and_a_missing_checkpoint(runs, tmp_path):
    from trace_dist.cli import main

    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(UserError, match="not a directory"):
        from trace_dist.checkpoint import export
        export(runs / "z0", target)
    assert target.read_text() == "keep me"
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ generate: flags, paths, prompts
def generate(capsys, *args):
    from trace_dist.cli import main

    rc = main(["generate", *map(str, args)])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "-1"], "--temperature -1.0: Input should be greater than 0"),
    (["--top-p", "2"], "--top-p 2.0: Input should be less than or equal to 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
])
def test_generate_bad_flags_end_in_one_line(runs, capsys, flags, needle):
    rc, out = generate(capsys, "--checkpoint", runs / "z0", *flags)
    assert rc == 2 and out.err.startswith("trace-dist generate: ") and needle in out.err
    assert len(out.err.strip().splitlines()) == 1


def test_generate_output_paths(runs, tmp_path, capsys):
    rc, out = generate(capsys, "--checkpoint", runs / "z0", "--num", "1", "--output", tmp_path)
    assert rc == 2 and "is a directory" in out.err and len(out.err.strip().splitlines()) == 1
    rc, out = generate(capsys, "--checkpoint", tmp_path / "missing", "--num", "1")
    assert rc == 2 and "no complete TRACE checkpoint" in out.err
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, out = generate(capsys, "--checkpoint", runs / "z0", "--num", "1", "--output", blocker / "x.jsonl")
    assert rc == 2 and "not a writable directory" in out.err
    # a good run replaces an earlier file only with the complete new one
    good = tmp_path / "samples.jsonl"
    good.write_text("an earlier file\n")
    rc, out = generate(capsys, "--checkpoint", runs / "z0", "--num", "2", "--max-new-tokens", "500",
                       "--output", good)                          # tiny: model.block_size 128
    assert rc == 2 and "generation.max_new_tokens (500) exceeds model.block_size (128)" in out.err
    assert good.read_text() == "an earlier file\n"
    rc, out = generate(capsys, "--checkpoint", runs / "z0", "--num", "2", "--output", good)
    assert rc == 0 and len(good.read_text().splitlines()) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture(scope="module")
def conditional_export(tiny_data, tmp_path_factory):
    """An untrained conditional tiny model, exported (model.block_size 128)."""
    from safetensors.torch import save_model

    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer
    from trace_dist.model.trace import TRACE

    out = tmp_path_factory.mktemp("conditional_export")
    cfg = load_config([TINY], [f"data.path={tiny_data}", "model.conditional=true"])
    tokenizer, vocab = load_tokenizer(tiny_data)
    torch.manual_seed(0)
    save_model(TRACE(cfg.model, vocab), str(out / "model.safetensors"))
    (out / "config.yaml").write_text(cfg.to_yaml())
    tokenizer.save(str(out / "tokenizer.json"))
    return out


@pytest.mark.parametrize("prompt,needle", [
    ("", "prompt 0 is empty"),
    ("The cat <|eos|> sat.", "contains the special token <|eos|>"),
    ("The cat sat. " * 60, "model.block_size is 128, so nothing can follow it"),
])
def test_generate_refuses_bad_prompts(conditional_export, capsys, prompt, needle):
    rc, out = generate(capsys, "--checkpoint", conditional_export, "--num", "1", "--prompt", prompt)
    assert rc == 2 and needle in out.err and len(out.err.strip().splitlines()) == 1


def test_generate_stops_at_the_context_after_a_long_prompt(conditional_export, tmp_path, capsys):
    prompt = "The cat sat. " * 20                                  # ~100 tokens of the 128
    rc, out = generate(capsys, "--checkpoint", conditional_export, "--num", "2", "--prompt", prompt,
                       "--max-new-tokens", "100", "--output", tmp_path / "s.jsonl")
    assert rc == 0, out.err
    assert "does not fit in model.block_size 128" in out.err


# ------------------------------------------------------------------ JIT-build locks (torch file_baton)
HOLD = "import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); " \
       "time.sleep(float(sys.argv[2])); os.remove(sys.argv[1])"


def hold_lock(lock, seconds):
    """A live builder: a process holding `lock` open, as torch's FileBaton does during a build."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def extensions_dir(tmp_path, monkeypatch):
    from torch.utils.file_baton import FileBaton

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(FileBaton, "wait", FileBaton.wait)  # guard() patches it; restore afterwards
    return tmp_path / "ext"


def test_stale_jit_lock_is_removed_with_a_warning(extensions_dir, capsys):
    from trace_dist import jit_lock

    stale = extensions_dir / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()                                       # what a build killed mid-way leaves
    other = extensions_dir / "cpu_adam" / "build.ninja"
    other.parent.mkdir()
    other.touch()
    jit_lock.guard()
    assert not stale.exists() and other.exists()
    assert f"removed a stale JIT-build lock {stale}" in capsys.readouterr().err


def test_live_jit_lock_is_waited_for_with_a_bound_and_a_message(extensions_dir, capsys, monkeypatch):
    """A live build is waited for only where its extension is loaded (torch's FileBaton.wait, bounded
    and named); a start that never loads it goes on (it used to wait for another run's CPU Adam build)."""
    from torch.utils.file_baton import FileBaton

    from trace_dist import jit_lock

    lock = extensions_dir / "py311_cpu" / "fused_adam" / "lock"     # the default layout's depth
    holder = hold_lock(lock, 60)
    try:
        assert jit_lock.holders(lock) == [holder.pid]
        jit_lock.guard()                                 # returns at once, the live lock untouched
        assert lock.exists() and "removed a stale" not in capsys.readouterr().err
        monkeypatch.setattr(jit_lock, "TIMEOUT_S", 1)    # torch's own wait is bounded
        with pytest.raises(jit_lock.LockTimeout, match=rf"{lock} still held after 1 s by pid\(s\) \[{holder.pid}\]"):
            FileBaton(str(lock)).wait()
        assert f"waiting for the JIT build that holds {lock}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    jit_lock.guard()                                     # its holder died: now stale, removed
    assert not lock.exists()
    monkeypatch.setattr(jit_lock, "TIMEOUT_S", 30)
    released = hold_lock(lock, 1)                        # a build that finishes while torch waits
    FileBaton(str(lock)).wait()
    assert released.wait(10) == 0 and not lock.exists()
    assert "removed a stale" not in capsys.readouterr().err.split("waiting")[-1]


def _start_deepspeed_with_cpu_adam():
    import deepspeed.comm.comm as ds_comm
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from trace_dist.distributed import init_distributed

    init_distributed()  # runs the guard, as every start does
    DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(4))])  # loads (takes the lock of) the JIT-built op
    return ds_comm.cdb.shm_comm_op is None  # the CPU comm op is skipped: nothing of it built or started


@pytest.mark.slow
def test_deepspeed_starts_despite_a_stale_lock_of_its_adam_op(extensions_dir, tmp_path):
    """The real fault: a stale lock in the build directory of a JIT-built DeepSpeed op (here the CPU
    Adam of offloaded runs), which torch's loader takes on every load, built or not. Without the
    guard this start never ends. The build directory is a copy of this machine's built op (built
    here first if need be, as the offload tests would)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    from trace_dist.jit_lock import extensions_root

    with pytest.MonkeyPatch.context() as env:  # this machine's default build root
        env.delenv("TORCH_EXTENSIONS_DIR")
        CPUAdamBuilder().load()
        built = sorted(extensions_root().glob(f"*/{CPUAdamBuilder.NAME}/*.so"))  # <root>/<pyXY_device>/<name>
    build = extensions_dir / CPUAdamBuilder.NAME
    shutil.copytree(built[0].parent, build, ignore=shutil.ignore_patterns("lock"))
    lock = build / "lock"
    lock.touch()
    assert run_ranks(_start_deepspeed_with_cpu_adam, 1, tmp_path=tmp_path, timeout=400) == [True]
    assert not lock.exists() and any(build.glob("*.so"))
    assert sorted(p.name for p in extensions_dir.iterdir()) == [CPUAdamBuilder.NAME]


def test_eval_refuses_data_of_another_tokenizer_before_starting(conditional_export, tmp_path, capsys):
    """Fault matrix E6/E7: eval --data prepared with another tokenizer (same size or not) used to run
    silently (PPL 453 vs 407); now one line naming both sides, before any process group starts."""
    from conftest import tiny_corpus
    from trace_dist.cli import main
    from trace_dist.data.prepare import main as prepare

    (tmp_path / "other.txt").write_text("\n".join(tiny_corpus(seed=1)) + "\n")
    assert prepare(["--input", str(tmp_path / "other.txt"), "--output", str(tmp_path / "other"),
                    "--vocab-size", "512"]) == 0
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(conditional_export), "--data", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert rc == 2 and "was trained with another tokenizer" in err and str(tmp_path / "other") in err, err
    assert len(err.strip().splitlines()) == 1
    assert not torch.distributed.is_initialized()
