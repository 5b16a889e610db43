"""The driver's side of a sweep's cell child (`longctx.sweep.cell`): run a group's children under
its time limits, and record what they left undone.

A child prints a marker line before each phase (`longctx-sweep-cell: begin train|trained|load|length=L`);
`supervise` follows the log by them, kills a child whose phase outlasts its limit and says what
was in flight when it ended; `run_group` starts children until every cell of the group has a row,
recording a timed-out or dead child against the cell in flight. Light to import (no torch, no
lm-eval): every executor's driver and worker runs it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longctx.core.fileio import atomic_write_text
from longctx.sweep.group import Cell, GroupPlan
from longctx.sweep.results import append_row, is_oom, read_rows, row_id

MARKER = "longctx-sweep-cell: begin "
CHILD = [sys.executable, "-m", "longctx.sweep.cell"]  # + the job file; tests substitute a stand-in
POLL_S = 0.1


def make_row(job: GroupPlan, cell: Cell, **values: Any) -> dict[str, Any]:
    """A results row of `cell` in `job`, with its identity and log (the child's and the driver's)."""
    group = job.group
    return {"method": group.method, "base": job.config["base"], "task": group.task, "length": cell["length"],
            "seed": group.seed, "chunk_size": group.chunk_size, "train_length": job.config["train_length"],
            "train_chunk_size": group.train_chunk_size,
            "git_commit": job.git_commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "log": job.log,
            "cell_id": cell["cell_id"], "identity": cell["identity"], **values}


@dataclass
class Outcome:
    returncode: int
    phase: str  # start | train | load | length=L: what was in flight when it ended
    timed_out: bool
    tail: str  # the child's output since its last marker (the failing phase's own)


class _Watch:
    """Follows the log from one offset: the current phase, since when, and the output after it."""

    def __init__(self, log: Path, offset: int) -> None:
        self.handle = open(log, "rb")
        self.handle.seek(offset)
        self.phase, self.since, self.pending, self.after = "start", time.monotonic(), b"", []

    def read(self) -> None:
        *lines, self.pending = (self.pending + self.handle.read()).split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text.startswith(MARKER):
                self.phase, self.since, self.after = text[len(MARKER):].split()[0], time.monotonic(), []
            else:
                self.after = (self.after + [text])[-200:]

    def tail(self) -> str:
        return "\n".join(self.after + [self.pending.decode(errors="replace")]).strip()


def _die_with_parent() -> None:
    """Linux: the child is killed when the driver dies, so no orphan goes on appending rows."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def supervise(job_file: Path, log: Path, limits: dict[str, float | None],
              extra_env: dict[str, str] | None = None) -> Outcome:
    """Run the child on `job_file` (environment: ours plus `extra_env`), its output appended to
    `log`; kill it when its current phase outlasts its limit (`limits[phase]`, else `limits["cell"]`)."""
    env = {**os.environ, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
    if env.get("TRANSFORMERS_VERBOSITY") in (None, "error"):  # the CLI's own quiet default: not for the log
        env["TRANSFORMERS_VERBOSITY"] = "warning"
    with open(log, "ab") as sink:
        sink.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} longctx sweep: {' '.join(CHILD)} {job_file}\n".encode())
        sink.flush()
        watch = _Watch(log, sink.tell())
        proc = subprocess.Popen([*CHILD, str(job_file)], stdout=sink, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        while proc.poll() is None:
            watch.read()
            limit = limits.get(watch.phase, limits.get("cell"))
            if limit is not None and time.monotonic() - watch.since > limit:
                proc.kill()
                proc.wait()
                watch.read()
                return Outcome(proc.returncode, watch.phase, True, watch.tail())
            time.sleep(POLL_S)
        watch.read()
        return Outcome(proc.returncode, watch.phase, False, watch.tail())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watch.handle.close()


def _blamed(outcome: Outcome, cells: list[Cell]) -> list[Cell]:
    """The cells a dead child's failure belongs to: the length in flight, else all left."""
    if outcome.phase.startswith("length="):
        length = int(outcome.phase.removeprefix("length="))
        return [c for c in cells if c["length"] == length] or cells[:1]
    return cells


def _failure_values(outcome: Outcome, limits: dict[str, float | None]) -> dict[str, Any]:
    """Row values for cells of a child that timed out or died."""
    if outcome.timed_out:
        key = "train_timeout_s" if outcome.phase == "train" else "cell_timeout_s"
        limit = limits.get(outcome.phase, limits.get("cell"))
        what = {"train": "training the adapter", "start": "starting the child", "load": "loading the model"}
        doing = what.get(outcome.phase, f"evaluating {outcome.phase.replace('=', ' ')}")
        return {"n": 0, "status": "timeout", "message": f"{doing} exceeded {key}={limit:g} s; the child was killed"}
    lines = [line.strip() for line in outcome.tail.splitlines() if line.strip()]
    killed = outcome.returncode in (-9, 137)
    message = lines[-1] if lines else f"the child exited with status {outcome.returncode}"
    if killed and not is_oom(outcome.tail):
        message = f"the child was killed by SIGKILL (out of memory?) in phase {outcome.phase}" + (
            f"; its last output: {lines[-1]}" if lines else "")
    return {"n": 0, "status": "oom" if killed or is_oom(outcome.tail) else "error", "message": message[:500]}


def run_group(job: GroupPlan, extra_env: dict[str, str] | None = None) -> None:
    """The driver's side of one job: run children (environment: ours plus `extra_env`), each under
    the job's time limits (`limits`: `cell` per length, `train` for training), until every
    cell has a row; a child that times out or dies is recorded against the cell in flight (or every
    cell left, outside a length) and a fresh child takes the rest. A child ended by SIGTERM or SIGINT
    was cancelled from outside (`scancel`, preemption, Ctrl-C): its cells are left without rows,
    for the next run or resubmission to do."""
    results, log = Path(job.out) / "results.jsonl", Path(job.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    limits = {"cell": job.limits.get("cell"), "train": job.limits.get("train")}
    cells = list(job.cells)
    while cells:
        atomic_write_text(job.job_file, job.with_cells(cells).to_json())
        outcome = supervise(job.job_file, log, limits, extra_env)
        if outcome.phase == "trained" and outcome.returncode == 0 and not outcome.timed_out:
            continue  # the adapter is saved; the next child loads it and evaluates
        done = {row_id(r) for r in read_rows(results)}
        cells = [c for c in cells if c["cell_id"] not in done]
        if not cells:
            return
        cancelled = {-signal.SIGTERM: "SIGTERM", -signal.SIGINT: "SIGINT"}  # scancel, preemption, kill; Ctrl-C
        if outcome.returncode in cancelled and not outcome.timed_out:
            with open(log, "a") as sink:
                sink.write(f"==== cancelled ({cancelled[outcome.returncode]}): {len(cells)} cell(s) left without "
                           f"a row, for a rerun\n")
            return
        blamed = _blamed(outcome, cells)
        values = _failure_values(outcome, limits)
        for cell in blamed:
            append_row(results, make_row(job, cell, **values))
        cells = [c for c in cells if c not in blamed]

