"""`longctx sweep CONFIG` (design §8): methods × tasks × lengths × seeds, resumable.

A cell is one (method, task, seed, chunk size, training chunk size, length); its identity (`cell_inputs`, hashed by
`results.cell_identity`) is everything that changes its result: the base's name and a
fingerprint of its files, the method's recipe with overrides, the training settings (none for
`base`), the task with its metadata, and the evaluation settings (chunk size, carry mode,
truncation, dtype). A rerun evaluates exactly the cells whose id has no row, moves rows of cells
the config no longer has to `results.archive.jsonl`, and repeats nothing else; `retry_failed`
also reruns error/oom/timeout cells.

Per (seed, method, task, chunk size, training chunk size) a child process (`longctx.sweep.cell`)
trains the adapter unless cached — under `OUT/adapters/<method>-<task>-<adapter_key>`, keyed by
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
import hashlib
import os
import subprocess
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from longctx.adapters import load_recipe
from longctx.core.errors import LongctxError
from longctx.core.resources import source_checkout, task_dir
from longctx.engine.bases import parse_rope_scaling, resolve_base
from longctx.engine.gguf import gguf_sha256, is_gguf
from longctx.sweep.cluster import dispatch, group_tag, status_rows
from longctx.sweep.config import SweepConfig, load_config, parse_config, train_chunk_sizes  # noqa: F401  (re-exported)
from longctx.sweep.executors import ENGINES, parse_executor, run_local_groups
from longctx.sweep.results import FAILED, STATUSES, archive_rows, cell_identity, read_rows, repair, row_id, write_csv
from longctx.tasks import haystack_for
from longctx.training.train import TrainConfig

REPO = source_checkout()
IDENTITY_VERSION = 1  # bump when the identity's definition changes (every cell then reruns)
FULL_HASH_BYTES = 256 << 20  # base files up to this size are hashed whole; larger ones sampled
BASE_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".gguf")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def base_identity(base: str) -> str:
    """Fingerprint of the base's files, computed once per sweep without loading the model: its
    config, tokenizer and weight files (names, sizes, contents — sampled blocks of files over
    256 MiB). A GGUF base (a real base's name, a .gguf file) is its file's sha256. A hub id is read
    from the local HF cache; one not cached is identified by name."""
    if is_gguf(base):
        return "gguf:" + gguf_sha256(base)[:16]
    directory = Path(resolve_base(base))
    if not directory.is_dir():
        directory = _hub_snapshot(base)
    if directory is None:
        return f"name:{base}"
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in BASE_FILE_SUFFIXES and path.name != "manifest.json":
            digest.update(f"{path.name}:{path.stat().st_size}:".encode() + _file_digest(path))
    return digest.hexdigest()[:16]


def _hub_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a repo id, or no hub client: the name is all we know
        return None
    return Path(found).parent if isinstance(found, str) else None


def _file_digest(path: Path) -> bytes:
    size, block = path.stat().st_size, 1 << 20
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            for piece in iter(lambda: handle.read(16 * block), b""):
                digest.update(piece)
        else:
            for i in range(17):  # the header, 15 blocks spread over the values, the end
                handle.seek(max(0, min(i * (size // 16), size - block)))
                digest.update(handle.read(block))
    return digest.digest()


def training_settings(cfg: SweepConfig, method: str, task: str, seed: int,
                      train_chunk: int | None = None) -> dict[str, Any] | None:
    """The `TrainConfig` fields the sweep trains this adapter with, less its directory (None for `base`).
    A whole-sequence run leaves `chunk_size` out, so identities from before it existed still hold."""
    if method == "base":
        return None
    settings = asdict(TrainConfig(method=method, task=task, train_length=cfg.train_length, out="", base=cfg.base,
                                  steps=cfg.train_steps, batch_size=cfg.batch_size, seed=seed, dtype=cfg.dtype,
                                  learning_rate=cfg.learning_rate, overrides=cfg.recipe_overrides.get(method, {}),
                                  chunk_size=train_chunk))
    settings.pop("out")
    if train_chunk is None:
        settings.pop("chunk_size")
    return settings


def adapter_key(cfg: SweepConfig, method: str, task: str, seed: int, base_id: str | None = None,
                train_chunk: int | None = None) -> str:
    """Hash of everything the trained adapter depends on: base, recipe and training settings."""
    identity = {"base": {"name": cfg.base, "id": base_id or base_identity(cfg.base)},
                "recipe": _recipe(cfg, method), "training": training_settings(cfg, method, task, seed, train_chunk)}
    return cell_identity(identity)


def adapter_dir(cfg: SweepConfig, method: str, task: str, seed: int, out: Path, base_id: str | None = None,
                train_chunk: int | None = None) -> Path:
    key = adapter_key(cfg, method, task, seed, base_id, train_chunk)
    return Path(out) / "adapters" / f"{method}-{task}-{key}"


def _recipe(cfg: SweepConfig, method: str) -> dict[str, Any]:
    return load_recipe(method, cfg.recipe_overrides.get(method)).to_dict()


def cell_inputs(cfg: SweepConfig, base_id: str, group: tuple, length: int) -> dict[str, Any]:
    """The one definition of a cell's identity: every input that changes its result."""
    seed, method, task, chunk, train_chunk = group
    return {"version": IDENTITY_VERSION,
            "base": {"name": cfg.base, "id": base_id},
            "method": method, "recipe": _recipe(cfg, method),
            "training": training_settings(cfg, method, task, seed, train_chunk),
            "task": {"name": task, "length": length, "num_samples": cfg.num_samples, "seed": seed,
                     "haystack": haystack_for(cfg.haystack, task), "depths": cfg.depths, "tokenizer": cfg.base},
            "evaluation": {"chunk_size": chunk, "ssm_carry": cfg.ssm_carry if chunk else None,
                           "truncation": cfg.truncation, "dtype": cfg.dtype,
                           **({"rope_scaling": parse_rope_scaling(cfg.rope_scaling)} if cfg.rope_scaling else {})}}


def grid(cfg: SweepConfig) -> list[tuple]:
    """(seed, method, task, chunk size, training chunk size) groups; each covers every length."""
    groups = [(seed, method, task, cfg.chunk_size, train) for seed in cfg.seeds for method in cfg.methods
              for train in train_chunk_sizes(cfg, method) for task in cfg.tasks]
    groups += [(seed, method, task, None, train) for seed in cfg.seeds for method in cfg.unchunked_methods
               for train in train_chunk_sizes(cfg, method) for task in cfg.tasks if cfg.chunk_size is not None]
    return groups


def plan(cfg: SweepConfig, base_id: str) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """Every group of the grid with its cells ({length, cell_id, identity})."""
    out = []
    for group in grid(cfg):
        cells = []
        for length in cfg.lengths:
            inputs = cell_inputs(cfg, base_id, group, length)
            cells.append({"length": length, "cell_id": cell_identity(inputs), "identity": inputs})
        out.append((group, cells))
    return out


def group_job(cfg: SweepConfig, group: tuple, cells: list[dict[str, Any]], out: Path, base_id: str,
         log: Path) -> dict[str, Any]:
    seed, method, task, chunk, train_chunk = group
    train = training_settings(cfg, method, task, seed, train_chunk)
    adapter = adapter_dir(cfg, method, task, seed, out, base_id, train_chunk) / "adapter" if train else None
    if train:
        train["out"] = str(adapter.parent)
    return {"config": asdict(cfg), "method": method, "task": task, "seed": seed, "chunk_size": chunk,
            "train_chunk_size": train_chunk, "cells": cells,
            "limits": {"cell": cfg.cell_timeout_s, "train": cfg.train_timeout_s}, "train": train,
            "adapter": str(adapter) if adapter else None, "out": str(out),
            "tasks_dir": str(task_dir()), "git_commit": git_commit(), "log": str(log)}


def log_path(out: Path, group: tuple, cells: list[dict[str, Any]]) -> Path:
    """OUT/logs/<method>[-trainchunk<T>]-<task>-<chunk>-seed<S>-<hash of the group's cells>.log (appended
    per attempt)."""
    seed, method, task, chunk, train_chunk = group
    tag = cell_identity({"cells": [c["cell_id"] for c in cells]})[:10]
    trained = f"-trainchunk{train_chunk}" if train_chunk else ""
    return out / "logs" / f"{method}{trained}-{task}-{f'chunk{chunk}' if chunk else 'unchunked'}-seed{seed}-{tag}.log"


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
        base_id = base_identity(cfg.base)
        groups = plan(cfg, base_id)
        done, retried = _current_table(cfg, out, {c["cell_id"] for _, cells in groups for c in cells}, retry_failed)
        jobs = _missing_jobs(cfg, out, base_id, groups, done)
        if engine is None:
            _run_locally(jobs, sum(len(cells) for _, cells in groups), len(done), progress, settings.workers)
        else:
            tags = {group_tag(Path(job["log"])): job for _, job in jobs}
            again = {tag for tag, job in tags.items() if any(c["cell_id"] in retried for c in job["cells"])}
            dispatch(tags, engine, settings, out, progress, retried=again)
        write_csv(out / "results.jsonl", out / "results.csv")
    return out


def _missing_jobs(cfg: SweepConfig, out: Path, base_id: str, groups: list,
                  done: set[str]) -> list[tuple[tuple, dict[str, Any]]]:
    """(group, job of its cells without a row) for each group with such cells."""
    jobs = []
    for group, cells in groups:
        missing = [c for c in cells if c["cell_id"] not in done]
        if missing:
            jobs.append((group, group_job(cfg, group, missing, out, base_id, log_path(out, group, cells))))
    return jobs


def _run_locally(jobs: list[tuple[tuple, dict[str, Any]]], total: int, done: int, progress: bool,
                 workers: int = 1) -> None:
    from tqdm import tqdm  # deferred: a progress bar only the local executor draws

    bar = tqdm(total=total, desc="sweep cells", disable=not progress, initial=done)
    labelled = [(f"{group[1]} {group[2]}" + ("" if group[3] else " unchunked")
                 + (f" trained chunk {group[4]}" if group[4] else ""), job) for group, job in jobs]
    run_local_groups(labelled, workers, bar)
    bar.close()


def sweep_status(cfg: SweepConfig, out: Path, executor: str | None = None) -> list[dict[str, Any]]:
    """Per (method, task): cells done / running / queued / failed (`cluster.status_rows`)."""
    settings = parse_executor(cfg.executor, executor)
    out = Path(out) if settings.kind == "local" else Path(out).resolve()
    base_id = base_identity(cfg.base)
    jobs = {}
    for group, cells in plan(cfg, base_id):
        job = group_job(cfg, group, cells, out, base_id, log_path(out, group, cells))
        jobs[group_tag(Path(job["log"]))] = job
    return status_rows(jobs, settings if settings.kind != "local" else None, out)


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
