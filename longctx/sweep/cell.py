"""Child process of `longctx sweep`: for one (method, task, seed, chunk size) it trains the adapter
if it is not cached yet — and exits, so that a fresh child measures the evaluation's memory —
or evaluates the given cells (lengths) through lm-eval in increasing order, appending one
results row per cell as soon as it is measured.

`python -m longctx.sweep.cell JOB.json` (the sweep writes the job next to the log). Its stdout
and stderr are the cell log (warnings and logging on); before each phase it prints a marker line
(`longctx-sweep-cell: begin train|trained|load|length=L`) by which the driver enforces time limits and
knows which cell was in flight. A cell that fails is recorded as `error`, or `oom` for
out-of-memory (CUDA or CPU), and the next cell still runs; a failed training records every cell.
Ctrl-C ends the child by SIGINT, which the driver reads as cancelled: no row for the cell in flight.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from longctx.core.fileio import atomic_write_text
from longctx.sweep.results import append_row, is_oom, read_rows, row_id
from longctx.tasks import haystack_for

MARKER = "longctx-sweep-cell: begin "
CHILD = [sys.executable, "-m", "longctx.sweep.cell"]  # + the job file; tests substitute a stand-in
POLL_S = 0.1


def make_row(job: dict[str, Any], cell: dict[str, Any], **values: Any) -> dict[str, Any]:
    """A results row of `cell` in `job`, with its identity and log (also used by the driver)."""
    cfg = job["config"]
    return {"method": job["method"], "base": cfg["base"], "task": job["task"], "length": cell["length"],
            "seed": job["seed"], "chunk_size": job["chunk_size"], "train_length": cfg["train_length"],
            "train_chunk_size": job.get("train_chunk_size"),
            "git_commit": job["git_commit"], "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "log": job["log"],
            "cell_id": cell["cell_id"], "identity": cell["identity"], **values}


def phase(name: str) -> None:
    """Tell the driver (through the log) which phase starts now."""
    print(f"{MARKER}{name} {time.strftime('%Y-%m-%dT%H:%M:%S')}", flush=True)


def failure(err: BaseException, prefix: str = "") -> dict[str, Any]:
    """Row values of a failed cell: `oom` for out-of-memory, else `error`; the traceback goes to the log."""
    traceback.print_exc()
    text = f"{prefix}{type(err).__name__}: {err}".strip().splitlines()[0][:500]
    return {"n": 0, "status": "oom" if is_oom(f"{type(err).__name__}: {err}") else "error", "message": text}


def evaluate_length(lm: Any, job: dict[str, Any], length: int, cell_id: str) -> dict[str, Any]:
    """One lm-eval run of the task at one length; the row's measured fields. The haystack fields come
    from the evaluated documents' `extra` (samples logged for that, not written out): its name, and
    whether any example's filler outran it and repeated."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg, task = job["config"], f"longctx_{job['task']}"
    metadata = {"max_seq_lengths": [length], "num_samples": cfg["num_samples"], "seed": job["seed"],
                "tokenizer": cfg["base"]}
    if cfg.get("depths") is not None:
        metadata["depths"] = cfg["depths"]
    if haystack_for(cfg.get("haystack"), job["task"]) is not None:
        metadata["haystack"] = haystack_for(cfg["haystack"], job["task"])
    manager = TaskManager(include_path=job["tasks_dir"], include_defaults=False, metadata=metadata)
    results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, random_seed=job["seed"],
                                      log_samples=True)
    metrics = results["results"][task]
    extras = [json.loads(sample["doc"].get("extra") or "{}") for sample in results.pop("samples")[task]]
    haystacks = sorted({e["haystack"] for e in extras if e.get("haystack")})
    chunk = f"chunk{job['chunk_size']}" if job["chunk_size"] else "unchunked"
    out = (Path(job["out"]) / "lm_eval" / job["method"] / job["task"]
           / f"seed{job['seed']}-{chunk}-{length}-{cell_id}.json")
    atomic_write_text(out, json.dumps({"results": results["results"], "config": results["config"]},
                                      indent=2, default=str) + "\n")
    record = lm.log.per_length().get(str(length), {})
    depth = {k.split(",")[0]: v for k, v in metrics.items() if k.startswith("depth_") and "stderr" not in k}
    return {"n": int(results["n-samples"][task]["effective"]), "acc": metrics.get("acc,none"),
            "stderr": _number(metrics.get("acc_stderr,none")), "answer_nll": _number(metrics.get("answer_nll,none")),
            "peak_memory_bytes": record.get("peak_memory_bytes"),
            "request_memory_bytes": record.get("peak_memory_delta_bytes"), "tokens_per_s": record.get("tokens_per_s"),
            "depth_acc": depth or None, "haystack": ",".join(haystacks) or None,
            "haystack_repeated": any(e.get("haystack_repeated", False) for e in extras), "lm_eval_output": str(out),
            **_status(lm, length, record)}


