"""docs/scaling.md §3 is generated from benchmarks/results.json and cannot drift from it."""

import json
import shutil
from pathlib import Path

import scaling_projection

REPO = Path(__file__).resolve().parent.parent


def test_scaling_doc_matches_the_measurements():
    assert scaling_projection.main(["--check"]) == 0


def test_a_changed_measurement_changes_the_tables(tmp_path):
    """Doubling ZeRO-0's measured all-reduce makes the committed doc stale; regenerating fixes it."""
    results = json.loads((REPO / "benchmarks/results.json").read_text())
    ops = results["benchmarks"]["zero_memory.py"]["figures"]["comm_bytes_by_op"]["zero0"]
    ops["all_reduce"] *= 2
    (tmp_path / "results.json").write_text(json.dumps(results))
    doc = shutil.copy(REPO / "docs/scaling.md", tmp_path / "scaling.md")
    args = ["--results", str(tmp_path / "results.json"), "--doc", str(doc)]
    assert scaling_projection.main([*args, "--check"]) == 1
    assert scaling_projection.main(args) == 0
    assert "| 0 (2 x all-reduce G) | 100 Gb/s | 175 |" in Path(doc).read_text()
    assert scaling_projection.main([*args, "--check"]) == 0
