"""`accelerate launch -m lm_eval --model ssmlora …`: one process per device, requests split.

lm-eval's HF class sets up data parallelism only when it loads the model itself; `ssmlora` builds
the model first (base + adapter) and hands the object over, which lm-eval takes to mean "one
process". So `ssmlora` sets up accelerate's state here: under a launcher with WORLD_SIZE > 1 it
creates the `Accelerator` before the model is loaded, puts the model on this process's device
(CPU: every process on the CPU; CUDA: cuda:LOCAL_RANK), and gives lm-eval the rank, world size and
accelerator that its evaluator shards documents by (`build_all_requests(rank, world_size)`) and
gathers results with (`all_gather`, `gather_object`).

Evidence of the split: every request record names its process; after each request type rank 0
gathers the records (`sync_log`), so `config.longctx.per_length[L].requests_by_rank` in the
results says how many requests each process ran, and each process logs one line of its count.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch

from longctx.core.errors import LongctxError
from longctx.engine.bases import resolve_device
from longctx.lmeval import harness

LOGGER = logging.getLogger(harness.MODEL_LOGGER)


def launched_processes() -> int:
    """Processes started by `accelerate launch` / torchrun (WORLD_SIZE), 1 when run directly."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
    except ValueError:
        return 1


def setup(requested: str | None) -> tuple[Any | None, torch.device]:
    """(accelerator, this process's device); the accelerator is None in a single process.

    `requested`: the device the user asked for, or None (CUDA if present). A CUDA device that is
    not there is refused (`resolve_device`); under several processes a CUDA request means
    cuda:LOCAL_RANK for each, and `cpu` (or no CUDA) puts every process on the CPU (gloo).
    Launchers: `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`
    (accelerate's `--cpu` launcher starts one process unless given an MPI hostfile).
    """
    device = resolve_device(requested)
    if launched_processes() <= 1:
        return None, device
    from accelerate import Accelerator, InitProcessGroupKwargs  # deferred: only under a launcher, takes a second

    # cpu=True also when the CPU is all there is: without it accelerate ignores WORLD_SIZE on a CPU
    accelerator = Accelerator(cpu=device.type == "cpu",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
    if device.type == "cuda" and accelerator.device.type != "cuda":
        raise LongctxError(f"device {requested!r} asked for, but accelerate runs these processes on the CPU "
                           f"(accelerate launch --cpu?); leave out --device or launch without --cpu")
    if requested is not None and device.index is not None and accelerator.device != device:
        LOGGER.info("process %d: device %s -> %s (one device per process)", accelerator.process_index,
                    requested, accelerator.device)
    return accelerator, accelerator.device


def adopt(lm: Any, accelerator: Any | None) -> None:
    """Give an `SsmloraLM` (after HFLM's constructor) the launcher's rank, world size and accelerator."""
    if accelerator is None:
        return
    harness.adopt_processes(lm, accelerator)
    lm.log.rank = accelerator.process_index


def unique_requests(requests: list[Any]) -> tuple[list[Any], list[int]]:
    """(distinct request objects, index of each request among them). lm-eval pads a shorter shard
    with copies of its last request object (and repeats an object `repeats` times); each distinct
    object runs once, so padding costs nothing and is not counted as work."""
    first: dict[int, int] = {}
    unique, where = [], []
    for request in requests:
        if id(request) not in first:
            first[id(request)] = len(unique)
            unique.append(request)
        where.append(first[id(request)])
    return unique, where


def sync_log(lm: Any, kind: str) -> None:
    """After one request type, on every process (a collective, where lm-eval has its own barrier):
    log this process's count, send its new records to rank 0, and there warn of refused lengths."""
    log = lm.log
    new = log.records[log.synced:]
    LOGGER.info("longctx: process %d of %d ran %d %s requests on %s", lm.rank, lm.world_size,
                sum(r.status == "ok" for r in new), kind, lm.device)
    if lm.world_size > 1:
        gathered = lm.gather_object(new, dst=0)
        if lm.rank == 0:
            log.records.extend(r for part in gathered[1:] for r in part)
    log.synced = len(log.records)
    if lm.rank == 0:
        warn_refused(lm)


def warn_refused(lm: Any) -> None:
    """One warning line per refused length (rank 0, once per run)."""
    warned = lm.__dict__.setdefault("_warned_lengths", set())
    for length, agg in lm.log.per_length().items():
        if agg["refused"] and length not in warned:
            warned.add(length)
            LOGGER.warning(
                "longctx: length %s refused (%d of %d requests): requests of up to %d tokens do not fit the "
                "limit of %s tokens (max_length, by default max_position_embeddings); they score NaN under "
                "'%s' and the other lengths are evaluated; remedies: rope_scaling in model_args, a model with "
                "a longer context, or truncation=left|middle", length, agg["refused"], agg["requests"],
                agg["max_request_tokens"], lm.position_limit, length)
