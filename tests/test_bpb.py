"""Segmentation-fair likelihood (issue 13): bits/byte and per-word PPL normalise by the text, not the tokens.

The normaliser of a document is the UTF-8 byte count and whitespace word count of the text the model
scored: the whole stored text whatever data.segment is, and only the kept part when a load-time
limit cuts the document.
"""

import math

import pytest
import torch
from test_data_prepare import records
from test_evaluate import _likelihood, tiny_export  # noqa: F401  (the fixture)
from test_faults_data import cfg_for, unicode_data
from test_remote_data import other_data  # noqa: F401  (the fixture)

from trace_dist import evaluate, metrics
from trace_dist.data import eval_loader, load_tokenizer


@pytest.mark.parametrize("segment", ["sentence", "fixed:4", "fixed:32"])
def test_normaliser_is_the_raw_text_under_every_segmentation(tmp_path_factory, segment):
    path = unicode_data(tmp_path_factory) / "plain"
    _, vocab = load_tokenizer(path)
    docs = list(records(path, "train"))
    batch = next(iter(eval_loader(cfg_for(path, segment=segment), vocab, "train", len(docs), 0, 1)))
    assert batch["example_mask"].all()
    assert batch["num_bytes"].tolist() == [len(r.text.encode("utf-8")) for r in docs]
    assert batch["num_words"].tolist() == [len(r.text.split()) for r in docs]
    if segment == "fixed:4":  # many separators, yet the same normaliser: a sep adds tokens, not text
        assert batch["loss_mask"].sum() >= 4 / 3 * sum(len(r.ids) for r in docs)


@pytest.mark.parametrize("limit", [dict(max_segments=2), dict(max_segment_tokens=4), dict(max_tokens=12)])
def test_cut_documents_count_only_the_text_kept(tmp_path_factory, limit):
    path = unicode_data(tmp_path_factory) / "plain"
    tokenizer, vocab = load_tokenizer(path)
    docs = list(records(path, "train"))
    batch = next(iter(eval_loader(cfg_for(path, segment="fixed:6", **limit), vocab, "train", len(docs), 0, 1)))
    for i, record in enumerate(docs):
        kept = batch["tokens"][i][batch["loss_mask"][i]]
        content = kept[(kept != vocab.sep) & (kept != vocab.eos)].tolist()
        assert len(content) < len(record.ids)  # every document is cut
        # the kept tokens' own bytes, from the tokenizer's byte-level strings (one character per byte)
        kept_bytes = sum(len(tokenizer.id_to_token(t)) for t in content)
        assert batch["num_bytes"][i] == kept_bytes < len(record.text.encode("utf-8"))
        # words: the kept runs of the text (segments that follow each other join up)
        assert 0 < batch["num_words"][i] <= len(record.text.split())
    if "max_segments" in limit:  # a kept prefix: its text decodes whole
        for i, record in enumerate(docs):
            prefix = tokenizer.decode(batch["tokens"][i][batch["loss_mask"][i]].tolist(), skip_special_tokens=True)
            assert batch["num_words"][i] == len(prefix.split())


def test_per_text_arithmetic():
    out = metrics.per_text(nll=100.0, num_bytes=50, num_words=10)
    assert out["bpb"] == pytest.approx(100.0 / math.log(2) / 50)
    assert out["word_ppl"] == pytest.approx(math.exp(10.0))
    with pytest.raises(ValueError, match="bytes and words"):
        metrics.per_text(1.0, 0, 3)


# ----------------------------------------------------------------------------- eval JSON and validation


