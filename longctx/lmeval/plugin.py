"""Makes `--model ssmlora --tasks longctx_…` work in the stock `lm_eval` command (design §7).

lm-eval 0.4.13 discovers no out-of-tree models or tasks, so the package installs a start-up line
(`longctx_lmeval.pth`, see setup.py) that calls `install()`: it adds an import hook and nothing
else. When lm-eval later imports `lm_eval.models` (its model table), the hook registers a lazy
placeholder `ssmlora -> longctx.lmeval.model:SsmloraLM`; the class loads only when asked for.
When it imports `lm_eval.tasks.manager`, the hook makes every `TaskManager` that searches
lm-eval's own tasks search the package's task folder too (`longctx.core.resources.task_dir`), so
`--tasks longctx_passkey` needs no `--include_path` from any directory. Processes that never
import lm-eval pay one finder lookup per import and nothing more.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

MODEL_NAME = "ssmlora"
TARGET = "longctx.lmeval.model:SsmloraLM"
TRIGGER = "lm_eval.models"
TASKS_TRIGGER = "lm_eval.tasks.manager"


def register() -> None:
    """Add the `ssmlora` placeholder to lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


def add_task_folder() -> None:
    """Make `TaskManager(include_defaults=True, …)` also index the package's task YAMLs
    (idempotent). A manager built with `include_defaults=False` is left exactly as asked."""
    from lm_eval.tasks.manager import TaskManager

    original = TaskManager.__init__
    if getattr(original, "_longctx", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        from longctx.core.resources import task_dir

        if kwargs.get("include_defaults", True) and (len(args) < 3 or args[2]):
            paths = kwargs.get("include_path") if len(args) < 2 else args[1]
            paths = [] if paths is None else list(paths) if isinstance(paths, (list, tuple)) else [paths]
            ours = str(task_dir())
            # ours first: paths given later (the user's --include_path) override same-named tasks
            paths = [ours] + [p for p in paths if str(p) != ours]
            if len(args) >= 2:
                args = (args[0], paths, *args[2:])
            else:
                kwargs["include_path"] = paths
        original(self, *args, **kwargs)

    __init__._longctx = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]  # inspect.signature shows lm-eval's own
    TaskManager.__init__ = __init__  # type: ignore[method-assign]


HOOKS = {TRIGGER: register, TASKS_TRIGGER: add_task_folder}


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds lm-eval's model table and task manager as the normal path finder would, then runs
    the matching hook after the module has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        original, hook = spec.loader.exec_module, HOOKS[fullname]

        def exec_module(module: Any) -> None:
            original(module)
            hook()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _one_line_errors(kind: type, value: BaseException, tb: Any) -> None:
    """In the `lm_eval` command: a longctx error (bad model_args, metadata, length) is one line
    on stderr and exit status 2, as in `longctx` itself; anything else keeps its traceback."""
    from longctx.core.errors import LongctxError

    bad_json = issubclass(kind, ValueError) and str(value).startswith("Invalid JSON")  # lm-eval's --metadata
    if issubclass(kind, LongctxError) or bad_json:  # LongctxError and its subclasses (e.g. TooShort)
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
    argv = sys.argv if is_lm_eval_command() or os.path.basename(sys.argv[0] if sys.argv else "") == "longctx" else None
    given = argv is not None and any(a == "--device" or a.startswith("--device=") for a in argv)
    if str(device) == LM_EVAL_DEFAULT_DEVICE and argv is not None and not given:
        return None
    return str(device)


def is_lm_eval_command() -> bool:
    """Is this process lm-eval's command line (`lm_eval …`, `python -m lm_eval …`, or under
    `accelerate launch -m lm_eval …`)?"""
    first = sys.argv[0] if sys.argv else ""
    return os.path.basename(first) == "lm_eval" or first.endswith(os.path.join("lm_eval", "__main__.py"))


def install() -> None:
    """Start-up entry point (from the .pth line): cheap, never imports lm-eval itself."""
    if is_lm_eval_command():
        sys.excepthook = _one_line_errors
    for module, hook in HOOKS.items():
        if module in sys.modules:
            hook()
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
