"""Peak memory of a region is measured, and reset between regions."""
from __future__ import annotations

import pytest
import torch

from longctx.engine import measure as memory
from longctx.engine.measure import PeakMemory, current_rss_bytes

MiB = 2**20


def touch_300_mib() -> None:
    """Allocate a ~300 MiB tensor and write every page, so it is resident, then free it."""
    block = torch.ones(300 * MiB // 4)  # float32: 300 MiB, every element written
    assert block[-1].item() == 1.0
    del block


def test_a_region_that_allocates_shows_it() -> None:
    with PeakMemory("cpu") as big:
        touch_300_mib()
    assert big.method in ("proc_vmhwm", "ru_maxrss")
    assert big.delta_bytes >= 250 * MiB, vars(big)
    assert big.peak_bytes >= big.baseline_bytes > 0


def test_the_next_region_starts_from_a_reset_peak() -> None:
    with PeakMemory("cpu") as big:
        touch_300_mib()  # the process's high-water mark is now ≥ 300 MiB above what follows
    if not big.resettable:
        pytest.skip(f"/proc/self/clear_refs is not writable here (method {big.method}): "
                    "the peak only rises, so a reset cannot be checked")
    with PeakMemory("cpu") as small:
        torch.ones(1024).sum()
    assert small.method == "proc_vmhwm" and small.resettable
    assert small.delta_bytes < 50 * MiB, vars(small)
    assert small.peak_bytes < big.peak_bytes - 200 * MiB, (vars(big), vars(small))


def test_without_clear_refs_the_fallback_says_it_cannot_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_reset_cpu_peak", lambda: False)
    with PeakMemory("cpu") as pm:
        touch_300_mib()
    assert pm.method == "ru_maxrss" and pm.resettable is False
    assert pm.peak_bytes >= 250 * MiB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_region_uses_the_allocator_peak() -> None:
    with PeakMemory("cuda") as big:
        block = torch.ones(64 * MiB // 4, device="cuda")
        del block
    with PeakMemory("cuda") as small:
        torch.ones(16, device="cuda").sum()
    assert big.method == "cuda_allocator" and big.delta_bytes >= 64 * MiB
    assert small.delta_bytes < 1 * MiB and small.reserved_bytes is not None


def test_current_rss_is_positive() -> None:
    assert current_rss_bytes() > 10 * MiB


def test_timed_region_waits_for_the_device_then_clocks_and_reports_the_peak(monkeypatch):
    """The one timed region: wait, clock, …, wait, clock — so the seconds hold every queued kernel —
    and the region's own peak (a 64 MiB tensor made inside it shows in delta_bytes)."""
    events = []
    ticks = iter(range(100))
    monkeypatch.setattr(memory, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(memory, "clock", lambda: events.append("clock") or float(next(ticks)))
    with memory.TimedRegion("cpu") as region:
        block = torch.ones(16 << 20)  # 64 MiB, touched
        events.append("work")
    assert events == ["sync", "clock", "work", "sync", "clock"]
    assert region.seconds == 1.0 and region.method in ("proc_vmhwm", "ru_maxrss")
    if region.method == "proc_vmhwm":
        assert region.delta_bytes >= 48 << 20 and region.peak_bytes >= region.delta_bytes
    assert region.reserved_bytes is None and block.sum() > 0
