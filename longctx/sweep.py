"""`longctx sweep CONFIG` (design §8): methods × tasks × lengths × seeds, resumable.

A cell is one (method, task, seed, chunk size, training chunk size, length); its identity (`cell_inputs`, hashed by
`results.cell_identity`) is everything that changes its result: the base's name and a
fingerprint of its files, the method's recipe with overrides, the training settings (none for
`base`), the task with its metadata, and the evaluation settings (chunk size, carry mode,
truncation, dtype). A rerun evaluates exactly the cells whose id has no row, moves rows of cells
the config no longer has to `results.archive.jsonl`, and repeats nothing else; `retry_failed`
also reruns error/oom/timeout cells.

Per (seed, method, task, chunk size, training chunk size) a child process (`longctx.sweep_cell`)
trains the adapter unless cached — under `OUT/adapters/<method>-<task>-<adapter_key>`, keyed by
the training settings — and a fresh one (whose memory figures training cannot inflate) evaluates
its missing cells, appending a row per cell. Its whole output is kept
in `OUT/logs/` and named in the rows. The driver enforces `cell_timeout_s` (each cell) and
`train_timeout_s` (training) by killing the child, and records a child that dies (out of memory
included) against the cell in flight; the other cells still run. One sweep per directory at a
time (a lock file); a second one is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from longctx.errors import LongctxError, choice_error, positive_int
from longctx.fetch import ESSAYS, require
from longctx.gguf_bases import REAL_BASES
from longctx.models import parse_rope_scaling
from longctx.tasks import HAYSTACKS, haystack_for
from longctx.resources import task_dir
from longctx.results import FAILED, archive_rows, cell_identity, read_rows, repair, row_id, write_csv

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ("methods", "tasks", "lengths")
IDENTITY_VERSION = 1  # bump when the identity's definition changes (every cell then reruns)
FULL_HASH_BYTES = 256 << 20  # base files up to this size are hashed whole; larger ones sampled
BASE_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".gguf")


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
    chunk_size: int | None = None
    # Chunked training (`longctx.chunked_training`): a size (or null: whole sequences) for every
    # method, or per method a size, null, or a list of them (each one a separately trained series).
    train_chunk_size: int | None | dict[str, Any] = None
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
    cfg = SweepConfig(**values)
    for key in REQUIRED + ("seeds",):
        if not isinstance(getattr(cfg, key), list) or not getattr(cfg, key):
            raise LongctxError(f"{key} in {source} must be a non-empty list, got {getattr(cfg, key)!r}")
    _check_names(cfg)
    _check_settings(cfg)
    return cfg


def _check_names(cfg: SweepConfig) -> None:
    from longctx.adapters import ADAPTERS, load_recipe
    from longctx.tasks import TASKS

    for method in cfg.methods + list(cfg.unchunked_methods):
        if method not in ADAPTERS:
            raise choice_error("method", method, ADAPTERS)
    for task in cfg.tasks:
        if task not in TASKS:
            raise choice_error("task", task, TASKS)
    if cfg.base in REAL_BASES:  # fetched before anything runs, or one line saying how
        require(REAL_BASES[cfg.base][0].name)
    if not isinstance(cfg.recipe_overrides, dict):
        raise LongctxError(f"recipe_overrides must map methods to recipe fields, got {cfg.recipe_overrides!r}")
    for method, overrides in cfg.recipe_overrides.items():
        if method not in cfg.methods + list(cfg.unchunked_methods):
            raise choice_error("method in recipe_overrides", method, dict.fromkeys(cfg.methods + cfg.unchunked_methods))
        if not isinstance(overrides, dict):
            raise LongctxError(f"recipe_overrides[{method!r}] must map recipe fields to values, got {overrides!r}")
        load_recipe(method, overrides)  # unknown fields and bad values: one line


def _check_settings(cfg: SweepConfig) -> None:
    from longctx.lmeval_model import TRUNCATION_CHOICES
    from longctx.models import parse_dtype, parse_rope_scaling
    from longctx.runner import CARRY_CHOICES
    from longctx.tasks import _check_depths, check_length_value

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
    parse_dtype(cfg.dtype)
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
    from longctx.executors import parse_executor

    parse_executor(cfg.executor)  # unknown keys and bad values: one line
    for key in ("learning_rate", "cell_timeout_s", "train_timeout_s"):
        value = getattr(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise LongctxError(f"{key} must be a positive number, got {value!r}")


def _check_haystacks(cfg: SweepConfig) -> None:
    """Known names (and tasks, for a mapping); a fetched haystack must be in the cache before anything runs."""
    if isinstance(cfg.haystack, dict):
        for task in cfg.haystack:
            if task not in cfg.tasks:
                raise choice_error("task in haystack", task, cfg.tasks)
    elif cfg.haystack is not None and not isinstance(cfg.haystack, str):
        raise LongctxError(f"haystack must be a name or a {{task: name}} mapping, got {cfg.haystack!r}")
    for task in cfg.tasks:
        name = haystack_for(cfg.haystack, task)
        if name is not None and name not in HAYSTACKS:
            raise choice_error("haystack", name, HAYSTACKS)
        if name == "paul-graham":
            require(ESSAYS.name)


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


def base_identity(base: str) -> str:
    """Fingerprint of the base's files, computed once per sweep without loading the model: its
    config, tokenizer and weight files (names, sizes, contents — sampled blocks of files over
    256 MiB). A GGUF base (a real base's name, a .gguf file) is its file's sha256. A hub id is read
    from the local HF cache; one not cached is identified by name."""
    from longctx.gguf_bases import gguf_sha256, is_gguf
    from longctx.models import resolve_base

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


def train_chunk_sizes(cfg: SweepConfig, method: str) -> list[int | None]:
    """The training chunk sizes `method` is trained with, one series each (`[None]` for `base`)."""
    value = cfg.train_chunk_size
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(cfg.methods) - set(cfg.unchunked_methods))
        if unknown:
            raise choice_error("method in train_chunk_size", unknown[0], dict.fromkeys(cfg.methods))
        value = value.get(method)
    sizes = list(dict.fromkeys(value if isinstance(value, list) else [value]))
    return [None] if method == "base" or not sizes else sizes


def training_settings(cfg: SweepConfig, method: str, task: str, seed: int,
                      train_chunk: int | None = None) -> dict[str, Any] | None:
    """The `TrainConfig` fields the sweep trains this adapter with, less its directory (None for `base`).
    A whole-sequence run leaves `chunk_size` out, so identities from before it existed still hold."""
    from longctx.train import TrainConfig

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
    from longctx.adapters import load_recipe

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
            "limits": {"cell": cfg.cell_timeout_s, "train": cfg.train_timeout_s}, "train": train, "adapter": str(adapter) if adapter else None, "out": str(out),
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


def _current_table(cfg: SweepConfig, out: Path, current: set[str], retry_failed: bool) -> set[str]:
    """Archive rows of cells not in this config (and failed ones, when retrying); the ids done."""
    results = out / "results.jsonl"
    repair(results)
    rows = read_rows(results)
    other = sorted({str(r.get("base")) for r in rows} - {cfg.base})
    if other:  # one directory, one base: a wrong --out must not archive another base's table
        raise LongctxError(f"{str(out)!r} holds results on base {other[0]!r}, but the config names base "
                           f"{cfg.base!r}; give another output directory")
    archive_rows(results, {row_id(r) for r in rows} - current, "not in the current config")
    if retry_failed:
        archive_rows(results, {row_id(r) for r in rows if r.get("status") in FAILED}, "retried (--retry-failed)")
    return {row_id(r) for r in read_rows(results)}


def run_sweep(cfg: SweepConfig, out: Path, progress: bool = True, retry_failed: bool = False,
              executor: str | None = None) -> Path:
    """Run every cell without a current row; returns the results directory. `executor` (else the
    config's `executor.kind`, else `local`): where the cell groups run (`longctx.executors`)."""
    from longctx.executors import parse_executor

    engine = parse_executor(cfg.executor, executor)
    out = Path(out) if engine.kind == "local" else Path(out).resolve()  # workers elsewhere need whole paths
    _check_output(out)
    with _lock(out):
        base_id = base_identity(cfg.base)
        groups = plan(cfg, base_id)
        done = _current_table(cfg, out, {c["cell_id"] for _, cells in groups for c in cells}, retry_failed)
        if engine.kind == "local":
            _run_locally(cfg, out, base_id, groups, done, progress, engine.workers)
        else:
            from longctx.cluster import dispatch, group_tag

            jobs = {}
            for group, cells in groups:
                missing = [c for c in cells if c["cell_id"] not in done]
                if missing:
                    job = group_job(cfg, group, missing, out, base_id, log_path(out, group, cells))
                    jobs[group_tag(Path(job["log"]))] = job
            dispatch(jobs, engine, out, progress)
        write_csv(out / "results.jsonl", out / "results.csv")
    return out


def _run_locally(cfg: SweepConfig, out: Path, base_id: str, groups: list, done: set[str], progress: bool,
                 workers: int = 1) -> None:
    from tqdm import tqdm

    from longctx.executors import run_local_groups

    bar = tqdm(total=sum(len(cells) for _, cells in groups), desc="sweep cells", disable=not progress,
               initial=sum(c["cell_id"] in done for _, cells in groups for c in cells))
    jobs = []
    for group, cells in groups:
        missing = [c for c in cells if c["cell_id"] not in done]
        if missing:
            label = (f"{group[1]} {group[2]}" + ("" if group[3] else " unchunked")
                     + (f" trained chunk {group[4]}" if group[4] else ""))
            jobs.append((label, group_job(cfg, group, missing, out, base_id, log_path(out, group, cells))))
    run_local_groups(jobs, workers, bar)
    bar.close()
