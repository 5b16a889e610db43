"""Makes `--model ssmlora` work in the stock `lm_eval` command (SPEC §7).

lm-eval 0.4.13 discovers no out-of-tree models, so the package installs a start-up line
(`longctx_lmeval.pth`, see setup.py) that calls `install()`: it adds an import hook and nothing
else. When lm-eval later imports `lm_eval.models` (its model table), the hook registers a lazy
placeholder `ssmlora -> longctx.lmeval_model:SsmloraLM`; the class loads only when asked for.
Processes that never import lm-eval pay one finder lookup per import and nothing more.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

MODEL_NAME = "ssmlora"
TARGET = "longctx.lmeval_model:SsmloraLM"
TRIGGER = "lm_eval.models"


def register() -> None:
    """Add the `ssmlora` placeholder to lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `lm_eval.models` as the normal path finder would, then registers after it runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TRIGGER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        original = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Start-up entry point (from the .pth line): cheap, never imports lm-eval itself."""
    if TRIGGER in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
