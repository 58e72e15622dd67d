"""Data side of trace-dist: `trace-dist prepare` writes shards, the loaders stream batches.

See docs/INTERFACES.md (the contracts) and docs/data.md (formats and semantics).
The loaders are imported lazily: `trace_dist.config` imports `trace_dist.data.config`, and
validating a config must not pay for importing torch and webdataset.
"""

import importlib

_EXPORTS = {"encode_text": "prepare", "eval_loader": "stream", "eval_loaders": "stream", "train_loader": "stream",
            "tokenizer_file": "tokenizer", "check_mixture": "integrity", "check_sources": "integrity", "tokens_by_source": "batch", "load_tokenizer": "tokenizer",
            "manifest": "integrity", "DataError": "integrity", "check_data": "integrity",
            "check_same_tokenizer": "integrity"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trace_dist.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trace_dist.data.{_EXPORTS[name]}"), name)
