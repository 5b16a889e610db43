"""Per-request measurements of the `ssmlora` lm-eval model and their per-length aggregates.

Time and peak memory: `longctx.engine.measure.TimedRegion`, the one timed region. The runner
queues GPU kernels without waiting for them (no synchronisation per chunk), so the region waits for
the device at its start (the previous request's work is not this one's) and again before its clock
stops: its seconds end once the device has finished the request's work. The allocator's figures
need no wait (it counts on the host).

Memory: CUDA — the allocator's peak since the request began; CPU — the process's peak resident
set since the request began (`/proc/self/clear_refs` resets it, so one request's peak is
separable from the next; without it, `ru_maxrss`, which only rises, is reported and marked).

A request is `ok` (run and measured) or `refused` (its length is over the position limit: not
run, scored NaN). Each record names the process (rank) that ran it; under `accelerate launch`
rank 0 receives every process's records (`longctx.lmeval.parallel.sync_log`), so the per-length
aggregates cover the whole run and `requests_by_rank` shows how the work was split.
"""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from longctx.engine.measure import TimedRegion


@dataclass
class RequestRecord:
    label: Any  # the requested length (the doc's `max_length`), or None
    input_tokens: int  # tokens fed to the model
    chunks: int
    truncated_tokens: int
    peak_bytes: int = 0
    delta_bytes: int = 0
    seconds: float = 0.0
    request_tokens: int = 0  # the whole request: prompt + answer, or prompt + generation budget
    status: str = "ok"  # ok | refused
    rank: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.input_tokens / self.seconds if self.seconds > 0 else 0.0


class RequestLog:
    """Records one `RequestRecord` per request; `per_length()` aggregates them."""

    def __init__(self, device: torch.device, rank: int = 0) -> None:
        self.device, self.rank, self.records, self.memory_method = device, rank, [], ""
        self.synced = 0  # records[:synced] have been through a gather already

    @contextlib.contextmanager
    def request(self, label: Any, input_tokens: int, chunks: int, truncated: int,
                request_tokens: int | None = None) -> Iterator[RequestRecord]:
        """Time and measure one request's work (the `with` body); its record is kept once it ends."""
        record = RequestRecord(label, input_tokens, chunks, truncated, rank=self.rank,
                               request_tokens=input_tokens if request_tokens is None else request_tokens)
        with TimedRegion(self.device) as region:  # waits for the device before its clock stops
            yield record
        record.seconds, record.peak_bytes, record.delta_bytes = region.seconds, region.peak_bytes, region.delta_bytes
        self.memory_method = region.method
        self.records.append(record)

    def refuse(self, label: Any, request_tokens: int) -> None:
        """Record a request that was not run because it does not fit the position limit."""
        self.records.append(RequestRecord(label, 0, 0, 0, request_tokens=request_tokens, status="refused",
                                          rank=self.rank))

    def per_length(self) -> dict[str, dict[str, Any]]:
        """{length: aggregates}; requests without a length label are grouped by input size."""
        groups: dict[str, list[RequestRecord]] = {}
        for r in self.records:
            size = r.input_tokens or r.request_tokens
            key = str(r.label) if r.label is not None else f"~{1 << max(size - 1, 1).bit_length()}"
            groups.setdefault(key, []).append(r)
        return {key: _aggregate(rs) for key, rs in sorted(groups.items(), key=lambda kv: _order(kv[0]))}


def _order(key: str) -> float:
    try:
        return float(key.lstrip("~"))
    except ValueError:
        return float("inf")


def _aggregate(records: list[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.status == "ok"]
    refused = len(records) - len(ok)
    by_rank: dict[str, int] = {}
    for r in records:
        by_rank[str(r.rank)] = by_rank.get(str(r.rank), 0) + 1
    head = {"status": "ok" if not refused else "refused" if not ok else "partial", "requests": len(records),
            "refused": refused, "requests_by_rank": dict(sorted(by_rank.items(), key=lambda kv: int(kv[0]))),
            "max_request_tokens": max(r.request_tokens for r in records)}
    if not ok:
        return head
    seconds = sum(r.seconds for r in ok)
    tokens = sum(r.input_tokens for r in ok)
    return {**head,
            "mean_input_tokens": round(statistics.fmean(r.input_tokens for r in ok), 1),
            "max_input_tokens": max(r.input_tokens for r in ok),
            "chunks": max(r.chunks for r in ok),
            "truncated_tokens": sum(r.truncated_tokens for r in ok),
            "peak_memory_bytes": max(r.peak_bytes for r in ok),
            "peak_memory_delta_bytes": max(r.delta_bytes for r in ok),
            "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None}
