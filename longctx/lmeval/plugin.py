"""Makes `--model ssmlora --tasks longctx_…` work in the stock `lm_eval` command (design §7).

lm-eval 0.4.13 discovers no out-of-tree models or tasks, so the package installs a start-up line
(`longctx_lmeval.pth`, see setup.py) that calls `install()`: it adds an import hook and nothing
else. When lm-eval later imports its model table, the hook registers a lazy placeholder
`ssmlora -> longctx.lmeval.model:SsmloraLM`; the class loads only when asked for. When it imports
its task manager, the hook makes every `TaskManager` that searches lm-eval's own tasks search the
package's task folder too (`longctx.core.resources.task_dir`), so `--tasks longctx_passkey` needs
no `--include_path` from any directory. How each of these reaches into lm-eval is
`longctx.lmeval.harness`'s business; this module says what longctx adds.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from longctx.core.errors import LongctxError
from longctx.core.resources import task_dir
from longctx.lmeval import harness

MODEL_NAME = "ssmlora"
TARGET = "longctx.lmeval.model:SsmloraLM"


def register() -> None:
    """Add the `ssmlora` placeholder to lm-eval's model registry (idempotent)."""
    harness.register_model(MODEL_NAME, TARGET)


def add_task_folder() -> None:
    """Make `TaskManager(include_defaults=True, …)` also index the package's task YAMLs (idempotent)."""
    harness.add_task_folder(lambda: str(task_dir()))


HOOKS = {harness.MODEL_TABLE_MODULE: register, harness.TASK_MANAGER_MODULE: add_task_folder}


def _one_line_errors(kind: type, value: BaseException, tb: Any) -> None:
    """In the `lm_eval` command: a longctx error (bad model_args, metadata, length) is one line
    on stderr and exit status 2, as in `longctx` itself; anything else keeps its traceback."""
    if issubclass(kind, LongctxError) or harness.is_bad_metadata(kind, value):  # incl. subclasses (TooShort)
        sys.stderr.write(f"lm_eval: error: {value}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)
    sys.__excepthook__(kind, value, tb)


def install() -> None:
    """Start-up entry point (from the .pth line): cheap, never imports lm-eval itself."""
    if harness.is_lm_eval_command():
        sys.excepthook = _one_line_errors
    harness.after_import(HOOKS)
