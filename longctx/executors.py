"""Where a sweep's cell groups run: `local` (child processes of the driver, `workers` at a time), `slurm`
(a job array through submitit) or `ray` (tasks on a Ray cluster). design §8; `longctx.cluster` drives
them.

The unit of work is one bundle of cell groups (a group: the cells sharing a trained adapter), run
on the worker by `longctx.cluster.work` — training included, never in the driver. An engine only
submits bundles and says which of its jobs are still alive; everything else (rows, logs,
failures) goes through the shared results directory. `submitit` and `ray` are optional
(`pip install longctx-eval[cluster]`), imported only when their executor is chosen.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from longctx.errors import LongctxError, choice_error

EXECUTORS = ("local", "slurm", "ray")
EXTRA = "pip install 'longctx[cluster]'"


@dataclass
class ExecutorConfig:
    """The `executor:` block of a sweep config (not part of any cell's identity)."""

    kind: str = "local"
    workers: int = 1  # local: cell groups at once, each child with its share of the cores and a GPU in turn
    partition: str | None = None  # Slurm partition (None: the cluster's default)
    gpus_per_cell: float = 1  # GPUs per cell group (0: CPU only); below 1 (Ray) or cells_per_gpu > 1 share one
    cells_per_gpu: int = 1  # Slurm: cell groups run side by side in one task holding one GPU
    cpus_per_cell: int = 1
    mem_gb: float | None = None
    time_limit_min: int | None = None
    array_parallelism: int = 64  # Slurm: array tasks running at once
    ray_address: str | None = None  # None: a local Ray cluster started by the driver
    ray_num_cpus: int | None = None  # local Ray cluster only: its CPU count (None: the machine's)
    max_attempts: int = 3  # submissions of one group before its cells are recorded as failed

    def validate(self) -> "ExecutorConfig":
        if self.kind not in EXECUTORS:
            raise choice_error("executor", self.kind, EXECUTORS)
        for key in ("workers", "cells_per_gpu", "cpus_per_cell", "array_parallelism", "max_attempts"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LongctxError(f"executor.{key} must be a positive integer, got {value!r}")
        for key in ("gpus_per_cell", "mem_gb", "time_limit_min", "ray_num_cpus"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise LongctxError(f"executor.{key} must be a non-negative number, got {value!r}")
        if self.kind == "slurm" and self.gpus_per_cell % 1:
            raise LongctxError(f"executor.gpus_per_cell={self.gpus_per_cell!r}: Slurm allocates whole GPUs; to share "
                               f"one GPU give gpus_per_cell: 1 and cells_per_gpu: N")
        return self


def parse_executor(values: Any, kind: str | None = None) -> ExecutorConfig:
    """The executor block (a mapping, or None), with `kind` (the command line's) taking precedence."""
    if values is not None and not isinstance(values, dict):
        raise LongctxError(f"executor must be a mapping, got {values!r}")
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(ExecutorConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LongctxError(f"unknown key {unknown[0]!r} in executor (valid: {', '.join(sorted(known))})")
    if kind is not None:
        values["kind"] = kind
    return ExecutorConfig(**values).validate()


def local_worker_env(slot: int, workers: int, visible_gpus: list[str] | None = None) -> dict[str, str]:
    """Environment of local worker `slot`'s children (of `workers`): an equal share of this
    process's cores as torch threads (unless OMP_NUM_THREADS is set: two 2-thread processes on 2
    cores ran up to 17x slower than two 1-thread ones, measured on the test suite), and where
    GPUs are visible, one of them in turn. `visible_gpus`: default the CUDA devices seen here."""
    env: dict[str, str] = {}
    if workers == 1:
        return env  # one at a time: the children run as the driver would
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // workers))
    gpus = _visible_gpus() if visible_gpus is None else visible_gpus
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def _visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (else indices)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_local_groups(jobs: list[tuple[str, dict[str, Any]]], workers: int, bar: Any) -> None:
    """The local executor: each (label, job) through `sweep_cell.run_group` in child processes of
    this one, `workers` groups at a time (threads that each wait on their child), worker slot i's
    children with `local_worker_env(i, workers)`. `bar` (tqdm) advances as groups finish. On
    Ctrl-C no further group starts; the running children get the terminal's SIGINT and their cells
    are left without rows, for the next run."""
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from longctx.sweep_cell import run_group

    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)
    lock, stopping = threading.Lock(), threading.Event()

    def one(label: str, job: dict[str, Any]) -> None:
        slot = slots.get()
        try:
            if stopping.is_set():
                return
            with lock:
                bar.set_postfix_str(label)
            limits = job.get("limits", {})
            run_group(job, limits.get("cell"), limits.get("train"), local_worker_env(slot, workers))
            with lock:
                bar.update(len(job["cells"]))
        finally:
            slots.put(slot)

    if workers == 1:
        for label, job in jobs:
            one(label, job)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, label, job) for label, job in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            stopping.set()
            raise


def require(module: str, executor: str) -> None:
    """One line naming the extra when an executor's library is missing."""
    if importlib.util.find_spec(module) is None:
        raise LongctxError(f"--executor {executor} needs the {module!r} package: {EXTRA}")


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send this process's file descriptor 2 (what child processes such as sbatch write to) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class SlurmEngine:
    """A Slurm job array per submission (submitit's `map_array`); job ids `ARRAY_TASK`."""

    name = "slurm"
    outlives_driver = True  # its queue can be asked about jobs a previous driver submitted

    def __init__(self, cfg: ExecutorConfig, out: Path) -> None:
        require("submitit", "slurm")
        import submitit

        self.folder = out / "slurm"
        self.executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster="slurm")
        side_by_side = cfg.cells_per_gpu if cfg.gpus_per_cell else 1  # groups per task (`cluster._resubmit`)
        params: dict[str, Any] = {"slurm_array_parallelism": cfg.array_parallelism, "name": f"longctx-{out.name}",
                                  "cpus_per_task": cfg.cpus_per_cell * side_by_side}
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
        if cfg.gpus_per_cell:
            params["gpus_per_node"] = int(cfg.gpus_per_cell)
        if cfg.mem_gb:
            params["mem_gb"] = cfg.mem_gb
        if cfg.time_limit_min:
            params["timeout_min"] = cfg.time_limit_min
        self.executor.update_parameters(**params)

    def submit(self, work: Callable[[list[str]], None], bundles: list[list[str]]) -> list[str]:
        try:
            with _stderr_to(self.folder / "sbatch.stderr"):  # sbatch's own complaint goes into our one line
                jobs = self.executor.map_array(work, bundles)
        except Exception as err:  # sbatch refused (bad partition, no GPUs there, ...): its own words
            text = " ".join(str(err).split())[:400]
            raise LongctxError(f"Slurm refused the job array: {text} (executor: partition, gpus_per_cell — 0 on "
                               f"CPU-only partitions —, mem_gb, time_limit_min)") from None
        return [job.job_id for job in jobs]

    def alive(self, job_ids: list[str]) -> dict[str, str]:
        """Of `job_ids`, those Slurm still holds (pending or running): id -> `queued` | `running`."""
        import subprocess

        if not job_ids:
            return {}
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise LongctxError(f"squeue failed: {(out.stderr or out.stdout).strip().splitlines()[0:1]}")
        states = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
        wanted = set(job_ids)
        return {i: ("running" if s.strip() in ("RUNNING", "COMPLETING") else "queued")
                for i, s in states.items() if i in wanted}


class RayEngine:
    """Ray tasks, one per bundle (`num_gpus` may be fractional: bundles share a GPU). Tasks live as
    long as the driver's connection: a later driver resubmits what has no row, and the group lock
    in `cluster.work` keeps a still-running old task and its resubmission from doubling a cell."""

    name = "ray"
    outlives_driver = False

    def __init__(self, cfg: ExecutorConfig, out: Path) -> None:
        require("ray", "ray")
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": cfg.ray_address} if cfg.ray_address else {
                "num_cpus": cfg.ray_num_cpus, "include_dashboard": False}
            ray.init(log_to_driver=False, **kwargs)
        gpus = ray.cluster_resources().get("GPU", 0)
        if cfg.gpus_per_cell and not gpus:
            raise LongctxError(f"executor.gpus_per_cell={cfg.gpus_per_cell:g} but the Ray cluster has no GPUs; "
                               f"give gpus_per_cell: 0")
        self.options = {"num_cpus": cfg.cpus_per_cell, "num_gpus": cfg.gpus_per_cell, "max_retries": 0}
        self.tasks: dict[str, Any] = {}

    def submit(self, work: Callable[[list[str]], None], bundles: list[list[str]]) -> list[str]:
        import ray

        remote = ray.remote(**self.options)(work)
        ids = []
        for bundle in bundles:
            ref = remote.remote(bundle)
            self.tasks[ref.hex()] = ref
            ids.append(ref.hex())
        return ids

    def alive(self, job_ids: list[str]) -> dict[str, str]:
        import ray

        refs = [self.tasks[i] for i in job_ids if i in self.tasks]
        if not refs:
            return {}
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
        return {ref.hex(): "running" for ref in pending}


ENGINES = {"slurm": SlurmEngine, "ray": RayEngine}
