"""The sweep's results table (SPEC §8): one row per (method, task, length, seed) cell, appended to
`results.jsonl` as one whole line per write (a crash can tear at most the last line, which the
reader drops), and `results.csv` rewritten atomically from it."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

COLUMNS = ("method", "base", "task", "length", "seed", "n", "acc", "stderr", "answer_nll", "peak_memory_bytes",
           "tokens_per_s", "trainable_parameters", "total_parameters", "chunk_size", "train_length",
           "status", "message", "depth_acc", "lm_eval_output", "git_commit", "time")
STATUSES = ("ok", "oom", "error")


def cell_key(row: dict[str, Any]) -> tuple:
    """(method, task, length, seed, chunk_size): what identifies a cell of the grid."""
    chunk = row.get("chunk_size")
    chunk = None if chunk is None or (isinstance(chunk, float) and chunk != chunk) else int(chunk)
    return (row["method"], row["task"], int(row["length"]), int(row.get("seed", 0)), chunk)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row as a single write of one line, flushed to disk."""
    line = (json.dumps({c: row.get(c) for c in COLUMNS}, sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a results.jsonl; a torn last line (a crash mid-write) and duplicates are dropped."""
    rows: dict[tuple, dict[str, Any]] = {}
    if not Path(path).is_file():
        return []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and all(k in row for k in ("method", "task", "length")):
            rows.setdefault(cell_key(row), row)
    return list(rows.values())


def repair(path: Path) -> None:
    """Rewrite results.jsonl without a torn last line, so appends start on a fresh line."""
    from longctx.fileio import atomic_write_text

    text = Path(path).read_text() if Path(path).is_file() else ""
    if text and not text.endswith("\n"):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_rows(path)))


def write_csv(jsonl: Path, csv_path: Path) -> None:
    """results.csv from results.jsonl (atomic)."""
    from longctx.fileio import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in sorted(read_rows(jsonl), key=lambda r: (r["task"], r["method"], r["length"], r.get("seed", 0))):
        writer.writerow({c: json.dumps(row[c]) if isinstance(row.get(c), dict) else row.get(c) for c in COLUMNS})
    atomic_write_text(csv_path, buffer.getvalue())


def load_table(results_dir: Path) -> Any:
    """The results as a pandas DataFrame (from results.jsonl, else results.csv)."""
    import pandas as pd

    from longctx.errors import LongctxError

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
