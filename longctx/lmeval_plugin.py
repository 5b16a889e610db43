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
import os
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


def _one_line_errors(kind: type, value: BaseException, tb: Any) -> None:
    """In the `lm_eval` command: a longctx error (bad model_args, metadata, length) is one line
    on stderr and exit status 2, as in `longctx` itself; anything else keeps its traceback."""
    bad_json = issubclass(kind, ValueError) and str(value).startswith("Invalid JSON")  # lm-eval's --metadata
    if getattr(kind, "__module__", "") == "longctx.errors" or bad_json:
        sys.stderr.write(f"lm_eval: error: {value}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)
    sys.__excepthook__(kind, value, tb)


LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # lm-eval 0.4.13's EvaluatorConfig fills this in when --device is absent


def requested_device(device: Any) -> str | None:
    """The device the user asked for: lm-eval's command line fills in "cuda:0" when `--device` is
    not given, which must mean "CUDA if present" (as lm-eval's `hf`), not a demand for CUDA."""
    if device is None:
        return None
    argv = sys.argv if os.path.basename(sys.argv[0] if sys.argv else "") in ("lm_eval", "longctx") else None
    given = argv is not None and any(a == "--device" or a.startswith("--device=") for a in argv)
    if str(device) == LM_EVAL_DEFAULT_DEVICE and argv is not None and not given:
        return None
    return str(device)


def install() -> None:
    """Start-up entry point (from the .pth line): cheap, never imports lm-eval itself."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == "lm_eval":
        sys.excepthook = _one_line_errors
    if TRIGGER in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
