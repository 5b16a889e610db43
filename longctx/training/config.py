"""`TrainConfig`: what one adapter's training run depends on (`longctx train`, the sweep's
adapters). Plain data with no torch import, so the sweep's driver keys adapters by it without
loading a model; `training.train` runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longctx.adapters.methods import ADAPTERS
from longctx.core.errors import choice_error, positive_int
from longctx.engine.settings import check_dtype
from longctx.tasks import TASKS


@dataclass
class TrainConfig:
    method: str
    task: str
    train_length: int
    out: str
    base: str = "longctx-tiny"
    steps: int = 100
    batch_size: int = 4
    learning_rate: float | None = None  # None: the recipe's
    seed: int = 0
    n_validation: int = 16
    eval_every: int = 50
    dtype: str = "float32"  # the base's: auto (the checkpoint's own) or an `engine.settings.DTYPE_ALIASES` name; adapters stay float32
    chunk_size: int | None = None  # chunked training with carried state (`longctx.training.chunked`); None: whole
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe fields (rank, alpha, …)

    def validate(self) -> None:
        if self.method not in ADAPTERS:
            raise choice_error("method", self.method, ADAPTERS)
        if self.task not in TASKS:
            raise choice_error("task", self.task, TASKS)
        check_dtype(self.dtype)  # one-line error naming the choices
        for name in ("train_length", "steps", "batch_size", "n_validation", "eval_every"):
            positive_int(name, getattr(self, name))
        if self.chunk_size is not None:
            positive_int("chunk_size", self.chunk_size)
