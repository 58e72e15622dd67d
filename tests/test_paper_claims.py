"""benchmarks/paper_claims.py (the claims study) and the configs it and GPU users start from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "paper_claims.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import paper_claims  # noqa: E402

from trace_dist.config import load_config  # noqa: E402

PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.yaml"))


def test_paper_configs_validate_with_della_hyperparameters():
    names = {p.name for p in PAPER_CONFIGS}
    assert {"gpt2_base.yaml", "yelp.yaml", "yahoo.yaml", "writingprompts.yaml"} <= names
    for path in PAPER_CONFIGS:
        cfg = load_config(path)
        assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (12, 12, 768), path.name
        assert cfg.model.init_from and cfg.model.block_size <= 1024, path.name
        assert cfg.model.latent_size == 32 and cfg.train.lr == 5e-5, path.name
        assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (4, 8), path.name
        assert cfg.precision == "bf16" and cfg.zero.stage == 2, path.name
        ds = cfg.deepspeed_config_dict(world_size=8)
        assert ds["train_batch_size"] == 4 * 8 * 8 and ds["bf16"]["enabled"], path.name
    assert load_config(REPO / "configs" / "paper" / "writingprompts.yaml").model.conditional


def test_claims_config_validates_for_every_model_switch():
    for name, overrides in paper_claims.MODELS.items():
        cfg = load_config(REPO / "configs" / "claims.yaml", overrides)
        assert cfg.train.max_steps >= 50, name
    base = load_config(REPO / "configs" / "claims.yaml")
    assert load_config(REPO / "configs" / "claims.yaml", paper_claims.SMOKE_OVERRIDES).model.n_embd < base.model.n_embd


def run_script(tmp_path: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--work",
                           str(tmp_path / "work"), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_a_failed_run_is_reported_not_fatal(tmp_path):
    """Data without a manifest: every train fails; the study still writes its table, JSON and plots."""
    (tmp_path / "empty").mkdir()
    proc = run_script(tmp_path, "--smoke", "--data", str(tmp_path / "empty"), timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "train failed (rc 2)" in md and "no manifest.json" in md
    assert "| LM | 0 ok, 1 failed |" in md
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["model"] for r in runs] == list(paper_claims.SMOKE_MODELS)
    assert all(r["status"].startswith("train failed") for r in runs)
    assert (tmp_path / "out" / "results_kl_per_segment.png").stat().st_size > 0
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["runs_ok"] == 0 and figures["runs"] == 2


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path, tiny_data):
    proc = run_script(tmp_path, "--smoke", "--data", str(tiny_data), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    md = (out / "results.md").read_text()
    header = "| model | runs | " + " | ".join(c for c, _, _ in paper_claims.COLUMNS) + " |"
    assert header in md
    for name in paper_claims.SMOKE_MODELS:
        assert f"| {name} | 1 ok |" in md
    assert md.count("**holds**") + md.count("**does not hold**") == 3
    assert paper_claims.NOTES_MARKER in md
    for png in ("results_diversity_quality.png", "results_kl_per_segment.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {r["model"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    trace, lm = runs["TRACE-par"], runs["LM"]
    assert trace["status"] == lm["status"] == "ok"
    for _, key, _ in paper_claims.COLUMNS:
        assert key in trace, key
    assert trace["kl"] > 0 and trace["kl_seg_min"] >= trace["kl_floor"] - 1e-6  # the LayerNorm floor
    assert lm["kl"] == 0 and trace["tokens_per_s"] > 0
    # each run really went through the trainer and the evaluator
    assert (Path(trace["run_dir"]) / "metrics.jsonl").exists() and (Path(trace["run_dir"]) / "eval_test.json").exists()
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["runs_ok"] == 2 and "claim_a_holds" in figures
    # regenerating keeps hand-written notes below the marker
    (out / "results.md").write_text(md + "\nmy note\n")
    rows = json.loads((out / "results.json").read_text())["runs"]
    agg = paper_claims.aggregate(rows, list(paper_claims.SMOKE_MODELS))
    paper_claims.write_report(out, rows, agg, paper_claims.judge_claims(agg, rows), "cmd", 1.0, "now", "budget")
    assert (out / "results.md").read_text().endswith("\nmy note\n")


def test_gpt2_assets_shift_vocab_and_weights(tmp_path):
    """configs/paper/gpt2_assets.py on a tiny GPT-2-format model + tokenizer: the result loads as a
    trace-dist tokenizer (specials at 0..3), encodes every text as GPT-2's ids + 4, and
    `model.init_from` loads it with GPT-2's embedding rows at +4."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import ByteLevelBPETokenizer

    from trace_dist.data import load_tokenizer
    from trace_dist.model import TRACE
    from model_batches import tiny_config

    sys.path.insert(0, str(REPO / "configs" / "paper"))
    import gpt2_assets

    src, dst = tmp_path / "gpt2", tmp_path / "gpt2-trace"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["The cat sat on the mat.", "A dog ran after the ball!"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=64,
                                                              n_embd=32, n_layer=2, n_head=2))
    hf.save_pretrained(src)
    bpe.save(str(src / "tokenizer.json"))

    gpt2_assets.build(src, dst)
    tokenizer, vocab = load_tokenizer(dst / "tokenizer.json")
    assert (vocab.pad, vocab.bos, vocab.eos, vocab.sep) == (0, 1, 2, 3)
    assert vocab.size == bpe.get_vocab_size() + 4
    text = "The dog sat on the ball."
    assert tokenizer.encode(text).ids == [i + 4 for i in bpe.encode(text).ids]
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    model = TRACE(tiny_config(init_from=str(dst)), vocab)
    assert torch.equal(model.wte.weight[4:], hf.transformer.wte.weight)


def test_paired_path_speed_times_both_paths_on_real_batches(tiny_data):
    speed = paper_claims.paired_path_speed(REPO / "configs" / "claims.yaml", tiny_data,
                                           list(paper_claims.SMOKE_OVERRIDES), rounds=2)
    assert set(speed["seconds_per_step"]) == set(paper_claims.TRACE_PATHS)
    assert all(t > 0 for t in speed["seconds_per_step"].values()) and speed["speedup"] > 0
    assert speed["rounds"] == 2
