"""Checkpoints: DeepSpeed saves with a crash-safe `latest`, resume lookup, inference loading, export.

Layout of `<output_dir>/checkpoints/`:
    step00000100/            one DeepSpeed tag: mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt,
                             plus ours: trace_meta.json, config.yaml, tokenizer.json
    latest                   the newest *complete* tag, replaced atomically after every rank finished

A kill while saving leaves a tag directory without `trace_meta.json` and an untouched `latest`, so
the previous checkpoint stays the one resumed from; such partial directories are pruned later.
Resuming on a different number of ranks goes through DeepSpeed's universal checkpoint format.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from trace_dist import safe_load
from trace_dist.config import TraceConfig, load_config
from trace_dist.distributed import barrier
from trace_dist.errors import CheckpointError, UserError
from trace_dist.files import atomic_write

META = "trace_meta.json"
LATEST = "latest"
WEIGHTS = "model.safetensors"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def save(engine, cfg: TraceConfig, state: dict, tokenizer_file: Path, is_main: bool) -> Path:
    """Collective: every rank writes its shard; rank 0 then records what was written (the meta is
    the completion mark), points `latest` at the tag and prunes."""
    from deepspeed.checkpoint import UNIVERSAL_CHECKPOINT_INFO

    save_dir = cfg.checkpoint_dir
    tag = tag_for(state["step"])
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False,
                           client_state={"trace": state, UNIVERSAL_CHECKPOINT_INFO: {}})
    barrier()
    tag_dir = save_dir / tag
    if is_main:
        atomic_write(tag_dir / "config.yaml", cfg.to_yaml())
        shutil.copyfile(tokenizer_file, tag_dir / "tokenizer.json")
        # every rank's files, with their sizes: a resume checks them all (a lost shard, a truncated copy)
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
        meta = dict(state, tag=tag, world_size=engine.world_size, zero_stage=cfg.zero.stage, files=files)
        atomic_write(tag_dir / META, json.dumps(meta, indent=1))
        atomic_write(save_dir / LATEST, tag)
        _prune(save_dir, keep=cfg.checkpoint.keep_last, latest=tag)
    barrier()
    return tag_dir


def incomplete(tag_dir: Path) -> Optional[str]:
    """Why `tag_dir` is not a complete checkpoint (None if it is): its meta must exist and every file
    the meta lists must be there with its recorded size."""
    try:
        meta = json.loads((tag_dir / META).read_text())
    except FileNotFoundError:
        return f"no {META} (the save did not finish)" if tag_dir.is_dir() else "missing"
    except ValueError:
        return f"unreadable {META}"
    for name, size in meta.get("files", {}).items():  # checkpoints written before the list: meta only
        f = tag_dir / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is {'missing' if not f.is_file() else 'truncated'}"
    return None


def _prune(save_dir: Path, keep: int, latest: str) -> None:
    """Keep the newest `keep` complete tags; drop partial tags (a kill while saving) and universal
    conversions (a cache for one resume, stale once a newer checkpoint exists)."""
    tags = sorted(p for p in save_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [p for p in tags if (p / META).exists() and not p.name.endswith("_universal")]
    doomed = set(complete[:-keep]) | {p for p in tags if not (p / META).exists()}
    for p in doomed:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(p.with_name(p.name + "_universal"), ignore_errors=True)


def locate(path: Path | str) -> tuple[Path, str, dict]:
    """A run dir, its checkpoints dir, or one tag dir -> (save_dir, tag, meta) of a complete checkpoint."""
    path = Path(path)
    if (path / META).exists():
        why = incomplete(path)
        if why is not None:
            raise CheckpointError(f"checkpoint {path} is incomplete: {why}")
        return path.parent, path.name, json.loads((path / META).read_text())
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / LATEST).exists():
        tag = (path / LATEST).read_text().strip()
        return locate(path / tag)
    raise CheckpointError(f"no complete TRACE checkpoint at {path} (expected a '{LATEST}' file or a tag "
                          f"directory with {META})")


def find_resume(cfg: TraceConfig, warn: Callable[[str], None]) -> Optional[tuple[Path, str, dict]]:
    """What `checkpoint.resume` says to resume from: None (a fresh start), or (save_dir, tag, meta).
    `auto` falls back from a `latest` whose tag is missing or incomplete to the newest complete tag."""
    spec = cfg.checkpoint.resume
    if spec == "none":
        return None
    if spec != "auto":
        return locate(spec)
    save_dir = cfg.checkpoint_dir
    latest = save_dir / LATEST
    if latest.exists():
        tag = latest.read_text().strip()
        why = incomplete(save_dir / tag)
        if why is None:
            return locate(save_dir / tag)
        warn(f"warning: {latest} names {tag}, which is incomplete ({why}); looking for an older checkpoint")
    tags = sorted((p for p in save_dir.glob("step*") if p.is_dir() and not p.name.endswith("_universal")),
                  reverse=True)
    for p in tags:
        why = incomplete(p)
        if why is None:
            if latest.exists():
                warn(f"warning: resuming from {p.name}, the newest complete checkpoint")
            return locate(p)
        warn(f"warning: skipping {p.name}: {why}")
    if latest.exists():
        raise CheckpointError(f"checkpoint.resume=auto: no complete checkpoint in {save_dir}; set "
                              f"checkpoint.resume=none to start over (its checkpoints will be replaced)")
    return None


def to_universal(save_dir: Path, tag: str, is_main: bool) -> str:
    """Convert a tag for loading on another world size (rank 0 converts, everyone waits)."""
    out = f"{tag}_universal"
    if is_main and not (save_dir / out / "zero").exists():
        # through safe_load's wrapper: the child inherits weights-only loading but not our allow-list
        r = subprocess.run([sys.executable, "-m", "trace_dist.safe_load", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", str(save_dir / tag), "--output_folder", str(save_dir / out),
                            "--no_strict"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no message"])[-1]
            raise CheckpointError(f"{save_dir / tag}: universal conversion failed: {last}")
    barrier()
    return out


# ------------------------------------------------------------------ inference loading and export
def _model_states_file(tag_dir: Path) -> Path:
    """DeepSpeed's model-states file of a tag (`zero_pp_rank_0_` prefixed under ZeRO-3)."""
    found = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not found:
        raise CheckpointError(f"{tag_dir}: no mp_rank_00_model_states.pt (not a complete DeepSpeed checkpoint)")
    return found[0]


