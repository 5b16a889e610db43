"""A sweep's YAML config (design §8): `SweepConfig` and its validation.

Everything wrong in a config is refused when it is loaded, before anything runs or is written,
in one line naming the bad value: unknown keys, values of the wrong type (every field is checked
against its annotation, so a quoted number such as `train_steps: "4"` is refused, not failed
later as an error row), a value listed twice in a list field (it would evaluate a cell twice),
unknown names, out-of-range settings, impossible executor resources.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longctx.adapters import ADAPTERS
from longctx.adapters.recipe import Recipe, load_recipe
from longctx.core.errors import LongctxError, choice_error, positive_int
from longctx.core.fetch import ESSAYS, require
from longctx.core.resources import preset_dir
from longctx.core.typecheck import check_fields
from longctx.engine.gguf import REAL_BASES
from longctx.engine.settings import CARRY_CHOICES, TRUNCATION_CHOICES, check_dtype, parse_rope_scaling
from longctx.sweep.executors import parse_executor
from longctx.tasks import HAYSTACKS, TASKS, _check_depths, check_length_value, haystack_for

REQUIRED = ("methods", "tasks", "lengths")
# One size (or null: whole sequences), a list of them, or per method a size, null or a list.
TrainChunk = int | None | list[int | None]


@dataclass
class SweepConfig:
    methods: list[str]
    tasks: list[str]
    lengths: list[int]
    base: str = "longctx-tiny"
    train_length: int | None = None  # default: the shortest evaluation length
    train_steps: int = 60
    batch_size: int = 4
    learning_rate: float | None = None  # None: each recipe's own
    recipe_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> recipe fields
    dtype: str = "float32"  # the base's dtype in training and evaluation
    num_samples: int = 8
    seeds: list[int] = field(default_factory=lambda: [0])
    haystack: str | dict[str, str] | None = None  # one for every task, or {task: haystack}; None: their defaults
    depths: list[float] | None = None  # None: the tasks' default needle depths
    chunk_size: int | None = None  # evaluation chunk size (None: whole sequences); validated here once
    # Chunked training (`longctx.training.chunked`): a size (or null: whole sequences) for every
    # method, or per method a size, null, or a list of them (each one a separately trained series).
    train_chunk_size: TrainChunk | dict[str, TrainChunk] = None
    ssm_carry: str = "chunk"  # chunk | reset (adapter state between chunks)
    unchunked_methods: list[str] = field(default_factory=list)  # also evaluated in one pass (memory baseline)
    truncation: str = "refuse"
    # Rope scaling for evaluation (`TYPE:FACTOR`, e.g. yarn:4; training never scales): lengths past the
    # base's position limit, deliberately. Part of each cell's identity when set.
    rope_scaling: str | None = None
    cell_timeout_s: float | None = None  # each cell's evaluation (the first one's includes loading the model)
    train_timeout_s: float | None = None  # training one adapter
    executor: dict[str, Any] = field(default_factory=dict)  # where groups run (`executors.ExecutorConfig`)
    out: str = "runs/sweep"


def parse_config(values: Any, source: str = "config") -> SweepConfig:
    """A validated SweepConfig from a parsed YAML mapping (one-line errors naming the bad value)."""
    if not isinstance(values, dict):
        raise LongctxError(f"{source} must be a mapping with keys {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        raise LongctxError(f"{source} is missing the key {missing[0]!r} (required: {', '.join(REQUIRED)})")
    known = set(SweepConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise LongctxError(f"unknown key {unknown[0]!r} in {source} (valid: {', '.join(sorted(known))})")
    check_fields(values, SweepConfig, where=source)
    cfg = SweepConfig(**values)
    for key in REQUIRED + ("seeds",):
        if not getattr(cfg, key):
            raise LongctxError(f"{key} in {source} must be a non-empty list, got {getattr(cfg, key)!r}")
    _check_unique(cfg, source)
    _check_names(cfg)
    _check_settings(cfg)
    return cfg


def _check_unique(cfg: SweepConfig, source: str) -> None:
    """Each list field names a value once: `lengths: [128, 128]` would evaluate one cell twice."""
    lists = {key: getattr(cfg, key) or [] for key in ("methods", "tasks", "lengths", "seeds", "unchunked_methods",
                                                     "depths")}
    sizes = cfg.train_chunk_size
    per_method = sizes.items() if isinstance(sizes, dict) else [(None, sizes)]
    lists.update({f"train_chunk_size[{m!r}]" if m else "train_chunk_size": v for m, v in per_method
                  if isinstance(v, list)})
    for key, items in lists.items():
        seen: list[Any] = []
        for item in items:
            if item in seen:
                raise LongctxError(f"{key} in {source} lists {item!r} twice; give each value once")
            seen.append(item)


def _check_names(cfg: SweepConfig) -> None:
    for method in cfg.methods + list(cfg.unchunked_methods):
        if method not in ADAPTERS:
            raise choice_error("method", method, ADAPTERS)
    for task in cfg.tasks:
        if task not in TASKS:
            raise choice_error("task", task, TASKS)
    if cfg.base in REAL_BASES:  # fetched before anything runs, or one line saying how
        require(REAL_BASES[cfg.base][0].name)
    for method, overrides in cfg.recipe_overrides.items():
        if method not in cfg.methods + list(cfg.unchunked_methods):
            raise choice_error("method in recipe_overrides", method, dict.fromkeys(cfg.methods + cfg.unchunked_methods))
        check_fields(overrides, Recipe, prefix=f"recipe_overrides.{method}.")
        load_recipe(method, overrides)  # unknown fields and bad values: one line


def _check_settings(cfg: SweepConfig) -> None:
    cfg.lengths = sorted(check_length_value(v) for v in cfg.lengths)
    cfg.train_length = check_length_value(cfg.train_length or cfg.lengths[0])
    for key in ("train_steps", "batch_size", "num_samples"):
        positive_int(key, getattr(cfg, key))
    if cfg.chunk_size is not None:
        positive_int("chunk_size", cfg.chunk_size)
    for method in cfg.methods + list(cfg.unchunked_methods):
        for size in train_chunk_sizes(cfg, method):
            if size is not None:
                positive_int(f"train_chunk_size of {method}", size)
    check_dtype(cfg.dtype)
    scaling = parse_rope_scaling(cfg.rope_scaling)
    if scaling and scaling["rope_type"] == "dynamic" and cfg.chunk_size is not None:
        raise LongctxError("rope_scaling dynamic cannot be chunked (its frequencies follow each forward's longest "
                           "position); use yarn or linear, or chunk_size: null")
    for key, value, choices in [("ssm_carry", cfg.ssm_carry, CARRY_CHOICES),
                                ("truncation", cfg.truncation, TRUNCATION_CHOICES)]:
        if value not in choices:
            raise choice_error(key, value, choices)
    _check_haystacks(cfg)
    if cfg.depths is not None:
        cfg.depths = _check_depths(cfg.depths)
    parse_executor(cfg.executor)  # unknown keys, bad values, impossible resources: one line
    for key in ("learning_rate", "cell_timeout_s", "train_timeout_s"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise LongctxError(f"{key} must be a positive number, got {value!r}")


def _check_haystacks(cfg: SweepConfig) -> None:
    """Known names (and tasks, for a mapping); a fetched haystack must be in the cache before anything runs."""
    if isinstance(cfg.haystack, dict):
        for task in cfg.haystack:
            if task not in cfg.tasks:
                raise choice_error("task in haystack", task, cfg.tasks)
    for task in cfg.tasks:
        name = haystack_for(cfg.haystack, task)
        if name is not None and name not in HAYSTACKS:
            raise choice_error("haystack", name, HAYSTACKS)
        if name == "paul-graham":
            require(ESSAYS.name)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise LongctxError(f"the key {key!r} is given twice (line {node.value[i][0].start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


def presets() -> dict[str, Path]:
    """The sweep presets shipped with the package (`longctx sweep demo`): name -> YAML file."""
    return {path.stem: path for path in sorted(preset_dir().glob("*.yaml"), key=lambda p: p.stem)}


def config_path(config: str | Path) -> Path:
    """The YAML file of `config`: an existing file, else the preset of that name (one line listing
    the presets when it is neither)."""
    path = Path(config)
    if path.is_file():
        return path
    found = presets()
    if str(config) in found:
        return found[str(config)]
    raise LongctxError(f"sweep config {str(config)!r} does not exist and is no preset (presets: "
                       f"{', '.join(found)})")


def load_config(config: str | Path) -> SweepConfig:
    """The validated config of a YAML file or a preset's name (one-line errors: missing file, bad
    YAML, bad values)."""
    path = config_path(config)
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise LongctxError(f"sweep config {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    except LongctxError as err:
        raise LongctxError(f"sweep config {str(path)!r}: {err}") from None
    return parse_config(values, source=str(path))


def train_chunk_sizes(cfg: SweepConfig, method: str) -> list[int | None]:
    """The training chunk sizes `method` is trained with, one series each (`[None]` for `base`)."""
    value = cfg.train_chunk_size
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(cfg.methods) - set(cfg.unchunked_methods))
        if unknown:
            raise choice_error("method in train_chunk_size", unknown[0], dict.fromkeys(cfg.methods))
        value = value.get(method)
    sizes = list(value if isinstance(value, list) else [value])
    return [None] if method == "base" or not sizes else sizes
