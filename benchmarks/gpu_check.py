"""One-shot GPU check: the GPU path end to end on one H100/H200 in under 8 minutes, one JSON.

What it runs, in one process, on the built-in pydoc corpus (prepared here, nothing downloaded):
  train_zero2, train_zero3  the real trainer (trace_dist.train.run_training) on a GPT-2-base-size TRACE
                            (12 x 768, T = 512, V = 50257), bf16, nccl, a few dozen steps each: loss
                            finite and falling, tokens/s, MFU of the trainer's real tokens, the Adam kernel
  profile                   a DeepSpeed ZeRO-2 bf16 engine on full-length documents (every position a
                            counted token): step time, tokens/s, MFU against the bf16 peak
                            (trace_dist.mfu), and the attention kernels that actually ran (torch.profiler
                            kernel names: flash / efficient SDPA, FlexAttention's Triton kernels)
  eval, generate            `trace-dist eval` and `trace-dist generate` on the ZeRO-2 run: wall time and
                            documents/s, generated tokens/s
A section that fails records its error and the rest still run; a training section that fails under
FlexAttention is retried with the dense-mask SDPA fallback, so one run tells which part broke.

On the lent GPU machine (which has torch, tensorboard, tokenizers but no deepspeed, webdataset, pydantic):
    python benchmarks/gpu_wheels.py                  # here, once: builds .whl/ (git-ignored, ~5 MiB)
    # then one device call, carry [".whl"], timeout 600:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --output $OUT/gpu_check.json
    # and commit the JSON it returns as benchmarks/gpu_check.json
`--dry-run` runs the same code at a tiny size on the CPU (gloo, bf16): tests/test_gpu_check.py.
The last stdout line is the JSON's figures (benchmark convention).
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
import traceback
from pathlib import Path

import common  # first: pins threads, DS_ACCELERATOR on CPU
import torch

from compute_efficiency import full_batch

# Size of each mode: model/data overrides, trainer steps, micro-batch, and the profile/eval/generate sizes.
SIZES = {
    "gpu": dict(model=["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=512",
                       "model.vocab_size=50257", "model.max_segments=16", "data.max_tokens=512",
                       "data.max_segments=16", "data.max_segment_tokens=64"],
                steps=40, micro_batch=32, profile_steps=10, iw_samples=4, eval_samples=64, gen_num=64,
                gen_tokens=128),
    "dry": dict(model=["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
                       "model.max_segments=4", "data.max_tokens=64", "data.max_segments=4",
                       "data.max_segment_tokens=16"],
                steps=4, micro_batch=2, profile_steps=2, iw_samples=2, eval_samples=4, gen_num=4, gen_tokens=8),
}
# Kernel/op name fragments that mark attention (lower case).
ATTENTION = ("flash", "fmha", "attention", "flex", "sdpa", "triton_tem", "cudnn")


def run_config(data: Path, out: Path, size: dict, stage: int, dry: bool):
    from trace_dist.config import load_config

    return load_config([common.REPO / "configs/quickstart.yaml"], [
        *size["model"], f"data.path={data}", f"train.output_dir={out}", f"train.max_steps={size['steps']}",
        f"train.micro_batch_size={size['micro_batch']}", "train.warmup_steps=2", "train.log_interval=1",
        "train.eval_interval=100000", "train.eval_batches=1", "train.samples_to_log=0", "train.progress=false",
        "checkpoint.interval=100000", "checkpoint.keep_last=1", "tensorboard=false", "precision=bf16",
        f"zero.stage={stage}", f"generation.max_new_tokens={size['gen_tokens']}",
        "data.num_workers=0" if dry else "data.num_workers=2"])


def section(results: dict, name: str, fn, *args) -> None:
    """Run one part of the check; its figures or its error go into results[name]."""
    t0 = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn(*args)}
    except Exception as e:  # noqa: BLE001 - a one-shot check records every failure and goes on
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                         "traceback": traceback.format_exc()[-4000:]}
    results[name]["wall_s"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAILED ' + results[name]['error']} "
          f"({results[name]['wall_s']} s)", flush=True)


# Fallbacks tried in order when a training run fails, so that one GPU run says which part broke:
# DeepSpeed's FusedAdam (JIT-built with the machine's nvcc), then FlexAttention (compiled Triton).
ATTEMPTS = (("default", {}, None), ("train.adam=torch", {"adam": "torch"}, None),
            ("train.adam=torch, no flex", {"adam": "torch"}, False))


def train(cfg, peak: float) -> dict:
    """The real trainer, with the ATTEMPTS fallbacks; figures of the first attempt that trains."""
    from trace_dist.model import blocks
    from trace_dist.train import run_training

    failures = {}
    for name, train_update, flex in ATTEMPTS:
        if failures and flex is False and not blocks.flex_wanted(torch.device("cuda" if torch.cuda.is_available()
                                                                              else "cpu")):
            continue                                      # flex was not in use: nothing new to try
        out = f"{cfg.run_dir}_{len(failures)}" if failures else str(cfg.run_dir)
        attempt = cfg.model_copy(update={"train": cfg.train.model_copy(update={**train_update, "output_dir": out})})
        try:
            with blocks.use_flex(flex):
                run_training(attempt)
            cfg, flex_used = attempt, flex
            break
        except Exception as e:  # noqa: BLE001
            failures[name] = f"{type(e).__name__}: {e}"[:2000]
    else:
        raise RuntimeError(f"every attempt failed: {failures}")
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    half = max(1, len(losses) // 2)
    tokens_per_s = sorted(r["tokens_per_s"] for r in rows[1:] or rows)[len(rows[1:] or rows) // 2]   # median
    from trace_dist.data import load_tokenizer
    from trace_dist.mfu import mfu
    from trace_dist.model.trace import TRACE

    with torch.device("meta"):                            # shapes only, for the FLOP count
        flops = TRACE(cfg.model, load_tokenizer(cfg.data.path)[1]).flops_per_token()
    return {"steps": len(rows), "loss_first": losses[0], "loss_last": losses[-1],
            "finite": all(map(math.isfinite, losses)),
            "falling": sum(losses[half:]) / len(losses[half:]) < sum(losses[:half]) / half,
            "tokens_per_s_median": round(tokens_per_s, 1), "mfu_pct": round(100 * mfu(tokens_per_s, flops, peak), 2),
            "adam": cfg.adam_impl(), "failed_attempts": failures, "run_dir": str(cfg.run_dir), "_cfg": cfg,
            "_flex": flex_used}


def profile(cfg, size: dict, peak: float) -> dict:
    """A bare ZeRO-2 bf16 engine on full-length documents: timing, MFU and the kernels that ran."""
    import deepspeed
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from trace_dist.data import load_tokenizer
    from trace_dist.distributed import init_distributed
    from trace_dist.mfu import mfu
    from trace_dist.model.trace import TRACE

    info = init_distributed()
    _, vocab = load_tokenizer(cfg.data.path)
    torch.manual_seed(0)
    model = TRACE(cfg.model, vocab)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg.deepspeed_config_dict(info.world_size))
    B, T = cfg.train.micro_batch_size, cfg.model.block_size
    batch = full_batch(vocab, B, T, cfg.model.max_segments, info.device)

    def step():
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        return out.loss.item()      # .item() synchronises the device

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(size["profile_steps"]):
        loss = step()
    seconds = (time.perf_counter() - t0) / size["profile_steps"]
    cuda = info.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        step()
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        device_us = getattr(ev, "self_device_time_total", 0) if cuda else ev.self_cpu_time_total
        if device_us > 0 and (not cuda or ev.device_type.name == "CUDA"):
            kernels[ev.key] = kernels.get(ev.key, 0.0) + device_us
    attention = {k: round(v) for k, v in kernels.items() if any(f in k.lower() for f in ATTENTION)}
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    tokens_per_s = B * T / seconds
    flops = model.flops_per_token()
    figures = {"step_ms": round(seconds * 1e3, 2), "tokens_per_step": B * T, "tokens_per_s": round(tokens_per_s, 1),
               "flops_per_token": flops, "peak_tflops": round(peak / 1e12, 3),
               "mfu_pct": round(100 * mfu(tokens_per_s, flops, peak), 2), "loss": loss,
               "attention_kernels_us": attention, "top_kernels_us": {k: round(v) for k, v in top.items()},
               "adam": cfg.adam_impl()}
    del engine, model
    return figures


def evaluate(run_dir: str, data: Path, size: dict) -> dict:
    from trace_dist import evaluate as ev
    from trace_dist.data import manifest

    with tempfile.TemporaryDirectory() as tmp:
        args = ev.build_parser().parse_intermixed_args([
            "--checkpoint", run_dir, "--data", str(data), "--iw-samples", str(size["iw_samples"]),
            "--num-samples", str(size["eval_samples"]), "--no-progress", "--output", f"{tmp}/eval.json"])
        t0 = time.perf_counter()
        report = ev.evaluate(args, [])
        seconds = time.perf_counter() - t0
    documents = manifest(data)["splits"][report["split"]]["samples"]
    metrics = report["metrics"]
    return {"seconds": round(seconds, 2), "documents": documents, "documents_per_s": round(documents / seconds, 2),
            "iw_samples": size["iw_samples"], "num_samples": report["num_samples"],
            "ppl_iw": metrics.get("ppl_iw"), "kl": metrics.get("kl")}


def generate(run_dir: str, size: dict) -> dict:
    from trace_dist import generate as gen
    from trace_dist.checkpoint import load_for_inference

    args = gen.build_parser().parse_intermixed_args([
        "--checkpoint", run_dir, "--num", str(size["gen_num"]), "--batch-size", str(size["gen_num"]),
        "--max-new-tokens", str(size["gen_tokens"]), "--seed", "0"])
    t0 = time.perf_counter()
    records = gen.run(args)
    seconds = time.perf_counter() - t0
    tokenizer = load_for_inference(run_dir)[2]
    tokens = sum(len(tokenizer.encode(r["text"]).ids) for r in records)   # re-encoded: approximate
    return {"seconds": round(seconds, 2), "texts": len(records), "tokens_reencoded": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "max_new_tokens": size["gen_tokens"]}


def environment() -> dict:
    from trace_dist.model import blocks

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "flex_attention": blocks.flex_attention is not None}
    try:
        env.update(common.machine())
    except ImportError as e:   # deepspeed missing: the wheels were not installed
        env["machine_error"] = str(e)
    if torch.cuda.is_available():
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return env


def main(argv=None) -> dict:
    ap = common.arg_parser(__doc__, smoke="alias of --dry-run")
    ap.add_argument("--dry-run", action="store_true", help="the same code at a tiny size on the CPU (the test)")
    ap.add_argument("--output", default=str(common.REPO / "benchmarks/gpu_check.json"))
    args = ap.parse_args(argv)
    dry = args.dry_run or args.smoke
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run for the CPU rehearsal)")
    common.pin_threads(1 if dry else min(8, os.cpu_count() or 1))
    size = SIZES["dry" if dry else "gpu"]
    from trace_dist.mfu import device_peak
    from trace_dist.model.blocks import use_flex

    start = time.perf_counter()
    results: dict = {"dry_run": dry, "environment": environment()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = device_peak(device, torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        data = common.prepare_pydoc(Path(tmp) / "pydoc")
        cfgs = {s: run_config(data, Path(tmp) / f"zero{s}", size, s, dry) for s in (2, 3)}
        flex = {}
        for s in (2, 3):
            section(results, f"train_zero{s}", train, cfgs[s], peak)
            cfgs[s] = results[f"train_zero{s}"].pop("_cfg", cfgs[s])     # the settings that trained
            flex[s] = results[f"train_zero{s}"].pop("_flex", None)
        with use_flex(flex[2]):
            section(results, "profile", profile, cfgs[2], size, peak)
        run_dir = results["train_zero2"].get("run_dir", str(cfgs[2].run_dir))
        section(results, "eval", evaluate, run_dir, data, size)
        section(results, "generate", generate, run_dir, size)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    results["ok"] = all(v.get("ok", True) for v in results.values() if isinstance(v, dict))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=1, default=str))
    tmp_out.replace(out)                      # the old JSON stays until the new one is complete

    get = lambda sec, key: results.get(sec, {}).get(key)   # noqa: E731
    rows = [[f"train ZeRO-{s}", get(f"train_zero{s}", "ok"), f"loss {get(f'train_zero{s}', 'loss_first')} -> "
             f"{get(f'train_zero{s}', 'loss_last')}", f"{get(f'train_zero{s}', 'tokens_per_s_median')} tok/s, "
             f"MFU {get(f'train_zero{s}', 'mfu_pct')} %"] for s in (2, 3)]
    rows += [["profile (full T)", get("profile", "ok"), f"{get('profile', 'step_ms')} ms/step",
              f"MFU {get('profile', 'mfu_pct')} % of {get('profile', 'peak_tflops')} TFLOP/s"],
             ["attention kernels", "", ", ".join(get("profile", "attention_kernels_us") or {})[:100], ""],
             ["eval", get("eval", "ok"), f"{get('eval', 'seconds')} s", f"{get('eval', 'documents_per_s')} docs/s"],
             ["generate", get("generate", "ok"), f"{get('generate', 'seconds')} s",
              f"{get('generate', 'tokens_per_s')} tok/s"]]
    print(f"\ngpu_check on {results['environment'].get('gpu', 'cpu')} ({'dry run' if dry else 'full size'}), "
          f"{results['wall_s']} s; wrote {out}")
    common.table(["part", "ok", "", ""], rows)
    return common.emit({"ok": results["ok"], "wall_s": results["wall_s"],
                        "mfu_pct": get("profile", "mfu_pct"), "train_zero3_mfu_pct": get("train_zero3", "mfu_pct"),
                        "attention_kernels": sorted(get("profile", "attention_kernels_us") or {}),
                        "eval_documents_per_s": get("eval", "documents_per_s"),
                        "generate_tokens_per_s": get("generate", "tokens_per_s")})


if __name__ == "__main__":
    main()