def saved_shapes(tag_dir: Path) -> dict[str, list[int]]:
    """Parameter name -> shape as saved in a tag (ZeRO >= 1 records `param_shapes` per group and
    `frozen_param_shapes`; ZeRO-0 keeps the whole module). Reads through the pickle-safe loader."""
    safe_load.install()
    states = torch.load(_model_states_file(tag_dir), map_location="cpu")
    if states.get("param_shapes"):
        groups = [*states["param_shapes"], states.get("frozen_param_shapes") or {}]
        return {k: list(v) for group in groups for k, v in group.items()}
    return {k: list(v.shape) for k, v in states["module"].items()}


def require_matching_model(model: torch.nn.Module, shapes: dict[str, list[int]], source: Path | str) -> None:
    """One line naming the first parameter the checkpoint lacks or saved with another shape (a changed
    model.* setting), rather than load_state_dict's list of every mismatch."""
    for name, p in model.state_dict().items():
        if name in shapes and shapes[name] != list(p.shape):
            raise CheckpointError(f"{source}: parameter {name} has shape {shapes[name]} in the checkpoint but "
                                  f"{list(p.shape)} in the model its config now builds (a changed model.* setting?)")
    for name, _ in model.named_parameters():  # tied weights appear once, under their first name
        if name not in shapes:
            raise CheckpointError(f"{source}: the checkpoint has no parameter {name} "
                                  "(saved for another model.* setting?)")


