"""benchmarks/paper_claims.py (the claims study), its corpus reader and the configs it and GPU users start from."""

import gzip
import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import paper_claims
import pytest

from trace_dist.config import load_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "paper_claims.py"

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
    assert len(paper_claims.MODELS) == 8 and len(paper_claims.TEMPERATURES) >= 4
    assert paper_claims.parse([]).seeds >= 3
    for name, overrides in paper_claims.MODELS.items():
        cfg = load_config(REPO / "configs" / "claims.yaml", overrides)
        assert cfg.train.max_steps >= 100 and cfg.kl.free_bits > 0, name
    base = load_config(REPO / "configs" / "claims.yaml")
    assert load_config(REPO / "configs" / "claims.yaml", paper_claims.SMOKE_OVERRIDES).model.n_embd < base.model.n_embd


# ------------------------------------------------------------------------------ judge_claims on synthetic tables
TEMPS = paper_claims.TEMPERATURES


def synthetic_runs(model: str, self_bleu_shift: float, noise: float, seed: int, mi: float = 0.5,
                   nll: float = 2.0, seeds: int = 3, groups: int = 4) -> list[dict]:
    """Runs of one model whose frontier is the shared curve BLEU-4 = 0.02 + 0.02 t', Self-BLEU-4 =
    0.1 + 0.2 t' + shift, Distinct-2 = 0.9 - 0.2 t' - shift (t' = 1.2 - temperature, so colder
    sampling is closer to the data and less diverse), plus Gaussian noise per seed and group."""
    rng = np.random.default_rng(seed)
    runs = []
    for s in range(seeds):
        seed_offset = rng.normal(0, noise / 2)  # seeds differ less than groups of samples
        frontier = []
        for t in TEMPS:
            c = 1.2 - t
            frontier.append({"temperature": t, "groups": [
                {"bleu_4": 0.02 + 0.02 * c + rng.normal(0, noise / 10),
                 "self_bleu_4": 0.1 + 0.2 * c + self_bleu_shift + seed_offset + rng.normal(0, noise),
                 "distinct_2": 0.9 - 0.2 * c - self_bleu_shift - seed_offset + rng.normal(0, noise)}
                for _ in range(groups)]})
        runs.append({"model": model, "seed": s + 1, "status": "ok", "frontier": frontier, "kl": 40.0,
                     "kl_seg_min": 4.5, "kl_floor": 4.0, "bpb_iw": nll + rng.normal(0, 0.01),
                     "mi_seg_mean": mi, "mi_boot": list(mi + rng.normal(0, 0.02, 50))})
    return runs


@pytest.mark.parametrize("shift, expected", [(-0.05, "above"), (0.05, "below"), (0.0, "within noise")])
def test_compare_frontiers_clear_win_clear_loss_and_tie(shift, expected):
    rows = synthetic_runs("A", shift, noise=0.01, seed=1) + synthetic_runs("B", 0.0, noise=0.01, seed=2)
    for key, _, lower in paper_claims.DIVERSITY:
        got = paper_claims.compare_frontiers(rows, "A", "B", key, lower, replicates=200)
        assert got["verdict"] == expected, (key, got)
        assert got["ci"][0] <= got["gap"] <= got["ci"][1]
        if expected != "within noise":
            assert abs(got["gap"]) == pytest.approx(0.05, abs=0.02)


def test_compare_frontiers_without_common_quality_range_says_so():
    rows = synthetic_runs("A", -0.05, noise=0.001, seed=1) + synthetic_runs("B", 0.0, noise=0.001, seed=2)
    for r in rows:
        if r["model"] == "B":
            for f in r["frontier"]:
                for g in f["groups"]:
                    g["bleu_4"] += 1.0  # B's samples all score far above A's: no equal-quality points
    assert paper_claims.compare_frontiers(rows, "A", "B", "self_bleu_4", True, replicates=50)["verdict"] == "no overlap"


def judged(trace_shift: float, trace_mi: float, noise: float = 0.01) -> dict:
    rows = []
    for i, name in enumerate(paper_claims.MODELS):
        shift = trace_shift if name.startswith("TRACE") else 0.0
        runs = synthetic_runs(name, shift, noise, seed=10 + i, mi=trace_mi if name.startswith("TRACE") else 0.01)
        if name == "LM":
            for r in runs:
                del r["mi_seg_mean"], r["mi_boot"]
                r.update(kl=0.0, kl_seg_min=0.0, kl_floor=0.0)
        rows += runs
    return paper_claims.judge_claims(rows, speed={"speedup": 1.2}, replicates=200)


