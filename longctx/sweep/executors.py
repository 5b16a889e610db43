"""Where a sweep's cell groups run: `local` (child processes of the driver, `workers` at a time), `slurm`
(a job array through submitit) or `ray` (tasks on a Ray cluster). design §8; `longctx.sweep.cluster` drives
them.

The unit of work is one bundle of cell groups (a group: the cells sharing a trained adapter), run
on the worker by `longctx.sweep.cluster.work` — training included, never in the driver. An engine only
submits bundles and says which of its jobs are still alive; everything else (rows, logs,
failures) goes through the shared results directory. `submitit` and `ray` are optional
(`pip install longctx-eval[cluster]`), imported only when their executor is chosen.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from longctx.core.errors import LongctxError, choice_error
from longctx.core.typecheck import check_fields
from longctx.sweep.supervisor import run_group
from longctx.sweep.group import GroupPlan

EXECUTORS = ("local", "slurm", "ray")
EXTRA = "pip install 'longctx[cluster]'"
SLURM_COMMANDS = ("sbatch", "squeue", "srun")  # submitit submits with sbatch and checks for srun; we ask squeue
RAY_CONNECT_TIMEOUT_S = 10.0  # a ray_address that does not answer: ray.init itself retries for minutes


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
        if self.kind == "ray":
            self._validate_ray()
        return self

    def _validate_ray(self) -> None:
        """Ray resources no task could ever get (it would wait forever, 0 cells done) and a malformed address."""
        if self.gpus_per_cell > 1 and self.gpus_per_cell % 1:
            raise LongctxError(f"executor.gpus_per_cell={self.gpus_per_cell!r}: Ray shares a GPU only below 1; "
                               f"above 1 give a whole number")
        if self.ray_address is not None:
            ray_endpoint(self.ray_address)
        elif self.ray_num_cpus is not None and self.ray_num_cpus < self.cpus_per_cell:
            raise LongctxError(f"executor.ray_num_cpus={self.ray_num_cpus} leaves no room for a cell group of "
                               f"executor.cpus_per_cell={self.cpus_per_cell}: give ray_num_cpus >= cpus_per_cell "
                               f"(or leave it out: the machine's CPUs)")


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
    check_fields(values, ExecutorConfig, prefix="executor.")
    return ExecutorConfig(**values).validate()


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a `ray_address` (`HOST:PORT` or `ray://HOST:PORT`); None for `auto` (the cluster
    this machine belongs to, which `ray.init` finds, or refuses at once)."""
    if address == "auto":
        return None
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise LongctxError(f"executor.ray_address must be HOST:PORT, ray://HOST:PORT or auto, got {address!r}")
    return host.strip("[]"), int(port)


def ray_fit_error(nodes: list[dict[str, float]], cfg: ExecutorConfig) -> str | None:
    """Why no node (its resources: `{"CPU": n, "GPU": m}`) of a Ray cluster can run one cell
    group, else None: a task asking more than any node has waits forever."""
    need = {"CPU": cfg.cpus_per_cell, "GPU": cfg.gpus_per_cell}
    if any(all(node.get(key, 0) >= value for key, value in need.items()) for node in nodes):
        return None
    most = {key: max((node.get(key, 0) for node in nodes), default=0) for key in need}
    advice = "give gpus_per_cell: 0 to run on CPUs" if cfg.gpus_per_cell and not most["GPU"] else \
        "give smaller cpus_per_cell / gpus_per_cell"
    return (f"no node of the Ray cluster can run a cell group of executor.cpus_per_cell={cfg.cpus_per_cell} and "
            f"gpus_per_cell={cfg.gpus_per_cell:g}: its nodes have at most {most['CPU']:g} CPUs and "
            f"{most['GPU']:g} GPUs; {advice}")


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