def _consolidated_state_dict(save_dir: Path, tag: str, meta: dict) -> dict[str, torch.Tensor]:
    safe_load.install()  # whatever trace_meta.json claims, no file below can run code
    if meta.get("zero_stage", 0) == 0:
        # ZeRO-0 keeps the whole module in DeepSpeed's model-states file.
        states = torch.load(_model_states_file(save_dir / tag), map_location="cpu")
        return {k: v.float() for k, v in states["module"].items()}
    # ZeRO 1-3: DeepSpeed's own consolidation reads its partitioned files.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
    except (FileNotFoundError, ValueError) as e:  # a shard missing, or files from another world size
        raise CheckpointError(f"{save_dir / tag}: incomplete ZeRO checkpoint ({e})") from None


def _read_tokenizer(src: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(src / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception for missing and malformed files alike
        raise CheckpointError(f"{src / 'tokenizer.json'}: unreadable tokenizer ({str(e).splitlines()[0]})") from None


def load_for_inference(path: Path | str, overrides: list[str] | None = None, configs: tuple = ()):
    """An export directory or a DeepSpeed checkpoint -> (model, cfg, tokenizer, vocab), model in eval mode.
    `configs` (YAML files) and `overrides` apply on top of the checkpoint's own config. A missing,
    truncated, unsafe or mismatched checkpoint raises CheckpointError naming the file or parameter."""
    from safetensors import SafetensorError, safe_open

    from trace_dist.model.trace import TRACE
    from trace_dist.vocab import Vocab

    path = Path(path)
    if (path / WEIGHTS).exists():
        src, state_dict = path, None
    else:
        save_dir, tag, meta = locate(path)
        src = save_dir / tag
        state_dict = _consolidated_state_dict(save_dir, tag, meta)
    cfg = load_config([src / "config.yaml", *configs], overrides)
    tokenizer = _read_tokenizer(src)
    vocab = Vocab.from_tokenizer(tokenizer)
    model = TRACE(cfg.model, vocab)
    if state_dict is None:
        from safetensors.torch import load_model

        try:
            with safe_open(str(src / WEIGHTS), "pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            require_matching_model(model, shapes, src / WEIGHTS)
            load_model(model, str(src / WEIGHTS))
        except SafetensorError as e:
            raise CheckpointError(f"{src / WEIGHTS}: unreadable ({e})") from None
    else:
        require_matching_model(model, {k: list(v.shape) for k, v in state_dict.items()}, src)
        model.load_state_dict(state_dict)
    return model.eval(), cfg, tokenizer, vocab


def export(checkpoint: Path | str, out: Path | str) -> Path:
    """Consolidated fp32 weights as safetensors + config + tokenizer, loadable without DeepSpeed.
    Each file is written under a temporary name and renamed into place only once all are written, so
    a failed export never leaves a previous one half replaced."""
    from safetensors.torch import save_model

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: export target exists and is not a directory")
    model, cfg, tokenizer, _ = load_for_inference(checkpoint)
    meta = {"source": str(Path(checkpoint).resolve())}
    if not (Path(checkpoint) / WEIGHTS).exists():
        meta.update(locate(checkpoint)[2])
    names = [WEIGHTS, "config.yaml", "tokenizer.json", "export.json"]
    tmp = {name: out / f".{name}.partial" for name in names}
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_model(model, str(tmp[WEIGHTS]))
        tmp["config.yaml"].write_text(cfg.to_yaml())
        tokenizer.save(str(tmp["tokenizer.json"]))
        tmp["export.json"].write_text(json.dumps(meta, indent=1))
        for name in names:
            os.replace(tmp[name], out / name)
    except OSError as e:
        raise UserError(f"{out}: cannot write the export ({e.strerror or e})") from None
    finally:
        for partial in tmp.values():
            partial.unlink(missing_ok=True)
    return out
