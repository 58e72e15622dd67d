"""Writing files so that a reader never sees half of one: write a sibling, then rename over."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path | str, text: str) -> None:
    """Replace `path` with `text` in one rename (readers see the old or the new file, never a mix)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
