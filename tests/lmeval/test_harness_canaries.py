"""Canaries: every lm-eval internal longctx relies on, each checked against the installed lm-eval.
All of them are reached from `longctx/lmeval/harness.py` (the seam); when a release moves one, the
failure here names lm-eval's version, the internal and the seam — before a user's run meets it.

(Public, documented API — `simple_evaluate`, `TaskManager(...)`, an LM's `loglikelihood` … — is
covered by the behaviour tests.)
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from longctx.lmeval import harness

VERSION = importlib.metadata.version("lm-eval")
SEAM = "longctx/lmeval/harness.py"
ROOT = Path(__file__).resolve().parents[2]


def _moved(internal: str, why: object = "", user: str = SEAM) -> str:
    return f"lm-eval {VERSION}: {internal} has moved{f' ({why})' if why else ''}; {user} relies on it"


def _resolve(module: str, attribute: str = "") -> object:
    obj: object = importlib.import_module(module)
    for part in filter(None, attribute.split(".")):
        obj = getattr(obj, part)
    return obj


GLUE = "longctx/lmeval/tasks/glue.py"  # subclasses the public ConfigurableTask, outside the seam
# (module, attribute, parameters its callable must take, in this order where `ordered`, longctx module using it)
SIGNATURES = [
    ("lm_eval.models.huggingface", "HFLM.__init__",
     ("pretrained", "tokenizer", "batch_size", "max_length", "add_bos_token", "prefix_token_id", "think_end_token",
      "enable_thinking", "chat_template_args"), False),
    ("lm_eval.models.huggingface", "HFLM._loglikelihood_tokens", ("requests", "disable_tqdm", "override_bs"), False),
    ("lm_eval.models.huggingface", "HFLM.tok_encode", ("string",), False),
    ("lm_eval.models.huggingface", "HFLM.tok_decode", ("tokens",), False),
    ("lm_eval.models.utils", "handle_stop_sequences", ("until", "eos"), False),
    ("lm_eval.models.utils", "postprocess_generated_text", ("generation", "stop", "think_end_token"), False),
    ("lm_eval.api.registry", "model_registry.register", ("target",), False),
    ("lm_eval.tasks.manager", "TaskManager.__init__", ("self", "verbosity", "include_path", "include_defaults"),
     True),  # the replaced __init__ reads include_path and include_defaults by position too
    ("lm_eval.tasks.manager", "TaskManager.load", ("task_list",), False),
    ("lm_eval.api.task", "ConfigurableTask.__init__", ("self", "data_dir", "cache_dir", "download_mode", "config"),
     True, GLUE),
    ("lm_eval.api.task", "ConfigurableTask.fewshot_context", ("doc", "num_fewshot", "gen_prefix"), False),
    ("lm_eval.api.task", "ConfigurableTask.doc_to_prefix", ("doc",), False),
    ("lm_eval.api.task", "ConfigurableTask.construct_requests", ("doc", "ctx"), False),
    ("lm_eval.api.task", "ConfigurableTask.aggregation", (), False, GLUE),
    ("lm_eval.__main__", "cli_evaluate", (), False),
]


@pytest.mark.parametrize("row", SIGNATURES, ids=[f"{r[0]}.{r[1]}" for r in SIGNATURES])
def test_internal_takes_what_longctx_passes(row):
    module, attribute, params, ordered, user = (*row, SEAM)[:5]
    internal = f"{module}.{attribute}"
    try:
        obj = _resolve(module, attribute)
    except (ImportError, AttributeError) as exc:
        pytest.fail(_moved(internal, exc, user))
    taken = list(inspect.signature(inspect.unwrap(obj)).parameters)  # type: ignore[arg-type]
    if ordered:
        assert taken[:len(params)] == list(params), _moved(internal, f"its parameters are now {taken}", user)
    else:
        missing = [p for p in params if p not in taken]
        assert not missing, _moved(internal, f"it no longer takes {missing}", user)


def test_hooked_modules_exist():
    """The import hook runs longctx's registration after these modules have executed."""
    for module in (harness.MODEL_TABLE_MODULE, harness.TASK_MANAGER_MODULE, harness.HFLM_MODULE):
        assert importlib.util.find_spec(module) is not None, _moved(module)


