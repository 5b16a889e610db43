"""The task list is defined once — `longctx.tasks.TASKS` — and the shipped lm-eval YAMLs are
checked against it: two forms per task, each naming only itself (its generator is read off its
name by `glue.LongctxTask`), the groups complete."""
from __future__ import annotations

import re

import pytest
import yaml

from longctx.core.resources import task_dir
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
            assert set(config) == {"include", "task"}, config
            assert config["include"] == f"_longctx_{'gen' if form else 'll'}_template_yaml"


def test_groups_list_exactly_the_tasks_of_the_table():
    assert _read("longctx")["task"] == [f"longctx_{t}" for t in TASKS]
    assert _read("longctx_gen")["task"] == [f"longctx_{t}_gen" for t in TASKS]
    assert _read("longctx_niah")["task"] == [f"longctx_{t}" for t in TASKS if t.startswith("niah_")]


def test_each_task_passes_its_own_generator_to_build_dataset(monkeypatch):
    """lm-eval loads `glue.py` by path next to the YAML; its task class names the generator."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("glue", task_dir() / "glue.py")
    glue = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(glue)
    for task in TASKS:
        assert glue.generator_name(f"longctx_{task}") == glue.generator_name(f"longctx_{task}_gen") == task
    seen = {}
    monkeypatch.setattr(glue.ConfigurableTask, "__init__", lambda self, *a: seen.update(a[3]["dataset_kwargs"]))
    glue.LongctxTask(config={"task": "longctx_vt_gen", "class": "x", "dataset_kwargs": {"max_gen_toks": 64}})
    assert seen == {"task": "vt", "max_gen_toks": 64}
    with pytest.raises(glue.LongctxError, match="not a longctx task"):
        glue.generator_name("ruler_vt")


def test_lm_evals_default_task_search_finds_the_package_tasks_once_the_hook_ran():
    from lm_eval.tasks import TaskManager

    from longctx.lmeval.plugin import add_task_folder

    add_task_folder()
    assert "longctx_passkey" in TaskManager().all_tasks  # defaults: ours added
    assert "longctx_passkey" not in TaskManager(include_defaults=False, include_path=[]).all_tasks