def test_judge_claims_clear_win():
    v = judged(trace_shift=-0.05, trace_mi=0.5)
    assert v["a"]["holds"] and v["a"]["mi"]["TRACE-par"]["ci"][0] > 0
    assert v["b"]["holds"], v["b"]["evidence"]
    assert set(v["b"]["frontiers"]) == {"LM", "Optimus", "BN-VAE", "IND", "CGD"}
    assert v["c"]["holds"] and v["c"]["same_quality"]


def test_judge_claims_clear_loss():
    v = judged(trace_shift=0.05, trace_mi=0.5)
    assert not v["b"]["holds"]
    assert all(f[k]["verdict"] == "below" for f in v["b"]["frontiers"].values() for k in ("self_bleu_4", "distinct_2"))


def test_judge_claims_tie_within_noise_and_uninformative_latents():
    v = judged(trace_shift=0.0, trace_mi=0.0, noise=0.02)
    assert not v["b"]["holds"]
    assert all(f[k]["verdict"] == "within noise" for f in v["b"]["frontiers"].values()
               for k in ("self_bleu_4", "distinct_2"))
    assert not v["a"]["holds"]  # MI CI straddles 0
    assert v["a"]["mi"]["TRACE-par"]["ci"][0] < 0 < v["a"]["mi"]["TRACE-par"]["ci"][1]


def test_mi_bootstrap_separates_informative_from_identical_posteriors():
    import torch

    def rows(spread: float) -> list[dict]:
        g = torch.Generator().manual_seed(0)
        return [{"key": i, "innov_mean": spread * torch.randn(3, 4, generator=g), "innov_logvar": torch.full((3, 4), -2.0),
                 "seg_mask": torch.tensor([True, True, i % 2 == 0])} for i in range(40)]

    point, informative = paper_claims.mi_with_bootstrap(rows(2.0), seed=1, replicates=30)
    assert point > 1.0 and np.percentile(informative, 2.5) > 1.0
    point, collapsed = paper_claims.mi_with_bootstrap(rows(0.0), seed=1, replicates=30)
    assert abs(point) < paper_claims.MI_TOL and max(collapsed) < paper_claims.MI_TOL  # no information: 0


# ------------------------------------------------------------------------------ the corpus reader
def xdr(*ints: int) -> bytes:
    return struct.pack(f">{len(ints)}i", *ints)


def r_strings(values: list[str]) -> bytes:
    """An R character vector in XDR serialization (STRSXP of UTF-8 CHARSXPs)."""
    out = xdr(16, len(values))
    for v in values:
        b = v.encode()
        out += xdr(9 | (1 << 15), len(b)) + b
    return out


def r_named_list(items: list[bytes], names: list[str]) -> bytes:
    """VECSXP with a names attribute (pairlist: tag symbol 'names' -> STRSXP)."""
    return (xdr(19 | (1 << 9), len(items)) + b"".join(items) + xdr(2 | (1 << 10)) + xdr(1) + xdr(9, 5) + b"names"
            + r_strings(names) + xdr(254))


