"""trace-dist eval / generate on a tiny randomly initialised TRACE, exported per the export contract."""

import json
import math

import pytest
import torch

from trace_dist import evaluate
from trace_dist.errors import UserError

TINY = "configs/tiny.yaml"


def coupled_model(cfg, vocab):
    """An untrained TRACE whose decoder reads z: the latent injection starts at zero (the model
    starts as the plain LM), which would make every test of the latent path pass vacuously."""
    from trace_dist.model.trace import TRACE

    torch.manual_seed(0)
    model = TRACE(cfg.model, vocab)
    for p in model.injection.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.fixture(scope="module")
def tiny_export(tiny_data, tmp_path_factory):
    """An export directory (model.safetensors + config.yaml + tokenizer.json) of an untrained tiny
    model whose decoder depends on z."""
    from safetensors.torch import save_model

    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer

    out = tmp_path_factory.mktemp("export")
    cfg = load_config([TINY], [f"data.path={tiny_data}", f"train.output_dir={out}"])
    tokenizer, vocab = load_tokenizer(tiny_data)
    save_model(coupled_model(cfg, vocab), str(out / "model.safetensors"))
    (out / "config.yaml").write_text(cfg.to_yaml())
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def _likelihood(export, overrides=(), seed=1, **kw):
    from trace_dist.checkpoint import load_for_inference

    model, cfg, _, vocab = load_for_inference(export, list(overrides))
    return evaluate.likelihood_metrics(model, cfg, vocab, "test", iw_samples=3, seed=seed, device="cpu", **kw)[0]


def test_likelihood_and_latent_metrics(tiny_export):
    m = _likelihood(tiny_export)
    assert m["num_examples"] > 10 and m["num_tokens"] > m["num_examples"]
    assert math.isfinite(m["nll_iw"]) and m["ppl_iw"] == pytest.approx(math.exp(m["nll_iw"]))
    assert m["elbo"] == pytest.approx(-(m["rec"] + m["kl"]))
    # the LayerNorm residual posterior guarantees every segment's KL >= d * gamma^2 / 2
    assert m["kl_floor"] > 0 and min(m["kl_per_segment"]) >= m["kl_floor"] * (1 - 1e-6)
    assert 0 <= m["au"] <= m["au_max"] and len(m["au_per_segment"]) == 8
    # MI per segment position over the documents that have it; `mi` is the first position's
    assert 1 <= len(m["mi_per_segment"]) <= len(m["kl_per_segment"]) and m["mi"] == m["mi_per_segment"][0]
    assert m["mi"] <= math.log(m["num_examples"]) + 1.0
    again = _likelihood(tiny_export)
    assert again == m                                        # seeded per example: reproducible
    assert _likelihood(tiny_export, seed=2)["nll_iw"] != m["nll_iw"]


def test_mi_noise_is_per_document_and_independent_of_the_other_documents():
    keys = [3, 5, 5, 9]                                       # 5 occurs twice: a duplicate document
    eps = evaluate.mi_noise(keys, seed=1, shape=(2, 4))
    assert eps.shape == (4, 2, 4) and eps.dtype == torch.float64
    assert not torch.equal(eps[1], eps[2])                    # duplicates get independent samples
    alone = evaluate.mi_noise([5, 5], seed=1, shape=(2, 4))   # another rank count / split: same draws
    assert torch.equal(alone, eps[1:3])
    assert not torch.equal(evaluate.mi_noise(keys, seed=2, shape=(2, 4)), eps)


def assert_same_figures(got: dict, expected: dict, rel: float = 1e-6) -> None:
    """Equal metric dicts: integers exactly, floats (and lists of them) to `rel` (MI, a difference
    of nearly equal terms that can be near 0, also to 1e-6 absolute)."""
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float)):
            assert got[k] == pytest.approx(v, rel=rel, abs=1e-6 if k.startswith("mi") else 0), k
        else:
            assert got[k] == v, k


def _test_documents(model, cfg, vocab):
    from trace_dist.data import eval_loader

    return [ex for b in eval_loader(cfg.data, vocab, "test", 4, 0, 1) for ex in evaluate.single_examples(b)]


def _figures(model, cfg, sums, rows, seed=1):
    return evaluate.finish_likelihood(sums, sorted(rows, key=lambda r: r["key"]), model.latent.kl_floor,
                                      cfg.eval.au_delta, seed)