def test_model_table_module_fills_the_registry():
    """Once `lm_eval.models` is imported, the registry knows lm-eval's own `hf`."""
    importlib.import_module(harness.MODEL_TABLE_MODULE)
    registry = _resolve("lm_eval.api.registry", "model_registry")
    assert "hf" in registry, _moved(f"{harness.MODEL_TABLE_MODULE} (filling model_registry)")


def test_hflm_class_and_keywords_are_read_off_lm_eval():
    assert harness.HFLM is _resolve(harness.HFLM_MODULE, "HFLM"), _moved(f"{harness.HFLM_MODULE}.HFLM")
    assert "pretrained" in harness.hflm_parameters(), _moved("HFLM.__init__'s keywords")


def test_hflm_keeps_device_rank_and_world_size_in_the_attributes_longctx_sets():
    lm = harness.HFLM.__new__(harness.HFLM)  # no constructor: only the properties are read
    accelerator = SimpleNamespace(process_index=1, num_processes=3, device=torch.device("cpu"))
    try:
        harness.adopt_processes(lm, accelerator)
        assert (lm.rank, lm.world_size, lm.device) == (1, 3, torch.device("cpu"))
        harness.set_device(lm, torch.device("meta"))
        assert lm.device == torch.device("meta")
    except (AttributeError, AssertionError) as exc:
        pytest.fail(_moved("HFLM._rank / _world_size / _device behind rank / world_size / device", exc))


def _assigned_in_init() -> set[str]:
    tree = ast.parse(inspect.getsource(_resolve(harness.HFLM_MODULE, "HFLM")))
    return {t.attr for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def test_hflm_stores_the_attributes_longctx_reads():
    missing = {"think_end_token", "accelerator", "_device", "_rank", "_world_size"} - _assigned_in_init()
    assert not missing, _moved(f"HFLM's attributes {sorted(missing)}")


def test_stop_and_thinking_helpers_behave_as_longctx_expects():
    try:
        assert harness.stop_sequences("\n\n", eos="</s>") == ["\n\n", "</s>"]
        assert harness.finish_generation("x</think> yes\nno", ["\n"], "</think>") == "yes"
    except (TypeError, AssertionError) as exc:
        pytest.fail(_moved("lm_eval.models.utils.handle_stop_sequences / postprocess_generated_text", exc))


def test_hflm_logger_and_model_object_warnings():
    source = inspect.getsource(_resolve(harness.HFLM_MODULE))
    assert _resolve(harness.HFLM_MODULE, "eval_logger").name == harness.HFLM_LOGGER, _moved("HFLM's logger")
    for message in harness.HFLM_MODEL_OBJECT_WARNINGS:
        assert message in source, _moved(f"HFLM's warning {message!r}")


def test_command_line_default_device_and_bad_metadata_message():
    config = _resolve("lm_eval.config.evaluate_config", "EvaluatorConfig")
    fields = {f.name: f.default for f in config.__dataclass_fields__.values()}  # type: ignore[attr-defined]
    assert fields.get("device") == harness.DEFAULT_DEVICE, _moved("EvaluatorConfig.device's default")
    parse = _resolve("lm_eval._cli.utils")
    assert harness.BAD_METADATA_PREFIX in inspect.getsource(parse), _moved("lm_eval._cli.utils' 'Invalid JSON' error")


def test_lm_eval_command_is_the_entry_point_longctx_recognises():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("lm_eval") == "lm_eval.__main__:cli_evaluate", _moved("the `lm_eval` console script")


def test_task_factory_adds_the_metadata_keys_longctx_ignores():
    source = inspect.getsource(_resolve("lm_eval.tasks._factory"))
    assert '"config_source"' in source, _moved("the task factory's metadata key 'config_source'")


def test_no_other_longctx_module_imports_lm_eval_internals():
    """Outside the seam, longctx imports only lm-eval's public API: `lm_eval` itself (simple_evaluate),
    `lm_eval.tasks` (TaskManager), `lm_eval.api.task` (ConfigurableTask), `lm_eval.api.instance`."""
    public = {"lm_eval", "lm_eval.tasks", "lm_eval.api.task", "lm_eval.api.instance"}
    offenders = []
    for path in sorted((ROOT / "longctx").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() == SEAM:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] == "lm_eval" and n not in public]
    assert not offenders, f"lm-eval internals imported outside {SEAM}: {offenders}"