def _status(lm: Any, length: int, record: dict[str, Any]) -> dict[str, str]:
    """`ok`, or `error` naming the limit when the model refused requests of this length (they score NaN)."""
    refused = record.get("refused") or 0
    if not refused and record.get("status") not in ("refused", "partial"):
        return {"status": "ok", "message": ""}
    return {"status": "error", "message": f"length {length} refused ({refused} of {record.get('requests')} "
                                          f"requests): requests of up to {record.get('max_request_tokens')} tokens "
                                          f"do not fit the limit of {getattr(lm, 'position_limit', None)} tokens"}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def load_lm(job: dict[str, Any]) -> Any:
    """The lm-eval model of the job: its trained adapter, or the untrained method (`base`)."""
    from longctx.lmeval.model import SsmloraLM

    cfg = job["config"]
    source = {"adapter": job["adapter"]} if job["adapter"] else {"method": job["method"]}
    return SsmloraLM(pretrained=cfg["base"], chunk_size=job["chunk_size"], ssm_carry=cfg["ssm_carry"],
                     dtype=cfg["dtype"], truncation=cfg["truncation"], seed=job["seed"],
                     rope_scaling=cfg.get("rope_scaling"), **source)


def train(job: dict[str, Any]) -> None:
    """Train the job's adapter into its cache directory (atomic; resumes from checkpoints)."""
    from longctx.training.train import TrainConfig, train_adapter

    train_adapter(TrainConfig(**job["train"]), progress=False)
    _release_memory()


def run(job: dict[str, Any], evaluate: Callable[..., dict[str, Any]] = evaluate_length,
        load: Callable[[dict[str, Any]], Any] = load_lm, trainer: Callable[[dict[str, Any]], None] = train) -> None:
    """Train if needed (and stop there: the next child evaluates), else evaluate every cell of
    the job, one row each."""
    results = Path(job["out"]) / "results.jsonl"
    if job.get("train") and not (Path(job["adapter"]) / "adapter_config.json").is_file():
        phase("train")
        try:
            trainer(job)
        except Exception as err:  # every cell of the adapter fails the same way; the sweep goes on
            values = failure(err, "training failed: ")
            for cell in job["cells"]:
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
    for cell in job["cells"]:
        phase(f"length={cell['length']}")
        try:
            values = evaluate(lm, job, cell["length"], cell["cell_id"])
        except Exception as err:  # recorded; the next length still runs
            values = failure(err)
            _release_memory()
        append_row(results, make_row(job, cell, **params, **values))


def _release_memory() -> None:
    """After training or a failure (an OOM above all), give memory back before the next cell."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None, **stand_ins: Any) -> None:
    """Entry point: logging and warnings on (the log is for diagnosis), then `run` the job file."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("default")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(json.loads(Path(argv[0]).read_text()), **stand_ins)
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


# The driver's side: run a job's child under its time limits, and record what it left undone.

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


def _blamed(outcome: Outcome, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def run_group(job: dict[str, Any], cell_timeout_s: float | None = None, train_timeout_s: float | None = None,
              extra_env: dict[str, str] | None = None) -> None:
    """The driver's side of one job: run children (environment: ours plus `extra_env`) until every
    cell has a row; a child that times out or dies is recorded against the cell in flight (or every
    cell left, outside a length) and a fresh child takes the rest. A child ended by SIGTERM or SIGINT
    was cancelled from outside (`scancel`, preemption, Ctrl-C): its cells are left without rows,
    for the next run or resubmission to do."""
    results, log = Path(job["out"]) / "results.jsonl", Path(job["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    limits = {"cell": cell_timeout_s, "train": train_timeout_s}
    cells = list(job["cells"])
    while cells:
        job_file = log.with_suffix(".job.json")
        atomic_write_text(job_file, json.dumps({**job, "cells": cells}, indent=1, default=str) + "\n")
        outcome = supervise(job_file, log, limits, extra_env)
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


if __name__ == "__main__":
    main()
