"""Peak memory of a region is measured, and reset between regions."""
from __future__ import annotations

import pytest
import torch

from longctx.memory import PeakMemory, current_rss_bytes

MiB = 2**20


def test_a_region_that_allocates_shows_it_and_the_next_region_does_not():
    with PeakMemory("cpu") as big:
        block = torch.ones(300 * MiB // 4)  # touched: 300 MiB resident
        del block
    assert big.delta_bytes >= 250 * MiB, big.__dict__
    assert big.peak_bytes >= big.baseline_bytes > 0
    if not big.resettable:
        pytest.fail(f"peak not resettable here (method {big.method}): /proc/self/clear_refs unwritable")
    with PeakMemory("cpu") as small:
        torch.ones(1024).sum()
    assert small.method == "proc_vmhwm" and small.delta_bytes < 50 * MiB, small.__dict__


def test_current_rss_is_positive():
    assert current_rss_bytes() > 10 * MiB
