"""`model.init_from`: load Hugging Face GPT-2 weights from a local directory into TRACE's encoder and
decoder. Only the files are read (config.json + model.safetensors or pytorch_model.bin), so the
transformers package is not needed. HF's Conv1D stores weights as [in, out]; nn.Linear wants
[out, in], hence the transposes. Latent heads, pooling and injection keep their fresh initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_gpt2(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict without the 'transformer.' prefix)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"model.init_from: {config_file} not found (expected a save_pretrained directory)")
    config = json.loads(config_file.read_text())
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file
        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"model.init_from: no model.safetensors or pytorch_model.bin in {path}")
    return config, {k.removeprefix("transformer."): v for k, v in state.items()}


def load_gpt2(model, path: str | Path) -> None:
    """Copy GPT-2 weights into `model` (a TRACE) in place; shapes must match the model config."""
    config, state = read_gpt2(path)
    cfg = model.cfg
    expect = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "vocab_size": model.vocab_size}
    wrong = {k: (config.get(k), v) for k, v in expect.items() if config.get(k) != v}
    if wrong:
        raise ValueError("model.init_from: GPT-2 config does not match the model: "
                         + ", ".join(f"{k} is {hf} in {path} but model.{k}={ours}" for k, (hf, ours) in wrong.items()))
    if config.get("n_positions", 0) < cfg.block_size:
        raise ValueError(f"model.block_size ({cfg.block_size}) exceeds n_positions ({config.get('n_positions')}) in {path}")
    if config.get("activation_function", "gelu_new") != "gelu_new":
        raise ValueError(f"model.init_from: activation_function {config['activation_function']!r} unsupported "
                         "(the blocks use gelu_new)")

    stacks = [model.decoder] + ([] if model.encoder is None else [model.encoder])
    targets: dict[str, list[torch.Tensor]] = {"wte.weight": [model.wte.weight],
                                               "wpe.weight": [model.wpe.weight]}
    for name in model.decoder.state_dict():
        targets[name] = [dict(s.named_parameters())[name] for s in stacks]
    missing = [k for k in targets if k not in state]
    if missing:
        raise ValueError(f"model.init_from: {path} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, params in targets.items():
            src = state[name]
            if name.endswith(CONV1D):
                src = src.T
            if name == "wpe.weight":
                src = src[:cfg.block_size]
            for p in params:
                p.copy_(src)
