"""P4: ssmlora-scan's parallel scan vs the sequential reference loop at 16K tokens, r=8.

Checks the two agree, then prints the speed-up (target ≥ 20×). Also: the run with its plan built
beforehand (what `ssmlora-scan` pays per chunk after the first of a length), and the number of
operations each issues, which on a GPU is the scan's cost rather than its arithmetic.
Usage: python benchmarks/p4_scan.py [--length 16384] [--rank 8] [--batch 1] [--block Q] [--repeats 5]
                                    [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, operations  # noqa: E402

TARGET = 20.0


def main() -> None:
    from longctx.adapters.scan import default_block, linear_scan, linear_scan_ref, plan_scan, run_scan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=None, help="Q (default: the device's, scan.default_block)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(args.batch, args.length, args.rank, generator=gen)
    log_decay = torch.linspace(0.05, 0.9999, args.rank).log()
    block = default_block(args.length, device, args.rank) if args.block is None else args.block
    fast = linear_scan(u.to(device), log_decay.to(device), block=block).cpu()
    ref = linear_scan_ref(u, log_decay)
    error = ((fast - ref).abs().max() / ref.abs().max()).item()
    on_device = u.to(device), log_decay.to(device)
    plan = plan_scan(on_device[1], args.length, block)
    scan, planned = lambda: linear_scan(*on_device, block=block), lambda: run_scan(on_device[0], plan)
    t_fast = best_time(scan, args.repeats)
    t_planned = best_time(planned, args.repeats)
    t_ref = best_time(lambda: linear_scan_ref(u, log_decay), max(1, args.repeats // 2))
    ratio = t_ref / t_fast
    print(f"T={args.length} r={args.rank} B={args.batch} {device.type}: parallel (Q={block}) {t_fast * 1e3:.2f} ms "
          f"({operations(scan)} ops), plan built beforehand {t_planned * 1e3:.2f} ms ({operations(planned)} ops), "
          f"CPU loop {t_ref * 1e3:.1f} ms, max relative difference {error:.1e}")
    print(f"P4 speed-up {ratio:.1f}x (target >= {TARGET:.0f}x) {'PASS' if ratio >= TARGET else 'MISS'}")


if __name__ == "__main__":
    main()
