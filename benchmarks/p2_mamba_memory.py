"""P2 for Mamba: peak memory of a chunked run from 1K to 32K tokens on a benchmark-sized random
Mamba (32K vocabulary). A Mamba carries a fixed-size conv + SSM state, so the floor does not grow
with the input: the measured growth should be ~0 (only the input ids and kept logits grow).

Each length runs in its own child process (clean peaks). Usage:
python benchmarks/p2_mamba_memory.py [--lengths 1024 8192 32768] [--chunk-size 1024] [--method ssmlora-scan]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch


def child(length: int, chunk_size: int, method: str, layers: int, hidden: int) -> dict:
    from transformers import MambaConfig, MambaForCausalLM

    from longctx.adapters import wrap
    from longctx.engine.measure import TimedRegion
    from longctx.engine.runner import chunked_forward

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
                                         state_size=16, expand=2, conv_kernel=4)).eval()
    adapted = wrap(model, method)
    ids = torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(0))
    with TimedRegion("cpu") as region:
        chunked_forward(adapted, ids, chunk_size=chunk_size)
    return {"delta_bytes": region.delta_bytes, "peak_bytes": region.peak_bytes, "seconds": region.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--method", default="ssmlora-scan")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.chunk_size, args.method, args.layers, args.hidden)))
        return
    runs = {}
    for length in args.lengths:
        cmd = [sys.executable, __file__, "--child", str(length), "--chunk-size", str(args.chunk_size),
               "--method", args.method, "--layers", str(args.layers), "--hidden", str(args.hidden)]
        runs[length] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        r = runs[length]
        print(f"mamba {args.method} N={length:>6} chunk={args.chunk_size}: peak {r['peak_bytes'] / 2**20:7.1f} MiB, "
              f"request's own {r['delta_bytes'] / 2**20:6.1f} MiB, {length / r['seconds']:,.0f} tok/s")
    first, last = runs[args.lengths[0]], runs[args.lengths[-1]]
    growth = (last["delta_bytes"] - first["delta_bytes"]) / 2**20
    print(f"growth {args.lengths[0]} -> {args.lengths[-1]} tokens: {growth:+.1f} MiB "
          f"({last['delta_bytes'] / max(first['delta_bytes'], 1):.2f}x the shortest run's own memory)")


if __name__ == "__main__":
    main()
