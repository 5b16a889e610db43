"""A sweep's unit of work: a cell `Group` (the cells sharing one trained adapter) and its
`GroupPlan` (the group, its cells and everything a child process needs to run them).

The driver builds a plan (`longctx.sweep.run.plan`), the executors hand it on, and the child
(`python -m longctx.sweep.cell JOB.json`) reads it back: the job file is written by `to_json` and
read by `from_json` only, so its keys are defined here once.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longctx.core.identity import chunk_label, group_tag

Cell = dict[str, Any]  # {"length": L, "cell_id": ..., "identity": {...}}: one cell of a group


@dataclass(frozen=True)
class Group:
    """The cells sharing a trained adapter: one per (seed, method, task, evaluation chunk size,
    training chunk size); its cells are the sweep's lengths."""

    seed: int
    method: str
    task: str
    chunk_size: int | None  # evaluation chunk size (None: whole sequences, the unchunked baseline)
    train_chunk_size: int | None = None  # training chunk size (None: whole sequences)

    @property
    def chunk_label(self) -> str:
        """`chunk<N>` or `unchunked`, as file names spell the evaluation chunk size."""
        return chunk_label(self.chunk_size)

    def describe(self) -> str:
        """The progress bar's name of the group: method and task, then how it is chunked."""
        return (f"{self.method} {self.task}" + ("" if self.chunk_size else " unchunked")
                + (f" trained chunk {self.train_chunk_size}" if self.train_chunk_size else ""))

    def tag(self, cells: list[Cell]) -> str:
        """The group's name over `cells` (every cell of the grid's group): `identity.group_tag`."""
        return group_tag(self.method, self.task, self.seed, self.chunk_size, self.train_chunk_size,
                         [c["cell_id"] for c in cells])


@dataclass
class GroupPlan:
    """A group with the cells to run and what its child needs: the sweep config's fields, the results
    directory, the log, the time limits, the training settings and adapter directory (None for
    `base`), the task YAML folder and the code's commit."""

    group: Group
    cells: list[Cell]
    config: dict[str, Any]  # the SweepConfig's fields (`dataclasses.asdict`)
    out: str
    log: str
    limits: dict[str, float | None] = field(default_factory=dict)  # {"cell": s, "train": s}
    train: dict[str, Any] | None = None  # TrainConfig fields (with `out`), None: nothing to train
    adapter: str | None = None
    tasks_dir: str = ""
    git_commit: str | None = None

    @property
    def tag(self) -> str:
        """The group's name in the dispatch state and lock files: its log's stem (`Group.tag`)."""
        return Path(self.log).stem

    @property
    def job_file(self) -> Path:
        """Where the job is written for the child: beside the log."""
        return Path(self.log).with_suffix(".job.json")

    def with_cells(self, cells: list[Cell]) -> "GroupPlan":
        """The same plan, for `cells` only (those still without a row)."""
        return dataclasses.replace(self, cells=list(cells))

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON mapping (the group's fields at the top level, as the child reads them)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "group"}
        return {**dataclasses.asdict(self.group), **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GroupPlan":
        """The plan of a job mapping (`to_dict`'s inverse)."""
        group_keys = {f.name for f in dataclasses.fields(Group)}
        group = Group(**{k: values.get(k) for k in group_keys})
        return cls(group=group, **{k: v for k, v in values.items() if k not in group_keys})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "GroupPlan":
        return cls.from_dict(json.loads(text))
