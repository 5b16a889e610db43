"""The one seam between longctx and lm-eval's internals.

Everything longctx takes from lm-eval beyond its documented public API (`simple_evaluate`,
`TaskManager(...)`, `ConfigurableTask`, an LM's `loglikelihood` / `generate_until` / `rank` /
`world_size` / `device` / `gather_object` / `cache_hook`) is reached from here and nowhere else:
the `hf` model class and its keyword list, its stop-sequence and thinking helpers, the attributes
its data parallelism lives in, its logger and warnings, the model registry, `TaskManager.__init__`,
the modules whose import makes lm-eval ready for those, its command line (entry point, default
`--device`, how it reports bad `--metadata`). tests/lmeval/test_harness_canaries.py checks every one of
them against the installed lm-eval, naming its version when one moves.

Importing this module imports nothing of lm-eval: the start-up line (`longctx_lmeval.pth`)
imports `plugin`, which imports this, in every Python process. lm-eval is imported by the
functions that use it (deferred: it takes seconds and pulls in torch), and `HFLM` on first access.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import inspect
import logging
import os
import sys
from typing import Any, Callable, Iterator

HFLM_MODULE = "lm_eval.models.huggingface"
MODEL_TABLE_MODULE = "lm_eval.models"  # once imported, `model_registry` holds lm-eval's own models
TASK_MANAGER_MODULE = "lm_eval.tasks.manager"
HFLM_LOGGER = "lm_eval.models.huggingface"
MODEL_LOGGER = "lm_eval.models.ssmlora"  # under lm-eval's "lm_eval" logger, so its --verbosity applies
# HFLM's warnings for a model object ("one process only"): not true for ssmlora, `adopt_processes` sets them up.
HFLM_MODEL_OBJECT_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")
DEFAULT_DEVICE = "cuda:0"  # lm-eval 0.4.13's EvaluatorConfig fills this in when --device is absent
# keys lm-eval puts into a task's metadata next to the merged model_args and --metadata: the YAML's
# own `version`, the task factory's `config_source`, and `model`
METADATA_ADDED_KEYS = ("model", "version", "config_source")
BAD_METADATA_PREFIX = "Invalid JSON"  # lm-eval's ValueError for a --metadata that does not parse


def __getattr__(name: str) -> Any:
    """`harness.HFLM`: lm-eval's `hf` model class, imported on first access."""
    if name == "HFLM":
        return importlib.import_module(HFLM_MODULE).HFLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hflm_parameters() -> tuple[str, ...]:
    """The keyword arguments of `HFLM.__init__` (lm-eval's `hf` model_args), in its order."""
    hflm = importlib.import_module(HFLM_MODULE).HFLM
    return tuple(n for n, p in inspect.signature(hflm.__init__).parameters.items()
                 if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


# ---- the `hf` model's helpers and attributes ---------------------------------------------------------


def stop_sequences(until: Any, eos: str) -> list[str]:
    """hf's stop strings for a generation request: `until` (str or list) plus the EOS text."""
    from lm_eval.models.utils import handle_stop_sequences  # deferred: lm-eval takes seconds to import

    return handle_stop_sequences(until, eos=eos)


def finish_generation(text: str, until: list[str], think_end_token: str | None) -> str:
    """hf's post-processing of a generation: the text after the thinking, cut before a stop string."""
    from lm_eval.models.utils import postprocess_generated_text  # deferred: lm-eval takes seconds to import

    return postprocess_generated_text(text, until, think_end_token)


def think_end_token(lm: Any) -> str | int | None:
    """The end-of-thinking delimiter HFLM's constructor stored (an int when given as digits)."""
    return lm.think_end_token


def set_device(lm: Any, device: Any) -> None:
    """Make an HFLM's `device` (where it puts its input tensors) this device."""
    lm._device = device


def adopt_processes(lm: Any, accelerator: Any) -> None:
    """Give an HFLM built from a model object the launcher's processes, as hf does when it loads
    the model itself: the rank, world size and accelerator its evaluator shards and gathers by."""
    lm.accelerator = accelerator
    lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes
    lm._device = accelerator.device


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_model_object_warnings() -> Iterator[None]:
    """Silence HFLM's "a model object runs as one process" warnings while its constructor runs."""
    logger, drop = logging.getLogger(HFLM_LOGGER), _DropMessages(HFLM_MODEL_OBJECT_WARNINGS)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# ---- registry, task manager, and when lm-eval is ready for them --------------------------------------


def register_model(name: str, target: str) -> None:
    """A lazy `name -> "module:Class"` entry in lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry  # deferred: lm-eval takes seconds to import

    if name not in model_registry:
        model_registry.register(name, target=target)


def add_task_folder(folder: Callable[[], str]) -> None:
    """Make `TaskManager(include_defaults=True, …)` also index `folder()` (idempotent), ahead of
    any `include_path` given, so a user's folder overrides same-named tasks. A manager built with
    `include_defaults=False` is left exactly as asked."""
    from lm_eval.tasks.manager import TaskManager  # deferred: lm-eval takes seconds to import

    original = TaskManager.__init__
    if getattr(original, "_longctx", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("include_defaults", True) and (len(args) < 3 or args[2]):
            paths = kwargs.get("include_path") if len(args) < 2 else args[1]
            paths = [] if paths is None else list(paths) if isinstance(paths, (list, tuple)) else [paths]
            ours = folder()
            paths = [ours] + [p for p in paths if str(p) != ours]
            if len(args) >= 2:
                args = (args[0], paths, *args[2:])
            else:
                kwargs["include_path"] = paths
        original(self, *args, **kwargs)

    __init__._longctx = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]  # inspect.signature shows lm-eval's own
    TaskManager.__init__ = __init__  # type: ignore[method-assign]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the hooked modules as the normal path finder would, then runs each one's hook after
    the module has executed."""

    def __init__(self, hooks: dict[str, Callable[[], None]]) -> None:
        self.hooks = hooks

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.hooks:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        original, hook = spec.loader.exec_module, self.hooks[fullname]

        def exec_module(module: Any) -> None:
            original(module)
            hook()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def after_import(hooks: dict[str, Callable[[], None]]) -> None:
    """Run `hooks[module]()` once lm-eval has imported `module` (now, if it already has); one finder
    lookup per import and nothing more for processes that never import lm-eval."""
    for module, hook in hooks.items():
        if module in sys.modules:
            hook()
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(hooks))


