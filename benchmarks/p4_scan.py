"""P4: ssmlora-scan's parallel scan vs the sequential reference loop at 16K tokens, r=8.

Checks the two agree, then prints the speed-up (target ≥ 20×).
Usage: python benchmarks/p4_scan.py [--length 16384] [--rank 8] [--batch 1] [--block 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time  # noqa: E402

TARGET = 20.0


def main() -> None:
    from longctx.adapters.scan import linear_scan, linear_scan_ref

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(args.batch, args.length, args.rank, generator=gen)
    log_decay = torch.linspace(0.05, 0.9999, args.rank).log()
    fast, ref = linear_scan(u, log_decay, block=args.block), linear_scan_ref(u, log_decay)
    error = ((fast - ref).abs().max() / ref.abs().max()).item()
    t_fast = best_time(lambda: linear_scan(u, log_decay, block=args.block), args.repeats)
    t_ref = best_time(lambda: linear_scan_ref(u, log_decay), max(1, args.repeats // 2))
    ratio = t_ref / t_fast
    print(f"T={args.length} r={args.rank} B={args.batch} block={args.block}: parallel {t_fast * 1e3:.2f} ms, "
          f"loop {t_ref * 1e3:.1f} ms, max relative difference {error:.1e}")
    print(f"P4 speed-up {ratio:.1f}x (target >= {TARGET:.0f}x) {'PASS' if ratio >= TARGET else 'MISS'}")


if __name__ == "__main__":
    main()
