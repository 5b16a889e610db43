"""P6: one training step (forward + backward) of a Mamba on CPU through transformers' per-token
reference scan vs the mambapy parallel scan that `longctx.engine.mamba.use_parallel_scan` selects.

The reference loop indexes one time step per iteration, and each index's backward writes a full
(B, D, T, N) zero-padded gradient, so a step costs O(T²); the parallel scan is O(T log T).
Usage: python benchmarks/p6_mamba_training.py [--batch 8] [--lengths 128 256] [--layers 4] [--hidden 128]
"""
from __future__ import annotations

import argparse

import torch

from longctx.engine.measure import TimedRegion


def step_seconds(parallel: bool, batch: int, length: int, layers: int, hidden: int, repeats: int = 2) -> float:
    """Best wall time of one optimiser step of the embedded Mamba's shape (random weights)."""
    from transformers import MambaConfig, MambaForCausalLM

    from longctx.engine.mamba import use_parallel_scan

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=4096, hidden_size=hidden, num_hidden_layers=layers,
                                         state_size=16, expand=2, conv_kernel=4)).train()
    if parallel:
        use_parallel_scan(model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 4096, (batch, length), generator=torch.Generator().manual_seed(0))  # (B, T)
    best = float("inf")
    for _ in range(repeats):
        with TimedRegion("cpu") as region:
            model(input_ids=ids, labels=ids).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        best = min(best, region.seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for length in args.lengths:
        loop = step_seconds(False, args.batch, length, args.layers, args.hidden)
        scan = step_seconds(True, args.batch, length, args.layers, args.hidden)
        print(f"B={args.batch} T={length}: reference loop {loop:6.2f} s/step, parallel scan {scan:5.2f} s/step: "
              f"{loop / scan:5.1f}x")


if __name__ == "__main__":
    main()
