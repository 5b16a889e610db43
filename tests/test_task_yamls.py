"""The task list is defined once — `longctx.tasks.TASKS` — and the shipped lm-eval YAMLs are
checked against it: two forms per task, each reading its own generator, the groups complete."""
from __future__ import annotations

import re

import yaml

from longctx.resources import task_dir
from longctx.tasks import TASKS


def _read(name: str) -> dict:
    text = (task_dir() / f"{name}.yaml").read_text()
    return yaml.safe_load(re.sub(r"!function\s+", "", text))  # lm-eval's tag, read as plain text here


def test_every_task_has_both_forms_reading_its_own_generator_and_nothing_else_ships():
    expected = {f"longctx_{t}{form}" for t in TASKS for form in ("", "_gen")}
    groups = {"longctx", "longctx_gen", "longctx_niah"}
    shipped = {p.stem for p in task_dir().glob("*.yaml")}
    assert shipped == expected | groups, sorted(shipped ^ (expected | groups))
    for task in TASKS:
        for form in ("", "_gen"):
            config = _read(f"longctx_{task}{form}")
            assert config["task"] == f"longctx_{task}{form}"
            assert config["custom_dataset"] == f"hooks.{task}"
            assert config["include"] == f"_longctx_{'gen' if form else 'll'}_template_yaml"


def test_groups_list_exactly_the_tasks_of_the_table():
    assert _read("longctx")["task"] == [f"longctx_{t}" for t in TASKS]
    assert _read("longctx_gen")["task"] == [f"longctx_{t}_gen" for t in TASKS]
    assert _read("longctx_niah")["task"] == [f"longctx_{t}" for t in TASKS if t.startswith("niah_")]


def test_the_hooks_shim_exports_one_function_per_task():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hooks", task_dir() / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    assert all(callable(getattr(hooks, t)) for t in TASKS)


def test_lm_evals_default_task_search_finds_the_package_tasks_once_the_hook_ran():
    from lm_eval.tasks import TaskManager

    from longctx.lmeval_plugin import add_task_folder

    add_task_folder()
    assert "longctx_passkey" in TaskManager().all_tasks  # defaults: ours added
    assert "longctx_passkey" not in TaskManager(include_defaults=False, include_path=[]).all_tasks
