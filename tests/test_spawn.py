"""run_ranks passes plain results back and refuses anything whose loading could run code."""

import os

import pytest
import torch

from trace_dist.spawn import run_ranks


class _Planted:
    """A result whose unpickling would run a command in the parent."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plain(root):
    return {"rank": int(os.environ["RANK"]), "path": root, "t": torch.arange(3)}


def _planted(root):
    return _Planted(root / "ran")


def test_each_rank_result_comes_back_as_data(tmp_path):
    r0, r1 = run_ranks(_plain, 2, tmp_path, tmp_path=tmp_path, timeout=120)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["path"] == tmp_path and torch.equal(r1["t"], torch.arange(3))


def test_a_result_that_would_run_code_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="rank 0 returned a value that cannot be read back safely"):
        run_ranks(_planted, 1, tmp_path, tmp_path=tmp_path, timeout=120)
    assert not (tmp_path / "ran").exists()
