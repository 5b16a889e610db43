"""Data shipped inside the package: the embedded bases and texts, the adapter recipes, the sweep
presets and the lm-eval task YAMLs.

Found with `importlib.resources`, so they are the same files in a checkout, an editable install
and a wheel installed anywhere. lm-eval reads task YAMLs from a directory, so `task_dir()` is a
real path (a wheel install unpacks the package onto the file system).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def recipe_dir() -> Path:
    """The folder of adapter recipes, one `<method>.yaml` each."""
    return Path(str(files("longctx") / "adapters" / "recipes"))


def task_dir() -> Path:
    """The folder of lm-eval task YAMLs (`longctx_<task>.yaml`, `_gen` forms, groups)."""
    return Path(str(files("longctx") / "lmeval" / "tasks"))


def assets_dir() -> Path:
    """The folder of embedded bases (`longctx-tiny`, …) and bundled texts (`text/`)."""
    return Path(str(files("longctx") / "assets"))


def preset_dir() -> Path:
    """The folder of the sweep presets (`demo.yaml`, `demo-mamba.yaml`)."""
    return Path(str(files("longctx") / "sweep" / "presets"))


def source_checkout() -> Path:
    """The folder above the package: the repository in a checkout or an editable install."""
    return Path(str(files("longctx"))).parent
