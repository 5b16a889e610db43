"""Peak memory of one region of code, separable from the regions before it.

CUDA: the caching allocator's peak, reset at entry (`max_memory_allocated`, and reserved).
CPU (Linux): the kernel's resident high-water mark `VmHWM`, reset at entry by writing "5" to
`/proc/self/clear_refs`. Where that file cannot be written, `ru_maxrss` is read instead, which
only ever rises: `resettable` is then False and the figure may belong to an earlier region.
tracemalloc is no use here: it does not see tensor storage.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import TracebackType

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is unavailable)."""
    return _status_bytes("VmRSS") or 0


def _max_rss_bytes() -> int:
    """The process's lifetime peak resident size (never resets); 0 where unavailable."""
    try:
        import resource  # POSIX only
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


def synchronize(device: torch.device) -> None:
    """Wait until `device` has run everything queued on it (CUDA kernels run asynchronously; the CPU
    has nothing queued). The one place measurements wait for the device, so a caller can count it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_cpu_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_bytes`, `pm.delta_bytes`, `pm.method`.

    peak_bytes: the region's peak (CPU: whole-process resident memory; CUDA: allocated tensors).
    delta_bytes: peak minus what was in use at entry. reserved_bytes: CUDA allocator's reserve.
    CUDA: the device is synchronised at entry and exit, unless `synchronize=False` says the caller
    does so itself (`lmeval_stats.RequestLog`: once per request, before its clock stops).
    """

    def __init__(self, device: torch.device | str = "cpu", synchronize: bool = True) -> None:
        self.device = torch.device(device)
        self.peak_bytes = self.delta_bytes = self.baseline_bytes = 0
        self.reserved_bytes: int | None = None
        self.method, self.resettable, self.synchronize = "", True, synchronize

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            if self.synchronize:
                synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes, self.method = torch.cuda.memory_allocated(self.device), "cuda_allocator"
        elif _reset_cpu_peak():
            self.baseline_bytes, self.method = current_rss_bytes(), "proc_vmhwm"
        else:
            self.resettable, self.method = False, "ru_maxrss"
            self.baseline_bytes = current_rss_bytes()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.method == "cuda_allocator":
            if self.synchronize:
                synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        elif self.method == "proc_vmhwm":
            self.peak_bytes = _status_bytes("VmHWM") or 0
        else:
            self.peak_bytes = _max_rss_bytes()
        self.delta_bytes = max(0, self.peak_bytes - self.baseline_bytes)


clock = time.perf_counter  # the timed region's clock (module-level, so a test can watch it stop)


class TimedRegion:
    """The one timed region of longctx: `with TimedRegion(device) as region: ...`, then
    `region.seconds`, `region.peak_bytes`, `region.delta_bytes`, `region.method`.

    Order at entry: wait for the device, reset the peak, start the clock; at exit: wait for the
    device (its work is queued, not done), stop the clock, read the peak. So the seconds include
    every kernel the region queued, and the waits are outside no other region. Used by the
    `ssmlora` model's per-request stats, `longctx forward` and the benchmarks.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.memory = PeakMemory(self.device, synchronize=False)
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> "TimedRegion":
        synchronize(self.device)
        self.memory.__enter__()
        self._start = clock()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        synchronize(self.device)
        self.seconds = clock() - self._start
        self.memory.__exit__(exc_type, exc, tb)

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def delta_bytes(self) -> int:
        return self.memory.delta_bytes

    @property
    def reserved_bytes(self) -> int | None:
        return self.memory.reserved_bytes

    @property
    def method(self) -> str:
        return self.memory.method
