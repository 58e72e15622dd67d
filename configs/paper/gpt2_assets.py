"""Build the GPT-2 assets the paper configs need: `python configs/paper/gpt2_assets.py gpt2/ assets/gpt2-trace`.

SRC is a local copy of Hugging Face "gpt2" (config.json, model.safetensors or pytorch_model.bin,
tokenizer.json), e.g. from `huggingface-cli download gpt2 --local-dir gpt2` on a machine with
internet. trace-dist needs the special tokens <|pad|> <|bos|> <|eos|> <|sep|> at ids 0..3
(docs/INTERFACES.md), and `model.init_from` needs the weights' vocab_size to equal the
tokenizer's. GPT-2 has neither, so every GPT-2 id i becomes i + 4 (BPE merges are stored by
string and stay valid), the four specials take 0..3, and `wte` (tied to the LM head) gets four
new rows in front, initialised to the mean embedding. DST then holds config.json (vocab_size
50261), model.safetensors and tokenizer.json; use DST as `model.init_from` and DST/tokenizer.json
as `trace-dist prepare --tokenizer`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trace_dist.model.gpt2 import read_gpt2  # noqa: E402
from trace_dist.vocab import SPECIAL_TOKENS  # noqa: E402

SHIFT = len(SPECIAL_TOKENS)


def shift_tokenizer(tok: dict) -> dict:
    """A tokenizer.json dict with every id moved up by SHIFT and the specials at 0..SHIFT-1."""
    if tok.get("model", {}).get("type") != "BPE":
        raise ValueError("expected a BPE tokenizer.json (GPT-2's)")
    clash = [t for t in SPECIAL_TOKENS if t in tok["model"]["vocab"]]
    if clash:
        raise ValueError(f"tokenizer already contains {clash}")
    tok = dict(tok)
    # the specials must be in the model's vocab too, or `tokenizers` appends them after it
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {t: i + SHIFT for t, i in tok["model"]["vocab"].items()}
    tok["model"] = dict(tok["model"], vocab=vocab)
    specials = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)]
    tok["added_tokens"] = specials + [dict(a, id=a["id"] + SHIFT) for a in tok.get("added_tokens", [])]
    return tok


def build(src: Path, dst: Path) -> None:
    from safetensors.torch import save_file

    config, state = read_gpt2(src)
    tok = shift_tokenizer(json.loads((src / "tokenizer.json").read_text()))
    wte = state["wte.weight"]                                            # [V, C]
    if wte.shape[0] != config["vocab_size"]:
        raise ValueError(f"{src}: wte has {wte.shape[0]} rows but config.json says vocab_size {config['vocab_size']}")
    state["wte.weight"] = torch.cat([wte.mean(0, keepdim=True).repeat(SHIFT, 1), wte])  # [V + 4, C]
    state.pop("lm_head.weight", None)                                    # tied to wte
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(dict(config, vocab_size=config["vocab_size"] + SHIFT), indent=1))
    (dst / "tokenizer.json").write_text(json.dumps(tok))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    build(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]}: config.json, model.safetensors, tokenizer.json")
