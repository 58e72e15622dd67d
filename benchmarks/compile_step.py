"""torch.compile under DeepSpeed: compiled / eager training-step time at the quickstart size.

One process, one rank, ZeRO-2 fp32, configs/quickstart.yaml's TRACE (vocabulary of the built-in
corpus) on fixed full-length batches (fixed shapes: what the step costs once compiled; real data
recompiles per new shape, see trace_dist/compile.py). The eager engine is timed, then compiled with
trace_dist.compile.compile_engine (engine.compile()); the first compiled step is the compile time;
then the compiled steps are timed. Each time is the fastest of the repeats.
Goal: compile_over_eager_step_ratio <= 0.9.

    python benchmarks/compile_step.py [--smoke] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common  # first: pins threads, DS_ACCELERATOR
import torch

from compute_efficiency import full_batch


def main(argv=None) -> dict:
    ap = common.arg_parser(__doc__, smoke="tests: a 1-layer model, T 64, 2 repeats", threads=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = common.parse(ap, argv)
    import deepspeed

    from trace_dist.compile import compile_engine
    from trace_dist.config import load_config
    from trace_dist.data import load_tokenizer
    from trace_dist.distributed import init_distributed
    from trace_dist.model.trace import TRACE

    repeats = 2 if args.smoke else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        data = common.prepare_pydoc(Path(tmp) / "pydoc")
        _, vocab = load_tokenizer(data)
        small = ["model.n_layer=1", "model.block_size=64", "data.max_tokens=64", "generation.max_new_tokens=64"] if args.smoke else []
        cfg = load_config([common.REPO / "configs/quickstart.yaml"], [f"data.path={data}", "train.micro_batch_size=4", *small])
    info = init_distributed()
    torch.manual_seed(0)
    model = TRACE(cfg.model, vocab)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg.deepspeed_config_dict(1))
    batch = full_batch(vocab, cfg.train.micro_batch_size, cfg.model.block_size, 8, info.device)

    def step() -> float:
        t0 = time.perf_counter()
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        return time.perf_counter() - t0

    step()                                            # warm-up
    eager = min(step() for _ in range(repeats))
    compile_call = compile_engine(engine)
    first = step()                                    # traces and compiles
    compiled = min(step() for _ in range(repeats))
    print(f"\ntorch.compile under DeepSpeed (engine.compile, inductor), quickstart TRACE "
          f"{cfg.model.n_layer}x{cfg.model.n_embd} T={cfg.model.block_size}, {cfg.train.micro_batch_size} documents/step, "
          f"{torch.get_num_threads()} thread(s), fastest of {repeats}")
    common.table(["figure", "value"], [["eager step", f"{eager * 1e3:.0f} ms"], ["compiled step", f"{compiled * 1e3:.0f} ms"],
                                       ["compiled / eager", f"{compiled / eager:.3f}  (goal <= 0.9)"],
                                       ["first compiled step (compile)", f"{first:.1f} s"]])
    return common.emit({"compile_over_eager_step_ratio": round(compiled / eager, 3), "eager_step_ms": round(eager * 1e3, 1),
                        "compiled_step_ms": round(compiled * 1e3, 1), "compile_s": round(first + compile_call, 1),
                        "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
