"""The protocol of a sweep's cell child, whatever evaluates: run one `GroupPlan` (train, or load
and evaluate each cell), printing a marker line before each phase and appending one row per cell.

`longctx.sweep.cell` runs it with the real training, loading and evaluation; tests run it with
stand-ins. Light to import (no torch, no lm-eval), so a stand-in child starts in a fraction of a
second. The driver's side is `longctx.sweep.supervisor`.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

from longctx.sweep.group import GroupPlan
from longctx.sweep.results import append_row, is_oom
from longctx.sweep.supervisor import MARKER, make_row


def phase(name: str) -> None:
    """Tell the driver (through the log) which phase starts now."""
    print(f"{MARKER}{name} {time.strftime('%Y-%m-%dT%H:%M:%S')}", flush=True)


def failure(err: BaseException, prefix: str = "") -> dict[str, Any]:
    """Row values of a failed cell: `oom` for out-of-memory, else `error`; the traceback goes to the log."""
    traceback.print_exc()
    text = f"{prefix}{type(err).__name__}: {err}".strip().splitlines()[0][:500]
    return {"n": 0, "status": "oom" if is_oom(f"{type(err).__name__}: {err}") else "error", "message": text}




def run(job: GroupPlan, evaluate: Callable[..., dict[str, Any]], load: Callable[[GroupPlan], Any],
        trainer: Callable[[GroupPlan], None]) -> None:
    """Train if needed (and stop there: the next child evaluates), else evaluate every cell of
    the job, one row each."""
    results = Path(job.out) / "results.jsonl"
    if job.train and not (Path(job.adapter) / "adapter_config.json").is_file():
        phase("train")
        try:
            trainer(job)
        except Exception as err:  # every cell of the adapter fails the same way; the sweep goes on
            values = failure(err, "training failed: ")
            for cell in job.cells:
                append_row(results, make_row(job, cell, **values))
            return
        # A fresh child evaluates: on CPU this process's resident memory still holds what training
        # used (freed to the allocator, not the OS), which would inflate every request's peak.
        phase("trained")
        return
    phase("load")
    lm = load(job)
    params = {"trainable_parameters": lm.description["trainable_parameters"],
              "total_parameters": lm.description["total_parameters"]}
    for cell in job.cells:
        phase(f"length={cell['length']}")
        try:
            values = evaluate(lm, job, cell["length"], cell["cell_id"])
        except Exception as err:  # recorded; the next length still runs
            values = failure(err)
            release_memory()
        append_row(results, make_row(job, cell, **params, **values))


def release_memory() -> None:
    """After training or a failure (an OOM above all), give memory back before the next cell."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None, evaluate: Callable[..., dict[str, Any]], load: Callable[[GroupPlan], Any],
         trainer: Callable[[GroupPlan], None]) -> None:
    """Entry point: logging and warnings on (the log is for diagnosis), then `run` the job file
    (`argv[0]`, default the command line's) with these training, loading and evaluation."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("default")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(GroupPlan.from_json(Path(argv[0]).read_text()), evaluate, load, trainer)
    except KeyboardInterrupt:  # Ctrl-C reached this child too: cancelled, not failed
        _die_by_sigint()


def _die_by_sigint() -> None:
    """End the process by SIGINT, which the driver reads as cancelled (its cells left for the next
    run). Python's own exit after an uncaught KeyboardInterrupt is a plain status 1 once a model
    has been loaded, which the driver would record as the cell's error."""
    traceback.print_exc()
    print("interrupted (SIGINT): the cell in flight is left without a row", file=sys.stderr, flush=True)
    sys.stdout.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    raise SystemExit(130)  # only if SIGINT is blocked here
