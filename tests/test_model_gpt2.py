"""model.init_from: a random tiny Hugging Face GPT-2 saved to disk loads into TRACE exactly."""

import pytest
import torch

from model_batches import tiny_config
from trace_dist.model.trace import TRACE
from trace_dist.vocab import Vocab

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=61, n_positions=80, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a wrong mapping cannot pass
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    return path, hf


def test_no_latent_decoder_reproduces_gpt2_logits(gpt2_dir):
    path, hf = gpt2_dir
    vocab = Vocab(size=hf.config.vocab_size, bos=60, eos=59, pad=0, sep=58)
    model = TRACE(tiny_config(latent="none", init_from=str(path)), vocab).eval()
    ids = torch.randint(0, 61, (2, 20))
    ours = model.decode(ids, torch.arange(20), torch.full_like(ids, -1), None)
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_separate_encoder_and_decoder_both_loaded(gpt2_dir):
    path, hf = gpt2_dir
    vocab = Vocab(size=61, bos=1, eos=2, pad=0, sep=3)
    model = TRACE(tiny_config(share_blocks=False, init_from=str(path)), vocab)
    w = hf.transformer.h[1].mlp.c_fc.weight.T
    assert torch.equal(model.decoder.h[1].mlp.c_fc.weight, w) and torch.equal(model.encoder.h[1].mlp.c_fc.weight, w)
    assert torch.equal(model.wpe.weight, hf.transformer.wpe.weight[:64])


def test_mismatched_config_names_the_field(gpt2_dir):
    path, _ = gpt2_dir
    vocab = Vocab(size=61, bos=1, eos=2, pad=0, sep=3)
    with pytest.raises(ValueError, match="model.n_layer=3"):
        TRACE(tiny_config(n_layer=3, init_from=str(path)), vocab)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TRACE(tiny_config(init_from=str(path / "nowhere")), vocab)
