"""trace-dist: a distributed trainer for TRACE (Transformer Recurrent AutoenCodEr)."""

__version__ = "0.1.0"
