"""longctx: long-context evaluation of parameter-efficient adapters.

Importing the package does no work: no model loading, no downloads, no registration beyond
cheap table entries. The public entry points below are re-exported lazily from their modules by
the module `__getattr__` (a fixed table, resolved on first use): `import longctx` stays free of
torch, and the modules' own headers show the real import graph.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "default_base_path": "longctx.engine.settings",
    "load_base": "longctx.engine.bases",
    "wrap": "longctx.adapters",
    "load_adapter": "longctx.adapters",
    "ADAPTERS": "longctx.adapters",
    "chunked_forward": "longctx.engine.runner",
    "score_continuation": "longctx.engine.runner",
    "greedy_generate": "longctx.engine.runner",
    "LongctxError": "longctx.core.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'longctx' has no attribute {name!r}")


__all__ = sorted(_LAZY)
