"""P3: tokens/s with `ssmlora` and `ssmlora-scan` adapters vs the bare base model at 4K tokens.

One process, same input, same chunking; the methods' runs are interleaved round by round (so
drift in machine speed hits all alike) and the best round of each counts. Targets: ≥ 0.85× (ssmlora)
and ≥ 0.8× (ssmlora-scan). Also the operations each method adds per insertion point and chunk:
where the host issues operations slower than the GPU runs them (small models, short chunks), that
count is what the adapter costs.
`--base smollm2-135m` (or any base) measures a real checkpoint instead of the random benchmark model.
Usage: python benchmarks/p3_adapter_throughput.py [--length 4096] [--chunk-size 4096] [--base NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_llama, best_time, operations  # noqa: E402

TARGETS = {"ssmlora": 0.85, "ssmlora-scan": 0.80}


def main() -> None:
    from longctx.adapters import wrap
    from longctx.engine.bases import load_base
    from longctx.engine.runner import chunked_forward

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--base", default=None, help="a real base (e.g. smollm2-135m) instead of the random model")
    args = parser.parse_args()
    ids = torch.randint(0, 32000, (1, args.length), generator=torch.Generator().manual_seed(0)).to(args.device)

    def model() -> torch.nn.Module:
        if args.base:
            return load_base(args.base, device=args.device)[0]
        return bench_llama(layers=args.layers, hidden=args.hidden, device=args.device)

    models = {m: wrap(model(), m) for m in ("base", "ssmlora", "ssmlora-scan")}
    if args.base:
        print(f"base {args.base}: {len(models['ssmlora'].insertion_points)} insertion points, chunk {args.chunk_size}")
    best = {m: float("inf") for m in models}
    for _ in range(args.repeats):
        for method, adapted in models.items():
            seconds = best_time(lambda: chunked_forward(adapted, ids, chunk_size=args.chunk_size), 1)
            best[method] = min(best[method], seconds)
    speed = {m: args.length / s for m, s in best.items()}
    for method, seconds in best.items():
        print(f"{method:>13}: {speed[method]:9.0f} tok/s ({seconds:.3f} s for {args.length} tokens)")
    ops = {m: operations(lambda: chunked_forward(a, ids, chunk_size=args.chunk_size)) for m, a in models.items()}
    chunks = -(-args.length // args.chunk_size)
    added = {m: (ops[m] - ops["base"]) / (len(models[m].insertion_points) * chunks) for m in TARGETS}
    print(f"operations per forward: base {ops['base']}; added per insertion point and chunk: "
          + ", ".join(f"{m} {n:.0f}" for m, n in added.items()))
    for method, target in TARGETS.items():
        ratio = speed[method] / speed["base"]
        print(f"P3 {method} / base = {ratio:.3f} (target >= {target}) {'PASS' if ratio >= target else 'MISS'}")


if __name__ == "__main__":
    main()
