"""A sweep on Slurm or Ray (`longctx sweep CONFIG --executor slurm|ray`): submit, watch, collect.

The driver holds no state a worker needs: each cell group's job file is written under
`OUT/logs/`, the worker (`work`) runs it there — training the adapter, then evaluating the cells,
through the same supervised child as the local executor (time limits, OOM and crash diagnosis,
the group's log) — and appends one row per cell to `OUT/results.jsonl`. What was submitted is
recorded in `OUT/dispatch.json` (atomic). So the login shell can close: `longctx sweep CONFIG`
run again collects the rows that landed, leaves groups whose jobs are still queued or running
alone, and resubmits only groups with cells missing whose jobs are gone (a `scancel`, a dead
node) — at most `executor.max_attempts` times, after which their cells are recorded as errors
naming the log; `--retry-failed` gives the groups it retries their attempts afresh. Each cell is
done once whatever dies: a worker holds its group's lock while it runs and skips cells that
already have a row.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from longctx.core.fileio import atomic_write_text
from longctx.sweep.supervisor import make_row, run_group
from longctx.sweep.executors import ENGINES, ExecutorConfig
from longctx.sweep.group import Cell, GroupPlan
from longctx.sweep.results import FAILED, append_row, read_rows, row_id

STATE = "dispatch.json"
POLL_S = 2.0


@contextlib.contextmanager
def group_lock(out: Path, tag: str) -> Iterator[None]:
    """Exclusive per group across processes and nodes sharing `out` (flock; released when the holder
    dies, so a cancelled job never blocks its resubmission)."""
    import fcntl  # deferred: POSIX only (a stdlib module absent elsewhere), and only cluster workers lock

    path = out / "locks" / f"{tag}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def work(job_files: list[str]) -> None:
    """Run on a worker: each job file of the bundle (side by side when several share a GPU), every
    cell of it that has no row yet."""
    with ThreadPoolExecutor(max_workers=len(job_files)) as pool:
        for future in [pool.submit(_work_one, Path(f)) for f in job_files]:
            future.result()


def _work_one(job_file: Path) -> None:
    job = GroupPlan.from_json(job_file.read_text())
    out = Path(job.out)
    with group_lock(out, job.tag):
        done = {row_id(r) for r in read_rows(out / "results.jsonl")}
        cells = [c for c in job.cells if c["cell_id"] not in done]
        if cells:
            run_group(job.with_cells(cells))


def _load_state(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return {}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_text(out / STATE, json.dumps(state, indent=1, sort_keys=True) + "\n")


def _missing(jobs: dict[str, GroupPlan], done: set[str]) -> dict[str, list[Cell]]:
    return {tag: [c for c in job.cells if c["cell_id"] not in done] for tag, job in jobs.items()
            if any(c["cell_id"] not in done for c in job.cells)}


def _give_up(job: GroupPlan, cells: list[Cell], attempts: int, results: Path) -> None:
    message = (f"the {attempts} job(s) submitted for this cell ended without a result (cancelled, or the node "
               f"died); see {job.log} and the executor's own logs")
    for cell in cells:
        append_row(results, make_row(job, cell, n=0, status="error", message=message))


def dispatch(jobs: dict[str, GroupPlan], engine: Any, cfg: ExecutorConfig, out: Path, progress: bool = True,
             retried: Collection[str] = ()) -> None:
    """Submit every group with missing cells whose job is not alive, then wait, counting cells as
    they land, resubmitting groups whose jobs ended with cells missing. `jobs`: group tag -> job;
    `engine`: the `executors.ENGINES` one of `cfg`; `retried`: tags whose failed cells
    `--retry-failed` archived, whose attempts start again from 0 (else a group that used up
    `max_attempts` would be given up again without running)."""
    results = out / "results.jsonl"
    total = sum(len(job.cells) for job in jobs.values())
    done = {row_id(r) for r in read_rows(results)}
    bar = tqdm(total=total, desc=f"sweep cells ({cfg.kind})", disable=not progress,
               initial=sum(c["cell_id"] in done for job in jobs.values() for c in job.cells))
    state = _load_state(out)
    for tag in retried:
        if tag in state:
            state[tag]["attempts"] = 0
    try:
        while True:
            # Jobs first, rows second: a job that ends in between has its rows read, not resubmitted.
            alive = engine.alive([s["job"] for s in state.values() if s.get("engine") == cfg.kind])
            done = {row_id(r) for r in read_rows(results)}
            bar.update(sum(c["cell_id"] in done for job in jobs.values() for c in job.cells) - bar.n)
            missing = _missing(jobs, done)
            if not missing:
                return
            stale = [t for t in missing if state.get(t, {}).get("job") not in alive]
            _resubmit(engine, stale, jobs, missing, state, cfg, out)
            time.sleep(POLL_S)
    finally:
        bar.close()


def _resubmit(engine: Any, tags: list[str], jobs: dict[str, GroupPlan], missing: dict[str, list[Cell]],
              state: dict[str, Any], cfg: ExecutorConfig, out: Path) -> None:
    """Submit `tags` (bundled `cells_per_gpu` at a time), recording each job id before anything
    else can happen; groups past `max_attempts` get their missing cells recorded as errors."""
    fresh = []
    for tag in tags:
        entry = state.get(tag, {})
        attempts = entry.get("attempts", 0) if entry.get("engine") == cfg.kind else 0
        if attempts >= cfg.max_attempts:
            _give_up(jobs[tag], missing[tag], attempts, out / "results.jsonl")
            continue
        fresh.append((tag, attempts))
    size = cfg.cells_per_gpu if cfg.gpus_per_cell else 1
    bundles = [fresh[start:start + size] for start in range(0, len(fresh), size)]
    if not bundles:
        return
    files = []
    for bundle in bundles:
        for tag, _ in bundle:
            atomic_write_text(jobs[tag].job_file, jobs[tag].to_json())
        files.append([str(jobs[tag].job_file) for tag, _ in bundle])
    job_ids = engine.submit(work, files)  # one Slurm array for all of them
    for bundle, job_id in zip(bundles, job_ids):
        for tag, attempts in bundle:
            state[tag] = {"engine": cfg.kind, "job": job_id, "attempts": attempts + 1,
                          "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _save_state(out, state)


def status_rows(jobs: dict[str, GroupPlan], cfg: ExecutorConfig | None, out: Path) -> list[dict[str, Any]]:
    """Per (method, task): cells done / running / queued / failed, from the results table and, for
    Slurm, its queue (cells of groups nobody runs count as queued; Ray's tasks end with their driver)."""
    rows = {row_id(r): r for r in read_rows(out / "results.jsonl")}
    state = _load_state(out)
    alive: dict[str, str] = {}
    if cfg is not None and cfg.kind in ENGINES and ENGINES[cfg.kind].outlives_driver and state:
        alive = ENGINES[cfg.kind](cfg, out).alive([s["job"] for s in state.values() if s.get("engine") == cfg.kind])
    table: dict[tuple[str, str], dict[str, int]] = {}
    for tag, job in jobs.items():
        counts = table.setdefault((job.group.method, job.group.task),
                                  {"done": 0, "running": 0, "queued": 0, "failed": 0})
        for cell in job.cells:
            row = rows.get(cell["cell_id"])
            if row is not None:
                counts["failed" if row.get("status") in FAILED else "done"] += 1
            else:
                counts[alive.get(state.get(tag, {}).get("job"), "queued")] += 1
    return [{"method": m, "task": t, **c} for (m, t), c in table.items()]
