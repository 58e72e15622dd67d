"""Build `.whl/`: the wheels a GPU machine without network needs to run benchmarks/gpu_check.py.

The lent GPU machines (one H200, Python 3.12, x86_64) carry torch, tensorboard, transformers,
tokenizers, safetensors, numpy, pyyaml, tqdm, psutil, ninja, einops, msgpack, py-cpuinfo, ... but not
deepspeed, webdataset, pydantic or ray, and reach no registry. `trace-dist train/eval/generate` and
`prepare` import only the packages in WHEELS beyond that image (ray is only for `trace-dist tune`).

    python benchmarks/gpu_wheels.py                   # .whl/ for CPython 3.12 manylinux x86_64
    python benchmarks/gpu_wheels.py --check           # also: install a 3.11 build of the same list
                                                      # offline into a clean venv here and import
On the GPU machine (the folder travels with `carry: [".whl"]`):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py

deepspeed is published only as a source distribution: it is built here with `pip wheel --no-deps`
(pure Python; its C++/CUDA ops are JIT-built on first use, e.g. FusedAdam with the image's nvcc).
The folder is git-ignored (/.whl/ in .gitignore) and must stay under 64 MiB (what a call carries).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> version: the versions this repository is tested with (the development venv).
WHEELS = {
    "deepspeed": "0.19.8",         # sdist only: built here
    "hjson": "3.1.0",              # deepspeed
    "pydantic": "2.14.4",          # trace_dist.config, deepspeed
    "pydantic-core": "2.50.5",     # pydantic (the only compiled wheel: per Python version)
    "annotated-types": "0.8.0",    # pydantic
    "typing-inspection": "0.4.5",  # pydantic
    "webdataset": "1.0.2",         # trace_dist.data
    "braceexpand": "0.1.7",        # webdataset
    "pysbd": "0.3.4",              # trace_dist.data.prepare (sentence segmentation)
}
SDIST_ONLY = {"deepspeed"}

# What the GPU image already holds that the wheels above require (/work/.library/device/KINDS.md).
GPU_IMAGE = {"torch", "numpy", "packaging", "psutil", "py-cpuinfo", "msgpack", "ninja", "einops", "tqdm",
             "typing-extensions", "pyyaml", "nvidia-ml-py", "tokenizers", "safetensors", "tensorboard"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
LIMIT_BYTES = 64 * 2 ** 20


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, timeout=900)


def build(out: Path, python_version: str) -> list[Path]:
    """Download (or, for sdist-only packages, build) every wheel of WHEELS into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for name, version in WHEELS.items():
        if name in SDIST_ONLY:
            pip("wheel", "--no-deps", "-q", "-w", str(out), f"{name}=={version}")
            continue
        platform = [a for p in PLATFORMS for a in ("--platform", p)]
        pip("download", "--no-deps", "-q", "--only-binary=:all:", "--python-version", python_version,
            "--implementation", "cp", *platform, "-d", str(out), f"{name}=={version}")
    return wheels_in(out)


def wheels_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.whl"))


def requirements(wheel: Path) -> set[str]:
    """Names a wheel requires (Requires-Dist without an `extra ==` marker)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = set()
    for line in lines:
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            reqs.add(norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0]))
    return reqs


def verify(folder: Path) -> list[str]:
    """Problems with the folder: a missing or duplicate wheel, an unmet requirement, over the size limit."""
    found: dict[str, list[str]] = {}
    for w in wheels_in(folder):
        found.setdefault(norm(w.name.split("-")[0]), []).append(w.name)
    problems = [f"missing wheel: {n}" for n in map(norm, WHEELS) if n not in found]
    problems += [f"several wheels of {n}: {v}" for n, v in found.items() if len(v) > 1]
    have = set(found) | GPU_IMAGE
    for w in wheels_in(folder):
        problems += [f"{w.name} requires {r}: neither a wheel here nor in the GPU image" for r in requirements(w) - have]
    size = sum(w.stat().st_size for w in wheels_in(folder))
    if size > LIMIT_BYTES:
        problems.append(f"{size / 2**20:.1f} MiB of wheels: over the {LIMIT_BYTES // 2**20} MiB a call carries")
    return problems


def check_in_clean_venv() -> None:
    """The same list built for this machine's Python, installed offline (--no-index, dependencies
    resolved: only the folder and what is installed count) into a fresh venv that holds only the
    GPU image's packages, then the trace-dist entry points imported."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "whl"
        build(local, f"{sys.version_info.major}.{sys.version_info.minor}")
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        py = str(venv / "bin" / "python")
        image = sorted(GPU_IMAGE - {"nvidia-ml-py"})
        subprocess.run([py, "-m", "pip", "install", "-q", *image], check=True, timeout=1800)
        subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(local),
                        *(f"{n}=={v}" for n, v in WHEELS.items())], check=True, timeout=600)
        code = ("import deepspeed, webdataset, pydantic, pysbd; import trace_dist.train, trace_dist.evaluate, "
                "trace_dist.generate, trace_dist.data.prepare, trace_dist.mfu; print('imports ok', deepspeed.__version__)")
        subprocess.run([py, "-c", code], check=True, timeout=600, cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / ".whl"))
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    ap.add_argument("--check", action="store_true", help="also install the list offline into a clean venv here")
    args = ap.parse_args(argv)
    out = Path(args.out)
    wheels = build(out, args.python_version)
    problems = verify(out)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{sum(w.stat().st_size for w in wheels) / 2**20:7.2f} MiB  total in {out}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    if args.check:
        check_in_clean_venv()
    return 0


if __name__ == "__main__":
    sys.exit(main())
