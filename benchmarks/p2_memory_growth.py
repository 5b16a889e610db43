"""P2: peak-memory growth of a chunked run from 1K to 32K tokens vs the KV-cache floor's growth.

Each length runs in its own child process (clean peak figures). The floor's growth is the KV
cache's size difference between the two lengths; target: measured growth ≤ 1.1× that.
Usage: python benchmarks/p2_memory_growth.py [--lengths 1024 32768] [--chunk-size 1024]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_llama, kv_cache_bytes  # noqa: E402

TARGET = 1.1


def child(length: int, chunk_size: int, method: str, device: str, layers: int, hidden: int, attn: str) -> dict:
    from longctx.adapters import wrap
    from longctx.engine.measure import PeakMemory
    from longctx.engine.runner import chunked_forward

    model = bench_llama(layers=layers, hidden=hidden, device=device, attn=attn)
    adapted = wrap(model, method)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with PeakMemory(torch.device(device)) as mem:
        chunked_forward(adapted, ids, chunk_size=chunk_size)
    return {"length": length, "delta_bytes": mem.delta_bytes, "kv_bytes": kv_cache_bytes(model, length),
            "method": mem.method}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs=2, default=[1024, 32768])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--method", default="ssmlora")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="auto", help="auto | longctx_sdpa | sdpa | eager | flash_attention_2")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.chunk_size, args.method, args.device, args.layers, args.hidden, args.attn)))
        return
    runs = []
    for length in args.lengths:
        cmd = [sys.executable, __file__, "--child", str(length), "--chunk-size", str(args.chunk_size),
               "--method", args.method, "--device", args.device, "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--attn", args.attn]
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        r = runs[-1]
        print(f"{args.method} N={length:>6}  chunk={args.chunk_size}  peak delta {r['delta_bytes'] / 2**20:8.1f} MiB"
              f"  KV cache {r['kv_bytes'] / 2**20:8.1f} MiB  ({r['method']})")
    growth = runs[1]["delta_bytes"] - runs[0]["delta_bytes"]
    floor = runs[1]["kv_bytes"] - runs[0]["kv_bytes"]
    ratio = growth / floor
    print(f"P2 growth {growth / 2**20:.1f} MiB vs KV floor growth {floor / 2**20:.1f} MiB: "
          f"ratio {ratio:.3f} (target <= {TARGET}) {'PASS' if ratio <= TARGET else 'MISS'}")


if __name__ == "__main__":
    main()
