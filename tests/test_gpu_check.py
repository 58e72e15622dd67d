"""benchmarks/gpu_check.py --dry-run: the one-shot GPU check's own code, at a tiny size on the CPU.

It runs in a subprocess (it creates a process group and DeepSpeed engines), and must produce the
JSON the GPU run will: every section ok, real figures in each.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_writes_the_full_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False}
    assert not failed and report["ok"], failed
    assert report["dry_run"] is True and report["environment"]["flex_attention"] is True

    for stage in (2, 3):
        train = report[f"train_zero{stage}"]
        assert train["steps"] == 4 and train["finite"] and math.isfinite(train["loss_last"])
        assert train["tokens_per_s_median"] > 0 and train["mfu_pct"] > 0 and train["adam"] == "torch"
        assert train["failed_attempts"] == {}
    # ZeRO-2 and ZeRO-3 start from the same weights and data: the same first loss (bf16: one ulp)
    assert math.isclose(report["train_zero2"]["loss_first"], report["train_zero3"]["loss_first"], rel_tol=1e-2)

    prof = report["profile"]
    assert prof["mfu_pct"] > 0 and prof["peak_tflops"] > 0 and prof["tokens_per_step"] == 2 * 64
    # the attention ops that actually ran, by profiler name (on CPU: SDPA's CPU flash kernel, fwd + bwd)
    assert any("scaled_dot_product" in k for k in prof["attention_kernels_us"])
    assert any("backward" in k.lower() for k in prof["attention_kernels_us"])

    assert report["eval"]["documents"] > 0 and report["eval"]["documents_per_s"] > 0
    assert math.isfinite(report["eval"]["ppl_iw"])
    assert report["generate"]["texts"] == 4 and report["generate"]["tokens_per_s"] > 0

    figures = json.loads(proc.stdout.strip().splitlines()[-1])     # the benchmark's last line
    assert figures["ok"] is True and figures["mfu_pct"] == prof["mfu_pct"]