# ---- a task's own requests (what lm-eval's evaluator would send a model) ------------------------------


def load_task(name: str, include_path: str, include_defaults: bool, metadata: dict[str, Any]) -> Any:
    """The task object `name` as lm-eval's evaluator loads it (one task, not a group)."""
    from lm_eval.tasks import TaskManager  # deferred: lm-eval takes seconds to import

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults, metadata=metadata)
    (task,) = manager.load([name])["tasks"].values()
    return task


def doc_requests(task: Any, name: str, doc: dict[str, Any], index: int,
                 max_gen_toks: int | None = None) -> list[Any]:
    """lm-eval's requests (`Instance`s) for one document of `task`, zero-shot, built as its evaluator
    builds them (context, any `gen_prefix`); `max_gen_toks` caps a generation request's budget."""
    context = task.fewshot_context(doc, num_fewshot=0, gen_prefix=task.doc_to_prefix(doc))
    made = task.construct_requests(doc=doc, ctx=context, metadata=(name, index, 1))
    out = made if isinstance(made, list) else [made]
    for instance in out:
        if instance.request_type == "generate_until" and max_gen_toks is not None:
            instance.arguments = (instance.arguments[0], {**instance.arguments[1], "max_gen_toks": max_gen_toks})
    return out


# ---- the `lm_eval` command line ----------------------------------------------------------------------


def is_lm_eval_command() -> bool:
    """Is this process lm-eval's command line (`lm_eval …`, `python -m lm_eval …`, or under
    `accelerate launch -m lm_eval …`)?"""
    first = sys.argv[0] if sys.argv else ""
    return os.path.basename(first) == "lm_eval" or first.endswith(os.path.join("lm_eval", "__main__.py"))


def requested_device(device: Any) -> str | None:
    """The device the user asked for: lm-eval's command line fills in "cuda:0" when `--device` is
    not given, which must mean "CUDA if present" (as lm-eval's `hf`), not a demand for CUDA."""
    if device is None:
        return None
    argv = sys.argv if is_lm_eval_command() or os.path.basename(sys.argv[0] if sys.argv else "") == "longctx" else None
    given = argv is not None and any(a == "--device" or a.startswith("--device=") for a in argv)
    if str(device) == DEFAULT_DEVICE and argv is not None and not given:
        return None
    return str(device)


def is_bad_metadata(kind: type, value: BaseException) -> bool:
    """Is this lm-eval's own error for a `--metadata` that is not JSON?"""
    return issubclass(kind, ValueError) and str(value).startswith(BAD_METADATA_PREFIX)


def run_cli(args: list[str]) -> None:
    """lm-eval's command line (`lm_eval ARGS…`) in this process."""
    from lm_eval.__main__ import cli_evaluate  # deferred: lm-eval takes seconds to import

    saved, sys.argv = sys.argv, ["lm_eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
