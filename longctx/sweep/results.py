"""The sweep's results table (design §8): one row per cell, appended to `results.jsonl` as one whole
line per write (a crash can tear at most the last line, which the reader drops), and
`results.csv` rewritten atomically from it.

A cell is identified by `cell_id`, a hash of everything that changes its result (`identity`,
stored in the row; `longctx.core.identity.cell_inputs` defines it, `cell_identity` hashes it). `results.jsonl` holds the current sweep's cells only:
rows of cells the current config no longer has, and failed rows about to be retried, are moved
to `results.archive.jsonl` (kept, never read as results).
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from longctx.core.errors import LongctxError
from longctx.core.fileio import atomic_write_text
from longctx.core.identity import cell_identity

# peak_memory_bytes: the process's peak during the cell's requests (weights included); request_memory_bytes:
# a request's own, its peak above what was resident before it (the largest of the cell's requests).
# haystack: the needle tasks' filler (None: a task without one, or a failed cell); haystack_repeated: some
# example of the length had more filler than the haystack holds, so text the model had read came again.
COLUMNS = ("method", "base", "task", "length", "seed", "n", "acc", "stderr", "answer_nll", "peak_memory_bytes",
           "request_memory_bytes", "tokens_per_s", "trainable_parameters", "total_parameters", "chunk_size", "train_length",
           "train_chunk_size", "status", "message", "depth_acc", "haystack", "haystack_repeated", "lm_eval_output",
           "log", "git_commit", "time", "cell_id", "identity")
STATUSES = ("ok", "oom", "error", "timeout")
FAILED = ("oom", "error", "timeout")  # what `--retry-failed` reruns
ARCHIVE = "results.archive.jsonl"
OOM_TEXT = ("out of memory", "outofmemoryerror", "memoryerror", "can't allocate memory", "cannot allocate memory")


def _size(value: Any) -> int | None:
    """A chunk size read back from JSON or CSV: None for missing/NaN, else an int."""
    return None if value is None or (isinstance(value, float) and value != value) else int(value)


def cell_key(row: dict[str, Any]) -> tuple:
    """(method, task, length, seed, chunk_size, train_chunk_size): a cell's place in the grid (not its
    identity)."""
    return (row["method"], row["task"], int(row["length"]), int(row.get("seed", 0)), _size(row.get("chunk_size")),
            _size(row.get("train_chunk_size")))


def series_label(row: dict[str, Any]) -> str:
    """What a plot or table calls the row's adapter: the method, plus how it was trained when chunked."""
    train_chunk = _size(row.get("train_chunk_size"))
    return row["method"] if train_chunk is None else f"{row['method']} (trained in chunks of {train_chunk})"


def row_id(row: dict[str, Any]) -> str:
    """The row's cell id; rows written before identities existed get one that matches no cell."""
    return row.get("cell_id") or "legacy-" + cell_identity({"key": list(cell_key(row))})


def is_oom(text: str) -> bool:
    """Whether a failure message reads as out-of-memory (CUDA OOM, CPU MemoryError, allocator)."""
    low = text.lower()
    return any(marker in low for marker in OOM_TEXT)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row as a single write of one line, flushed to disk."""
    _append_lines(path, [{c: row.get(c) for c in COLUMNS}])


def _append_lines(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows).encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a results.jsonl, one per cell (the latest); a torn last line is dropped."""
    rows: dict[str, dict[str, Any]] = {}
    if not Path(path).is_file():
        return []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and all(k in row for k in ("method", "task", "length")):
            rows.pop(row_id(row), None)
            rows[row_id(row)] = row
    return list(rows.values())


def repair(path: Path) -> None:
    """Rewrite results.jsonl without a torn last line, so appends start on a fresh line."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    if text and not text.endswith("\n"):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_rows(path)))


def archive_rows(path: Path, ids: set[str], reason: str) -> int:
    """Move the rows whose cell id is in `ids` from `path` to the archive beside it; how many.

    The archive is appended first, then `path` is rewritten atomically: a crash in between can
    duplicate archived rows, never lose one."""
    rows = read_rows(path)
    moving = [r for r in rows if row_id(r) in ids]
    if not moving:
        return 0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    _append_lines(Path(path).parent / ARCHIVE, [{**r, "archived": stamp, "archive_reason": reason} for r in moving])
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if row_id(r) not in ids))
    return len(moving)


def write_csv(jsonl: Path, csv_path: Path) -> None:
    """results.csv from results.jsonl (atomic)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in sorted(read_rows(jsonl), key=lambda r: (r["task"], r["method"], r["length"], r.get("seed", 0),
                                                      r.get("chunk_size") is None)):
        writer.writerow({c: json.dumps(row[c]) if isinstance(row.get(c), dict) else row.get(c) for c in COLUMNS})
    atomic_write_text(csv_path, buffer.getvalue())


def load_table(results_dir: Path) -> Any:
    """The results as a pandas DataFrame (from results.jsonl, else results.csv)."""
    import pandas as pd  # deferred: heavy, and only reading a finished table needs it

    directory = Path(results_dir)
    if (directory / "results.jsonl").is_file():
        frame = pd.DataFrame(read_rows(directory / "results.jsonl"))
    elif (directory / "results.csv").is_file():
        frame = pd.read_csv(directory / "results.csv")
        frame["depth_acc"] = frame["depth_acc"].map(lambda v: json.loads(v) if isinstance(v, str) and v else None)
    else:
        raise LongctxError(f"no results.jsonl or results.csv in {str(directory)!r}")
    if frame.empty:
        raise LongctxError(f"the results table in {str(directory)!r} has no rows")
    return frame
