"""`longctx sweep CONFIG` (SPEC §8): methods × tasks × lengths × seeds, resumable.

Each (method, task, seed) trains once — cached under `OUT/adapters/<hash of recipe, base, task,
training settings>` — then one child process (`python -m longctx.sweep_cell`) evaluates it through
lm-eval with the `ssmlora` model type at every length still missing, in increasing order,
appending one row per length as soon as it is measured. Peak memory is per request (reset
before each), so lengths sharing a process stay separable. Killing the sweep at any moment loses
at most the cell in flight; re-running skips every recorded cell. A cell that fails or runs out
of memory is recorded as `error`/`oom` with its message, and the sweep goes on.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError, choice_error, positive_int
from longctx.resources import task_dir
from longctx.results import append_row, cell_key, read_rows, repair, write_csv

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ("methods", "tasks", "lengths")


@dataclass
class SweepConfig:
    methods: list[str]
    tasks: list[str]
    lengths: list[int]
    base: str = "longctx-tiny"
    train_length: int | None = None  # default: the shortest evaluation length
    train_steps: int = 60
    batch_size: int = 4
    num_samples: int = 8
    seeds: list[int] = field(default_factory=lambda: [0])
    chunk_size: int | None = None
    unchunked_methods: list[str] = field(default_factory=list)  # also evaluated in one pass (memory baseline)
    truncation: str = "refuse"
    out: str = "runs/sweep"


def parse_config(values: Any, source: str = "config") -> SweepConfig:
    """A validated SweepConfig from a parsed YAML mapping (one-line errors naming the bad value)."""
    from longctx.adapters import ADAPTERS
    from longctx.tasks import TASKS, check_length_value

    if not isinstance(values, dict):
        raise LongctxError(f"{source} must be a mapping with keys {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        raise LongctxError(f"{source} is missing the key {missing[0]!r} (required: {', '.join(REQUIRED)})")
    known = set(SweepConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise LongctxError(f"unknown key {unknown[0]!r} in {source} (valid: {', '.join(sorted(known))})")
    cfg = SweepConfig(**values)
    for key in REQUIRED + ("seeds",):
        if not isinstance(getattr(cfg, key), list) or not getattr(cfg, key):
            raise LongctxError(f"{key} in {source} must be a non-empty list, got {getattr(cfg, key)!r}")
    for method in cfg.methods + list(cfg.unchunked_methods):
        if method not in ADAPTERS:
            raise choice_error("method", method, ADAPTERS)
    for task in cfg.tasks:
        if task not in TASKS:
            raise choice_error("task", task, TASKS)
    cfg.lengths = sorted(check_length_value(v) for v in cfg.lengths)
    cfg.train_length = check_length_value(cfg.train_length or cfg.lengths[0])
    for key in ("train_steps", "batch_size", "num_samples"):
        positive_int(key, getattr(cfg, key))
    if cfg.chunk_size is not None:
        positive_int("chunk_size", cfg.chunk_size)
    return cfg


def load_config(path: str | Path) -> SweepConfig:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise LongctxError(f"sweep config {str(path)!r} does not exist") from None
    except yaml.YAMLError as err:
        raise LongctxError(f"sweep config {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_config(values, source=str(path))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def adapter_key(cfg: SweepConfig, method: str, task: str, seed: int) -> str:
    """Hash of everything the trained adapter depends on."""
    from longctx.adapters.base import load_recipe

    identity = {"recipe": load_recipe(method).to_dict(), "base": cfg.base, "base_id": _base_identity(cfg.base),
                "task": task, "train_length": cfg.train_length, "steps": cfg.train_steps,
                "batch_size": cfg.batch_size, "seed": seed}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _base_identity(base: str) -> str:
    from longctx.models import resolve_base

    weights = Path(resolve_base(base)) / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else base


def trained_adapter(cfg: SweepConfig, method: str, task: str, seed: int, out: Path, progress: bool) -> Path | None:
    """The adapter for this cell group (None for `base`), training it unless cached."""
    from longctx.train import TrainConfig, train_adapter

    if method == "base":
        return None
    run_dir = out / "adapters" / f"{method}-{task}-{adapter_key(cfg, method, task, seed)}"
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir / "adapter"
    return train_adapter(TrainConfig(method=method, task=task, train_length=cfg.train_length, out=str(run_dir),
                                     base=cfg.base, steps=cfg.train_steps, batch_size=cfg.batch_size, seed=seed),
                         progress=progress)


def _failure_rows(cfg: SweepConfig, group: tuple, lengths: list[int], status: str,
                  message: str) -> list[dict[str, Any]]:
    seed, method, task, chunk = group
    return [{"method": method, "base": cfg.base, "task": task, "length": length, "seed": seed, "n": 0,
             "status": status, "message": message[-500:], "chunk_size": chunk,
             "train_length": cfg.train_length, "git_commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            for length in lengths]


def run_cells(cfg: SweepConfig, group: tuple, adapter: Path | None, lengths: list[int], out: Path) -> None:
    """Evaluate the missing lengths of one (seed, method, task, chunk size) in a child process."""
    seed, method, task, chunk = group
    job = {"config": asdict(cfg), "method": method, "task": task, "seed": seed, "lengths": lengths, "chunk_size": chunk,
           "adapter": str(adapter) if adapter else None, "out": str(out), "tasks_dir": str(task_dir()),
           "git_commit": git_commit()}
    run = subprocess.run([sys.executable, "-m", "longctx.sweep_cell", json.dumps(job)], capture_output=True, text=True)
    done = {cell_key(r) for r in read_rows(out / "results.jsonl")}
    left = [length for length in lengths if (method, task, length, seed, chunk) not in done]
    if left:
        status = "oom" if run.returncode in (-9, 137) or "out of memory" in run.stderr.lower() else "error"
        tail = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit status {run.returncode}"
        for row in _failure_rows(cfg, group, left, status, tail):
            append_row(out / "results.jsonl", row)


def grid(cfg: SweepConfig) -> list[tuple]:
    """(seed, method, task, chunk size) groups; each covers every length."""
    groups = [(seed, method, task, cfg.chunk_size) for seed in cfg.seeds for method in cfg.methods
              for task in cfg.tasks]
    groups += [(seed, method, task, None) for seed in cfg.seeds for method in cfg.unchunked_methods
               for task in cfg.tasks if cfg.chunk_size is not None]
    return groups


def run_sweep(cfg: SweepConfig, out: Path, progress: bool = True) -> Path:
    """Run every missing cell; returns the results directory."""
    from tqdm import tqdm

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as err:
        raise LongctxError(f"cannot write to output directory {str(out)!r}: {err.strerror}") from None
    results = out / "results.jsonl"
    repair(results)
    groups = grid(cfg)
    rows = read_rows(results)
    other = sorted({str(r.get("base")) for r in rows} - {cfg.base})
    if other:  # rows are keyed without the base: resuming on another base would skip its cells
        raise LongctxError(f"{str(out)!r} holds results on base {other[0]!r}, but the config names base "
                           f"{cfg.base!r}; give another output directory")
    done = {cell_key(r) for r in rows}
    bar = tqdm(total=len(groups) * len(cfg.lengths), desc="sweep cells", disable=not progress,
               initial=sum((m, t, n, s, c) in done for s, m, t, c in groups for n in cfg.lengths))
    for group in groups:
        seed, method, task, chunk = group
        missing = [n for n in cfg.lengths if (method, task, n, seed, chunk) not in done]
        if not missing:
            continue
        bar.set_postfix_str(f"{method} {task}" + ("" if chunk else " unchunked"))
        try:
            adapter = trained_adapter(cfg, method, task, seed, out, progress=False)
        except (LongctxError, RuntimeError, ValueError) as err:
            for row in _failure_rows(cfg, group, missing, "error", f"training failed: {err}"):
                append_row(results, row)
        else:
            run_cells(cfg, group, adapter, missing, out)
        done = {cell_key(r) for r in read_rows(results)}
        bar.update(len(missing))
    bar.close()
    write_csv(results, out / "results.csv")
    return out