def test_batched_likelihood_equals_the_batch1_reference(tiny_export):
    """Any token budget gives the figures of the former batch-1 path (benchmarks/eval_reference.py): budget
    1 (every document is over it, so each runs alone), a few documents per batch, the whole split in
    one batch (documents of different lengths padded together)."""
    from eval_reference import likelihood_pass_batch1

    from trace_dist.checkpoint import load_for_inference

    model, cfg, _, vocab = load_for_inference(tiny_export)
    examples = _test_documents(model, cfg, vocab)
    lengths = [ex["tokens"].shape[1] for ex in examples]
    assert len(set(lengths)) > 3
    reference = _figures(model, cfg, *likelihood_pass_batch1(model, examples, 3, 1, "cpu"))
    for budget, num_batches in ((1, len(examples)), (3 * 5 * max(lengths), None), (10 ** 9, 1)):
        batches = evaluate.length_batches(lengths, 3, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(examples)))
        assert num_batches is None or len(batches) == num_batches
        assert all(len(b) * 3 * max(lengths[i] for i in b) <= budget for b in batches if len(b) > 1)
        got = _figures(model, cfg, *evaluate.likelihood_pass(model, examples, 3, 1, "cpu", budget, progress=False))
        assert_same_figures(got, reference)


def test_max_documents_takes_the_first_documents_by_content_hash(tiny_export):
    from trace_dist.checkpoint import load_for_inference

    model, cfg, _, vocab = load_for_inference(tiny_export)
    examples = sorted(_test_documents(model, cfg, vocab), key=evaluate.example_key)[:5]
    expected = _figures(model, cfg, *evaluate.likelihood_pass(model, examples, 3, 1, "cpu", 1, progress=False))
    got = _likelihood(tiny_export, max_documents=5)
    assert got["num_examples"] == 5
    assert got.pop("sources") == {"data": got}                # one prepared set: its own only source
    assert_same_figures(got, expected)


def test_log_weights_decodes_the_importance_samples_as_one_batch(tiny_export):
    """log_weights with S samples in one batch = S calls with one sample each, for the same noise."""
    from trace_dist.checkpoint import load_for_inference

    model, cfg, _, vocab = load_for_inference(tiny_export)
    batch = evaluate.collate(_test_documents(model, cfg, vocab)[:3], vocab.pad)
    eps = torch.randn(3, 4, int(batch["num_segments"].max()), cfg.model.latent_size,
                      generator=torch.Generator().manual_seed(0))
    together = model.log_weights(batch, 4, eps=eps)
    apart = torch.cat([model.log_weights(batch, 1, eps=eps[:, s:s + 1]) for s in range(4)], dim=1)
    torch.testing.assert_close(together, apart, rtol=1e-6, atol=1e-5)
    assert (together[:, 0] - together[:, 1]).abs().min() > 1e-3           # the noise (and z) matter


def test_parallel_and_sequential_latent_paths_agree(tiny_export):
    parallel = _likelihood(tiny_export, ["model.latent_path=parallel"])
    sequential = _likelihood(tiny_export, ["model.latent_path=sequential"])
    for k in ("elbo", "rec", "kl", "nll_iw", "mi"):
        assert sequential[k] == pytest.approx(parallel[k], rel=1e-5), k


def _eval_cli(export, out, *extra):
    return evaluate.main(["--checkpoint", str(export), "--iw-samples", "2", "--num-samples", "6", "--output", str(out),
                          "--no-progress", "generation.max_new_tokens=12", *extra])


@pytest.fixture
def single_process_env(monkeypatch):
    """Rendezvous variables for the in-process group, restored afterwards (no leak into other tests)."""
    from trace_dist.ports import free_port

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)


@pytest.mark.slow
def test_batch_size_budget_and_rank_count_do_not_change_the_figures(tiny_export, tmp_path, single_process_env):
    """One rank with every document alone (budget 1), one rank with the whole split in one batch, two
    ranks at the default budget: the same JSON figures and samples."""
    from dist_utils import run_ranks

    assert _eval_cli(tiny_export, tmp_path / "alone.json", "--token-budget", "1") == 0
    assert _eval_cli(tiny_export, tmp_path / "big.json", "--token-budget", "1000000000") == 0
    assert run_ranks(_eval_cli, 2, str(tiny_export), str(tmp_path / "two.json"), tmp_path=tmp_path,
                     timeout=300) == [0, 0]
    alone, big, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("alone", "big", "two"))
    assert (alone["world_size"], big["world_size"], two["world_size"]) == (1, 1, 2)
    assert alone["batching"]["token_budget"] == 1 and two["batching"]["token_budget"] == evaluate.TOKEN_BUDGET
    for other in (big, two):
        assert other["samples"] == alone["samples"]
        assert_same_figures(other["metrics"], alone["metrics"])
        assert_same_figures(other["sources"]["data"], alone["sources"]["data"])


# ------------------------------------------------------------------ generation
def test_eval_cli_end_to_end(tiny_export, tmp_path, single_process_env):
    out = tmp_path / "metrics.json"
    assert _eval_cli(tiny_export, out) == 0
    report = json.loads(out.read_text())
    m = report["metrics"]
    for key in ("nll_iw", "ppl_iw", "bpb_iw", "word_ppl_iw", "bpb_elbo", "word_ppl_elbo", "elbo", "kl", "mi", "au",
                "bleu_2", "self_bleu_4", "distinct_1", "len_mean"):
        assert key in m and math.isfinite(m[key]), key
    assert list(report["sources"]) == ["data"] and report["sources"]["data"]["bpb_iw"] == m["bpb_iw"]
    assert "sources" not in m and "byte" in report["text_count"]
    assert report["world_size"] == 1 and report["num_samples"] == 6 and report["tokenization"]
    assert len(report["data_manifest_sha256"]) == 64
    assert list((tiny_export / "tensorboard" / "eval").glob("events.out.tfevents.*"))
    assert _eval_cli(tiny_export, tmp_path / "again.json") == 0
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == m