def test_lazyload_reader_and_austen_packing(tmp_path, monkeypatch):
    """A hand-made R lazy-load database in the layout of r-cran-janeaustenr's data/ -> documents: the
    XDR reader, the pinned checksum, headings as chapter breaks and the 60-160 word packing."""
    from trace_dist.data import corpora
    from trace_dist.errors import UserError

    header = b"X\n" + xdr(3, 0x040201, 0x030500, 5) + b"UTF-8"
    chapter = ["CHAPTER I", ""] + [f"Sentence {i} of the first chapter has ten words in it." if i % 3 else ""
                                   for i in range(1, 40)] + ["", "CHAPTER II", "", "A short close here, alone.", ""]
    novels = {name: chapter for name in corpora.AUSTEN_NOVELS}
    rdb, index = b"", []
    for name, lines in novels.items():
        blob = header + r_strings(lines)
        record = struct.pack(">I", len(blob)) + zlib.compress(blob)
        index.append(xdr(13, 2, len(rdb), len(record)))
        rdb += record
    rdx = header + r_named_list([r_named_list(index, list(novels)), r_named_list([], []), xdr(13, 1, 1)],
                                ["variables", "references", "compressed"])
    data = tmp_path / "janeaustenr" / "data"
    data.mkdir(parents=True)
    (data / "Rdata.rdb").write_bytes(rdb)
    (data / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    assert corpora.read_lazyload_db(data)["emma"] == chapter

    with pytest.raises(UserError, match="not the pinned"):
        list(corpora.austen_documents(tmp_path))
    monkeypatch.setattr(corpora, "AUSTEN_RDB_SHA256", hashlib.sha256(rdb).hexdigest())
    docs = list(corpora.austen_documents(tmp_path))
    assert len(docs) == 6 * len(list(corpora.pack_documents(corpora._paragraphs(chapter))))
    for where, text in docs:
        assert corpora.MIN_WORDS // 2 <= len(text.split()) <= corpora.MAX_WORDS, where
        assert "CHAPTER" not in text and "alone" not in text  # headings dropped; a 5-word chapter is too short
    with pytest.raises(UserError, match="janeaustenr data not found"):
        corpora.find_austen(tmp_path / "nowhere")


def run_script(tmp_path: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--work",
                           str(tmp_path / "work"), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_a_failed_run_is_reported_not_fatal(tmp_path):
    """Data without a manifest: every train fails; the study still writes its table, JSON and plots."""
    (tmp_path / "empty").mkdir()
    proc = run_script(tmp_path, "--smoke", "--data", str(tmp_path / "empty"), timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "train failed (rc 2)" in md and "empty/manifest.json (run `trace-dist prepare` first)" in md
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
    for png in ("results_frontiers.png", "results_kl_per_segment.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    runs = {r["model"]: r for r in saved["runs"]}
    trace, lm = runs["TRACE-par"], runs["LM"]
    assert trace["status"] == lm["status"] == "ok"
    for _, key, _ in paper_claims.COLUMNS:
        assert key in trace, key
    assert trace["kl"] > 0 and trace["kl_seg_min"] >= trace["kl_floor"] - 1e-6  # the LayerNorm floor
    assert lm["kl"] == 0 and trace["tokens_per_s"] > 0
    # per-byte NLL: same test bytes for every model; bits/byte = nats / ln 2 / bytes
    assert trace["num_bytes"] == lm["num_bytes"] > 0
    assert lm["bpb_iw"] == pytest.approx(
        lm["nll_iw_per_example"] * lm["num_examples"] / np.log(2) / lm["num_bytes"])
    # every model sampled at every temperature, in groups; MI with its bootstrap replicates
    for r in (trace, lm):
        assert [f["temperature"] for f in r["frontier"]] == list(paper_claims.TEMPERATURES)
        assert all(len(f["groups"]) == paper_claims.SMOKE_GROUPS for f in r["frontier"])
    assert len(trace["mi_boot"]) == paper_claims.MI_BOOTSTRAP and "mi_boot" not in lm
    assert set(saved["verdicts"]["b"]["frontiers"]) == {"LM"}
    # each run really went through the trainer
    assert (Path(trace["run_dir"]) / "metrics.jsonl").exists()
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["runs_ok"] == 2 and "claim_a_holds" in figures and "trace_mi_ci" in figures
    # regenerating keeps hand-written notes below the marker
    (out / "results.md").write_text(md + "\nmy note\n")
    rows = saved["runs"]
    agg = paper_claims.aggregate(rows, list(paper_claims.SMOKE_MODELS))
    paper_claims.write_report(out, rows, agg, paper_claims.judge_claims(rows, replicates=50), "cmd", 1.0, "now",
                              "budget")
    assert (out / "results.md").read_text().endswith("\nmy note\n")


def test_gpt2_assets_shift_vocab_and_weights(tmp_path):
    """configs/paper/gpt2_assets.py on a tiny GPT-2-format model + tokenizer: the result loads as a
    trace-dist tokenizer (specials at 0..3), encodes every text as GPT-2's ids + 4, and
    `model.init_from` loads it with GPT-2's embedding rows at +4."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import ByteLevelBPETokenizer

    from trace_dist.data import load_tokenizer
    from trace_dist.model.trace import TRACE
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
