"""`longctx sweep CONFIG` (design §8): methods × tasks × lengths × seeds, resumable.

A cell is one length of a `Group` (seed, method, task, chunk size, training chunk size); its identity
(`longctx.core.identity.cell_inputs`, hashed by `identity.cell_identity`) is everything that changes its result: the base's name and a
fingerprint of its files, the method's recipe with overrides, the training settings (none for
`base`), the task with its metadata, and the evaluation settings (chunk size, carry mode,
truncation, dtype). A rerun evaluates exactly the cells whose id has no row, moves rows of cells
the config no longer has to `results.archive.jsonl`, and repeats nothing else; `retry_failed`
also reruns error/oom/timeout cells.

Per group a child process (`longctx.sweep.cell`, reading the group's `GroupPlan`) trains the
adapter unless cached — under `OUT/adapters/<method>-<task>-<adapter key>`, keyed by
the training settings — and a fresh one (whose memory figures training cannot inflate) evaluates
its missing cells, appending a row per cell. Its whole output is kept
in `OUT/logs/` and named in the rows. The driver enforces `cell_timeout_s` (each cell) and
`train_timeout_s` (training) by killing the child, and records a child that dies (out of memory
included) against the cell in flight; the other cells still run. One sweep per directory at a
time (a lock file); a second one is refused. The config is defined and validated in
`longctx.sweep.config` (re-exported here); `sweep_outcome` says how the table ended.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from longctx.adapters.recipe import load_recipe
from longctx.core import identity
from longctx.core.errors import LongctxError
from longctx.core.resources import source_checkout, task_dir
from longctx.engine.gguf import gguf_sha256, is_gguf
from longctx.engine.settings import parse_rope_scaling, resolve_base
from longctx.sweep.cluster import dispatch, status_rows
from longctx.sweep.config import SweepConfig, load_config, parse_config, train_chunk_sizes  # noqa: F401  (re-exported)
from longctx.sweep.executors import ENGINES, parse_executor, run_local_groups
from longctx.sweep.group import Cell, Group, GroupPlan
from longctx.sweep.results import FAILED, STATUSES, archive_rows, read_rows, repair, row_id, write_csv
from longctx.tasks import haystack_for
from longctx.training.config import TrainConfig

REPO = source_checkout()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def base_identity(base: str) -> str:
    """`identity.base_identity` of a base named as a sweep names it, computed once per sweep without
    loading the model: a GGUF base (a real base's name, a .gguf file) by its file's sha256, a
    directory (an embedded base's name, a path, a hub id in the local HF cache) by its files, else
    by its name."""
    if is_gguf(base):
        return identity.base_identity(base, gguf_sha256=gguf_sha256(base))
    directory = Path(resolve_base(base))
    return identity.base_identity(base, directory if directory.is_dir() else _hub_snapshot(base))


def _hub_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache  # deferred: only for a hub id, not a local base

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a repo id, or no hub client: the name is all we know
        return None
    return Path(found).parent if isinstance(found, str) else None


def training_settings(cfg: SweepConfig, group: Group) -> dict[str, Any] | None:
    """The `TrainConfig` fields the sweep trains the group's adapter with, less its directory (None
    for `base`). A whole-sequence run leaves `chunk_size` out, so identities from before it existed
    still hold."""
    if group.method == "base":
        return None
    settings = asdict(TrainConfig(method=group.method, task=group.task, train_length=cfg.train_length, out="",
                                  base=cfg.base, steps=cfg.train_steps, batch_size=cfg.batch_size, seed=group.seed,
                                  dtype=cfg.dtype, learning_rate=cfg.learning_rate,
                                  overrides=cfg.recipe_overrides.get(group.method, {}),
                                  chunk_size=group.train_chunk_size))
    settings.pop("out")
    if group.train_chunk_size is None:
        settings.pop("chunk_size")
    return settings


def group_adapter_key(cfg: SweepConfig, group: Group, base_id: str) -> str:
    """`identity.adapter_key` of the group's adapter: base, recipe and training settings."""
    return identity.adapter_key(cfg.base, base_id, _recipe(cfg, group.method), training_settings(cfg, group))


def adapter_dir(cfg: SweepConfig, group: Group, out: Path, base_id: str) -> Path:
    """OUT/adapters/<method>-<task>-<adapter key>: the cached adapter of the group."""
    return Path(out) / "adapters" / f"{group.method}-{group.task}-{group_adapter_key(cfg, group, base_id)}"


def _recipe(cfg: SweepConfig, method: str) -> dict[str, Any]:
    return load_recipe(method, cfg.recipe_overrides.get(method)).to_dict()


def cell_inputs(cfg: SweepConfig, base_id: str, group: Group, length: int) -> dict[str, Any]:
    """The identity inputs of the group's cell at `length` (`identity.cell_inputs`)."""
    return identity.cell_inputs(
        base=cfg.base, base_id=base_id, method=group.method, recipe=_recipe(cfg, group.method),
        training=training_settings(cfg, group), task=group.task, length=length, num_samples=cfg.num_samples,
        seed=group.seed, haystack=haystack_for(cfg.haystack, group.task), depths=cfg.depths,
        chunk_size=group.chunk_size, ssm_carry=cfg.ssm_carry, truncation=cfg.truncation, dtype=cfg.dtype,
        rope_scaling=parse_rope_scaling(cfg.rope_scaling) if cfg.rope_scaling else None)


def grid(cfg: SweepConfig) -> list[Group]:
    """Every group of the sweep (each covers every length): the methods chunked, then the
    `unchunked_methods` in one pass (when the sweep chunks at all)."""
    groups = [Group(seed, method, task, cfg.chunk_size, train) for seed in cfg.seeds for method in cfg.methods
              for train in train_chunk_sizes(cfg, method) for task in cfg.tasks]
    if cfg.chunk_size is not None:
        groups += [Group(seed, method, task, None, train) for seed in cfg.seeds for method in cfg.unchunked_methods
                   for train in train_chunk_sizes(cfg, method) for task in cfg.tasks]
    return groups


def plan(cfg: SweepConfig, base_id: str, out: Path | None = None) -> list[GroupPlan]:
    """The plan of every group of the grid with all its cells; results under `out` (default
    the config's `out`)."""
    out = Path(out if out is not None else cfg.out)
    commit, config = git_commit(), asdict(cfg)
    plans = []
    for group in grid(cfg):
        cells: list[Cell] = []
        for length in cfg.lengths:
            inputs = cell_inputs(cfg, base_id, group, length)
            cells.append({"length": length, "cell_id": identity.cell_identity(inputs), "identity": inputs})
        train = training_settings(cfg, group)
        adapter = adapter_dir(cfg, group, out, base_id) / "adapter" if train else None
        if train:
            train["out"] = str(adapter.parent)
        plans.append(GroupPlan(group=group, cells=cells, config=config, out=str(out),
                               log=str(out / "logs" / f"{group.tag(cells)}.log"),
                               limits={"cell": cfg.cell_timeout_s, "train": cfg.train_timeout_s}, train=train,
                               adapter=str(adapter) if adapter else None, tasks_dir=str(task_dir()),
                               git_commit=commit))
    return plans


def _check_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as err:
        raise LongctxError(f"cannot write to output directory {str(out)!r}: {err.strerror}") from None


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One sweep per results directory at a time (the table is rewritten when rows are archived);
    the lock goes with the process, so a killed sweep never blocks the next."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".sweep.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            raise LongctxError(f"another sweep (pid {handle.read().strip() or '?'}) is running on {str(out)!r}; "
                               f"wait for it or give another output directory") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def _current_table(cfg: SweepConfig, out: Path, current: set[str], retry_failed: bool) -> tuple[set[str], set[str]]:
    """Archive rows of cells not in this config (and failed ones, when retrying); the ids done, and
    the ids of the failed cells archived to be retried."""
    results = out / "results.jsonl"
    repair(results)
    rows = read_rows(results)
    other = sorted({str(r.get("base")) for r in rows} - {cfg.base})
    if other:  # one directory, one base: a wrong --out must not archive another base's table
        raise LongctxError(f"{str(out)!r} holds results on base {other[0]!r}, but the config names base "
                           f"{cfg.base!r}; give another output directory")
    archive_rows(results, {row_id(r) for r in rows} - current, "not in the current config")
    retried = {row_id(r) for r in rows if r.get("status") in FAILED and row_id(r) in current} if retry_failed else set()
    if retried:
        archive_rows(results, retried, "retried (--retry-failed)")
    return {row_id(r) for r in read_rows(results)}, retried


def run_sweep(cfg: SweepConfig, out: Path, progress: bool = True, retry_failed: bool = False,
              executor: str | None = None) -> Path:
    """Run every cell without a current row; returns the results directory. `executor` (else the
    config's `executor.kind`, else `local`): where the cell groups run (`longctx.sweep.executors`). A
    cluster executor is checked first (Slurm's commands answer; the Ray cluster is reachable and
    can hold a cell group), so that nothing is written when it cannot run anything."""
    settings = parse_executor(cfg.executor, executor)
    out = Path(out) if settings.kind == "local" else Path(out).resolve()  # workers elsewhere need whole paths
    engine = ENGINES[settings.kind](settings, out) if settings.kind in ENGINES else None
    _check_output(out)
    with _lock(out):
        plans = plan(cfg, base_identity(cfg.base), out)
        done, retried = _current_table(cfg, out, {c["cell_id"] for p in plans for c in p.cells}, retry_failed)
        missing = _missing(plans, done)
        if engine is None:
            bar = tqdm(total=sum(len(p.cells) for p in plans), desc="sweep cells", disable=not progress,
                       initial=len(done))
            run_local_groups(missing, settings.workers, bar)
            bar.close()
        else:
            again = {p.tag for p in missing if any(c["cell_id"] in retried for c in p.cells)}
            dispatch({p.tag: p for p in missing}, engine, settings, out, progress, retried=again)
        write_csv(out / "results.jsonl", out / "results.csv")
    return out


def _missing(plans: list[GroupPlan], done: set[str]) -> list[GroupPlan]:
    """Each plan with cells without a row, for those cells only (its log, named after all its
    cells, stays the same)."""
    left = [p.with_cells([c for c in p.cells if c["cell_id"] not in done]) for p in plans]
    return [p for p in left if p.cells]


def sweep_status(cfg: SweepConfig, out: Path, executor: str | None = None) -> list[dict[str, Any]]:
    """Per (method, task): cells done / running / queued / failed (`cluster.status_rows`)."""
    settings = parse_executor(cfg.executor, executor)
    out = Path(out) if settings.kind == "local" else Path(out).resolve()
    plans = {p.tag: p for p in plan(cfg, base_identity(cfg.base), out)}
    return status_rows(plans, settings if settings.kind != "local" else None, out)


def sweep_outcome(out: Path) -> tuple[int, str | None]:
    """(cells ok, one line on the others, None when every cell is ok): how `longctx sweep` ends
    (exit status 1 when no cell is ok)."""
    rows = read_rows(Path(out) / "results.jsonl")
    counts = Counter(str(r.get("status")) for r in rows)
    ok = counts.pop("ok", 0)
    if rows and not counts:
        return ok, None
    order = {status: i for i, status in enumerate(STATUSES)}
    failed = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: order.get(kv[0], 99)))
    return ok, (f"sweep finished with {ok} of {len(rows)} cells ok" + (f" ({failed})" if failed else "")
                + f"; see {Path(out) / 'results.jsonl'}")


def report_outcome(out: Path) -> int:
    """`sweep_outcome`'s line on stderr (`longctx: …`) when some cell is not ok; the cells that are
    (a command exits 1 when none is)."""
    ok, failures = sweep_outcome(out)
    if failures:
        print(f"longctx: {failures}", file=sys.stderr)
    return ok
