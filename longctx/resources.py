"""Data shipped inside the package: the adapter recipes and the lm-eval task YAMLs.

Found with `importlib.resources`, so they are the same files in a checkout, an editable install
and a wheel installed anywhere. lm-eval reads task YAMLs from a directory, so `task_dir()` is a
real path (a wheel install unpacks the package onto the file system).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def recipe_dir() -> Path:
    """The folder of adapter recipes, one `<method>.yaml` each."""
    return Path(str(files("longctx") / "recipes"))


def task_dir() -> Path:
    """The folder of lm-eval task YAMLs (`longctx_<task>.yaml`, `_gen` forms, groups)."""
    return Path(str(files("longctx") / "lmeval_tasks"))
