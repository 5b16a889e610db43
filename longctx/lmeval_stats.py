"""Per-request measurements of the `ssmlora` lm-eval model and their per-length aggregates.

Memory: CUDA — the allocator's peak since the request began; CPU — the process's peak resident
set since the request began (`/proc/self/clear_refs` resets it, so one request's peak is
separable from the next; without it, `ru_maxrss`, which only rises, is reported and marked).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from longctx.memory import PeakMemory


@dataclass
class RequestRecord:
    label: Any  # the requested length (the doc's `max_length`), or None
    input_tokens: int
    chunks: int
    truncated_tokens: int
    peak_bytes: int = 0
    delta_bytes: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.input_tokens / self.seconds if self.seconds > 0 else 0.0


class RequestLog:
    """Records one `RequestRecord` per request; `per_length()` aggregates them."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.records, self.memory_method = device, [], ""

    @contextlib.contextmanager
    def request(self, label: Any, input_tokens: int, chunks: int, truncated: int) -> Iterator[RequestRecord]:
        record = RequestRecord(label, input_tokens, chunks, truncated)
        with PeakMemory(self.device) as peak:
            start = time.perf_counter()
            yield record
            record.seconds = time.perf_counter() - start
        record.peak_bytes, record.delta_bytes = peak.peak_bytes, peak.delta_bytes
        self.memory_method = peak.method
        self.records.append(record)

    def per_length(self) -> dict[str, dict[str, Any]]:
        """{length: aggregates}; requests without a length label are grouped by input size."""
        groups: dict[str, list[RequestRecord]] = {}
        for r in self.records:
            key = str(r.label) if r.label is not None else f"~{1 << max(r.input_tokens - 1, 1).bit_length()}"
            groups.setdefault(key, []).append(r)
        return {key: _aggregate(rs) for key, rs in sorted(groups.items(), key=lambda kv: _order(kv[0]))}


def _order(key: str) -> float:
    try:
        return float(key.lstrip("~"))
    except ValueError:
        return float("inf")


def _aggregate(records: list[RequestRecord]) -> dict[str, Any]:
    seconds = sum(r.seconds for r in records)
    tokens = sum(r.input_tokens for r in records)
    return {"requests": len(records),
            "mean_input_tokens": round(statistics.fmean(r.input_tokens for r in records), 1),
            "max_input_tokens": max(r.input_tokens for r in records),
            "chunks": max(r.chunks for r in records),
            "truncated_tokens": sum(r.truncated_tokens for r in records),
            "peak_memory_bytes": max(r.peak_bytes for r in records),
            "peak_memory_delta_bytes": max(r.delta_bytes for r in records),
            "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None}