def test_generate_cli_modes_reproducible(tiny_export, tmp_path):
    from trace_dist import generate

    def run(name, *args):
        out = tmp_path / f"{name}.jsonl"
        assert generate.main(["--checkpoint", str(tiny_export), "--output", str(out), "--max-new-tokens", "10",
                              *args]) == 0
        return [json.loads(line) for line in out.read_text().splitlines()]

    prior = run("a", "--num", "5", "--batch-size", "2", "--seed", "3")
    assert [r["index"] for r in prior] == list(range(5)) and all(r["mode"] == "prior" for r in prior)
    assert run("b", "--num", "5", "--batch-size", "2", "--seed", "3") == prior
    assert run("c", "--num", "5", "--batch-size", "2", "--seed", "4") != prior
    text_a, text_b = "The cat watched the garden. The robot sold a green apple!", "Our teacher found an empty box."
    rec = run("d", "--reconstruct", text_a, "--num", "2")
    assert len(rec) == 2 and rec[0]["mode"] == "reconstruct"
    inter = run("e", "--interpolate", text_a, text_b, "--steps", "3", "--num", "1")
    assert [r["t"] for r in inter] == [0.0, 0.5, 1.0]


def test_posterior_mean_of_a_raw_text_equals_the_prepared_document(tiny_export, tiny_data):
    """A test document's raw text through `generate` has the posterior the eval pipeline computes
    for the same document read from the prepared shards."""
    from test_data_prepare import records

    from trace_dist.checkpoint import load_for_inference
    from trace_dist.data import eval_loader
    from trace_dist.generate import interpolation, posterior_mean

    model, cfg, tokenizer, vocab = load_for_inference(tiny_export)
    record = next(iter(records(tiny_data, "test")))
    ex = next(evaluate.single_examples(next(iter(eval_loader(cfg.data, vocab, "test", 1, 0, 1)))))
    tokens = ex["tokens"][0]
    assert tokens[tokens > vocab.sep].tolist() == record.ids.tolist() and len(record.bounds) > 1   # the same document
    expected = model.posterior(ex)["mean"][0, : len(record.bounds)]
    assert torch.equal(posterior_mean(model, record.text, tokenizer, cfg, vocab, "cpu"), expected)
    with pytest.raises(UserError, match="special-token"):
        posterior_mean(model, "The cat <|eos|> sat.", tokenizer, cfg, vocab, "cpu")
    z = interpolation(torch.zeros(3, 2), torch.ones(2, 2), steps=3)
    assert z.shape == (3, 2, 2) and torch.equal(z[1], torch.full((2, 2), 0.5))


def test_conditional_eval_and_prompt_generation(tmp_path, single_process_env):
    """Prompt -> story data: eval continues each test prompt (BLEU against its own reference)."""
    from safetensors.torch import save_model

    from conftest import tiny_corpus
    from trace_dist import generate
    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer
    from trace_dist.data.prepare import main as prepare
    from trace_dist.model.trace import TRACE

    rows = [{"prompt": doc.split(".")[0], "target": doc} for doc in tiny_corpus(120, seed=1)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "data"
    assert prepare(["--input", str(tmp_path / "pairs.jsonl"), "--output", str(data), "--conditional",
                    "--vocab-size", "400", "--valid-fraction", "0.1", "--test-fraction", "0.1"]) == 0
    cfg = load_config([TINY], [f"data.path={data}", "model.conditional=true"])
    tokenizer, vocab = load_tokenizer(data)
    export = tmp_path / "export"
    export.mkdir()
    torch.manual_seed(0)
    save_model(TRACE(cfg.model, vocab), str(export / "model.safetensors"))
    (export / "config.yaml").write_text(cfg.to_yaml())
    tokenizer.save(str(export / "tokenizer.json"))

    assert _eval_cli(export, tmp_path / "m.json") == 0
    report = json.loads((tmp_path / "m.json").read_text())
    n_test = report["metrics"]["num_examples"]
    assert report["num_samples"] == min(6, n_test) and 0 <= report["metrics"]["bleu_2"] <= 1
    out = tmp_path / "p.jsonl"
    assert generate.main(["--checkpoint", str(export), "--prompt", "The cat watched", "--num", "2",
                          "--max-new-tokens", "8", "--output", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in got] == ["The cat watched"] * 2


def test_bad_batch_flags_end_in_one_line(capsys):
    from trace_dist import cli

    for flag in ("--token-budget", "--max-documents"):
        assert cli.main(["eval", "--checkpoint", "nowhere", flag, "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"trace-dist eval: {flag} must be at least 1, got 0", err