def test_eval_figures_per_byte_and_word_recompute_from_the_sums(tiny_export, tiny_data):

    m = _likelihood(tiny_export)
    docs = list(records(tiny_data, "test"))
    assert m["num_examples"] == len(docs)
    assert m["num_bytes"] == sum(len(r.text.encode("utf-8")) for r in docs)   # the raw text, every document
    assert m["num_words"] == sum(len(r.text.split()) for r in docs)
    nll = m["nll_iw"] * m["num_tokens"]                                        # nats, seps and eos included
    assert m["bpb_iw"] == pytest.approx(nll / math.log(2) / m["num_bytes"], rel=1e-12)
    assert m["word_ppl_iw"] == pytest.approx(math.exp(nll / m["num_words"]), rel=1e-12)
    bound = -m["elbo"] * m["num_examples"]
    assert m["bpb_elbo"] == pytest.approx(bound / math.log(2) / m["num_bytes"], rel=1e-12)
    assert m["word_ppl_elbo"] == pytest.approx(math.exp(bound / m["num_words"]), rel=1e-12)
    assert m["bpb_elbo"] >= m["bpb_iw"] * (1 - 1e-3)                          # the IW bound is the tighter
    assert list(m["sources"]) == ["data"] and m["sources"]["data"]["bpb_iw"] == m["bpb_iw"]


def test_eval_of_a_mixture_reports_each_source_and_the_pool(tiny_export, tiny_data, other_data):
    """Each source's figures are those of evaluating that prepared set alone; the pooled ones sum both."""
    from test_evaluate import assert_same_figures

    from trace_dist.checkpoint import load_for_inference
    from trace_dist.data.config import DataConfig

    model, cfg, _, vocab = load_for_inference(tiny_export)
    mixture = [dict(path=str(tiny_data), weight=3.0, name="tiny"), dict(path=str(other_data), weight=1.0, name="other")]
    cfg.data = DataConfig(**{**cfg.data.model_dump(), "mixture": mixture})
    pooled = evaluate.likelihood_metrics(model, cfg, vocab, "test", iw_samples=3, seed=1, device="cpu")[0]
    sources = pooled.pop("sources")
    assert list(sources) == ["tiny", "other"]
    for name, path in (("tiny", tiny_data), ("other", other_data)):
        alone = _likelihood(tiny_export, [f"data.path={path}"])
        alone.pop("sources")
        assert_same_figures(sources[name], alone)
    for key in ("num_examples", "num_tokens", "num_bytes", "num_words"):
        assert pooled[key] == sources["tiny"][key] + sources["other"][key] > sources["other"][key] > 0, key
    nll = sum(s["nll_iw"] * s["num_tokens"] for s in sources.values())
    assert pooled["bpb_iw"] == pytest.approx(nll / math.log(2) / pooled["num_bytes"], rel=1e-9)
    assert pooled["nll_iw"] == pytest.approx(nll / pooled["num_tokens"], rel=1e-9)


class BareEngine(torch.nn.Module):
    """What the Validator uses of a DeepSpeed engine (`engine(batch, ...)`, `.module`, eval/train) on a plain
    model: one process, no ZeRO, so the test needs no launcher."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, batch, **kw):
        return self.module(batch, **kw)


@pytest.mark.parametrize("segment", ["sentence", "fixed:4"])
def test_validation_reports_the_bound_per_byte_and_word(tiny_data, segment):
    from test_evaluate import TINY, coupled_model

    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer
    from trace_dist.distributed import DistInfo
    from trace_dist.validator import Validator

    cfg = load_config([TINY], [f"data.path={tiny_data}", f"data.segment={segment}", "train.samples_to_log=0"])
    tokenizer, vocab = load_tokenizer(tiny_data)
    validator = Validator(cfg, BareEngine(coupled_model(cfg, vocab)), DistInfo(0, 0, 1, torch.device("cpu")), vocab,
                          tokenizer)
    m, _, _, _ = validator(step=1)
    # the scored text of the same batches, decoded back from their tokens (uncut documents: the whole text)
    batches = list(eval_loader(cfg.data, vocab, "valid", cfg.train.micro_batch_size, 0, 1))[:cfg.train.eval_batches]
    texts = [tokenizer.decode(row[mask].tolist(), skip_special_tokens=True)
             for b in batches for row, mask in zip(b["tokens"], b["loss_mask"]) if mask.any()]
    tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    nll = m["val_loss"] * tokens                                               # nats: every sep and eos
    assert m["val_bpb"] == pytest.approx(nll / math.log(2) / sum(len(t.encode("utf-8")) for t in texts), rel=1e-9)
    assert m["val_word_ppl"] == pytest.approx(math.exp(nll / sum(len(t.split()) for t in texts)), rel=1e-9)
    assert m["val_ppl_bound"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