def run_local_groups(jobs: list[GroupPlan], workers: int, bar: Any) -> None:
    """The local executor: each group's plan through `supervisor.run_group` in child processes of
    this one, `workers` groups at a time (threads that each wait on their child), worker slot i's
    children with `local_worker_env(i, workers)`. `bar` (tqdm) advances as groups finish. On
    Ctrl-C no further group starts; the running children get the terminal's SIGINT and their cells
    are left without rows, for the next run."""
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)
    lock, stopping = threading.Lock(), threading.Event()

    def one(job: GroupPlan) -> None:
        slot = slots.get()
        try:
            if stopping.is_set():
                return
            with lock:
                bar.set_postfix_str(job.group.describe())
            run_group(job, local_worker_env(slot, workers))
            with lock:
                bar.update(len(job.cells))
        finally:
            slots.put(slot)

    if workers == 1:
        for job in jobs:
            one(job)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, job) for job in jobs]
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
        missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
        if missing:
            raise LongctxError(f"--executor slurm needs Slurm's {missing[0]!r} command, which is not on PATH: run the "
                               f"sweep where Slurm jobs are submitted (a login node), or use --executor local or ray")
        require("submitit", "slurm")
        _squeue("-o", "%i", "-u", str(os.getuid()))  # Slurm answers, before anything is written or submitted
        import submitit  # deferred: an optional dependency (the `cluster` extra)

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
        if not job_ids:
            return {}
        states = dict(line.split(None, 1) for line in _squeue("-r", "-o", "%i %T").splitlines() if line.strip())
        wanted = set(job_ids)
        return {i: ("running" if s.strip() in ("RUNNING", "COMPLETING") else "queued")
                for i, s in states.items() if i in wanted}


def _squeue(*args: str) -> str:
    """squeue's output (no header), or one line saying that Slurm does not answer and squeue's last words."""
    try:
        done = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LongctxError(f"Slurm does not answer: squeue: {err}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise LongctxError(f"Slurm does not answer: {lines[-1] if lines else f'squeue exit status {done.returncode}'}")
    return done.stdout


class RayEngine:
    """Ray tasks, one per bundle (`num_gpus` may be fractional: bundles share a GPU). Tasks live as
    long as the driver's connection: a later driver resubmits what has no row, and the group lock
    in `cluster.work` keeps a still-running old task and its resubmission from doubling a cell."""

    name = "ray"
    outlives_driver = False

    def __init__(self, cfg: ExecutorConfig, out: Path) -> None:
        """Connect (or start a local cluster), refusing in one line a cluster that does not answer
        or cannot hold one cell group, before anything is written or submitted."""
        require("ray", "ray")
        if cfg.ray_address is not None:
            _check_reachable(cfg.ray_address)
        import ray  # deferred: an optional dependency (the `cluster` extra)

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": cfg.ray_address} if cfg.ray_address else {
                "num_cpus": cfg.ray_num_cpus, "include_dashboard": False}
            try:
                ray.init(log_to_driver=False, logging_level=logging.ERROR, **kwargs)  # no banner on our stderr
            except Exception as err:  # no cluster at `auto`, a version mismatch, ...: Ray's own words
                where = f"connect to the Ray cluster at {cfg.ray_address!r}" if cfg.ray_address else "start Ray"
                raise LongctxError(f"cannot {where}: {' '.join(str(err).split())[:300]}") from None
        error = ray_fit_error([node["Resources"] for node in ray.nodes() if node.get("Alive")], cfg)
        if error:
            raise LongctxError(error)
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


def _check_reachable(address: str) -> None:
    """One line, within RAY_CONNECT_TIMEOUT_S, when nothing answers at a Ray address (`ray.init`
    would retry for minutes)."""
    endpoint = ray_endpoint(address)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise LongctxError(f"cannot reach the Ray cluster at executor.ray_address={address!r}: "
                           f"{err.strerror or str(err) or type(err).__name__} (is a Ray head running there? leave "
                           f"ray_address out to start a local cluster)") from None


ENGINES = {"slurm": SlurmEngine, "ray": RayEngine}
