"""The TRACE model in plain PyTorch (no distributed code): `TRACE(cfg, vocab)(batch) -> TraceOutput`
(model/trace.py). Nothing is imported here, so that the configs (model/config.py) load without torch."""
