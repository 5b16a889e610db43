"""`longctx demo` (design §8): the README's main command. A small sweep on each embedded base —
on `longctx-tiny` (Llama) every Llama method trained on two retrieval tasks at a short length and
evaluated from that length up to 8× it through lm-eval (chunked), plus an unchunked `base` run
for the memory comparison; on `longctx-tiny-mamba` the Mamba methods on pass-key retrieval, the
same way — then the plots, a summary table and where the files are. ≤ 10 minutes on 2 CPU cores."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from longctx.sweep.run import SweepConfig

DEMO = SweepConfig(
    methods=["base", "dense", "lora", "ssmlora", "ssmlora-scan", "lora-xs"],
    tasks=["passkey", "niah_single"],
    lengths=[256, 512, 1024, 2048],
    train_length=256,
    train_steps=150,
    batch_size=8,
    num_samples=10,
    chunk_size=256,
    unchunked_methods=["base"],
    out="runs/demo",
    executor={"workers": 2},  # two cell groups at once, one core's threads each (tokens/s shared)
)
# Mamba adapters train through transformers' pure-PyTorch Mamba (~0.5 s per 4×128-token step on 2
# cores), so this part is smaller: one task, 50 steps of 4 at 128 tokens, evaluated from 128 to 1K in
# chunks of 128; SDLoRA (the Mamba-only method), LoRA and the scan SSMLoRA against the base that
# retrieves but does not answer pass-key prompts unadapted. `configs/mamba.yaml` has every method.
DEMO_MAMBA = dataclasses.replace(DEMO, base="longctx-tiny-mamba", methods=["base", "sdlora", "lora", "ssmlora-scan"],
                                 tasks=["passkey"], lengths=[128, 256, 512, 1024], train_length=128, train_steps=50,
                                 batch_size=4, chunk_size=128, out="runs/demo/mamba")
# `--quick` (a check that everything runs, not a measurement): the base, LoRA and both SSMLoRAs on
# one task, 2 samples, 10 steps, no unchunked memory baseline, in its own directory, so its cells
# never enter the full demo's table.
QUICK = dataclasses.replace(DEMO, methods=["base", "lora", "ssmlora", "ssmlora-scan"], tasks=["passkey"],
                            train_steps=10, batch_size=4, num_samples=2, lengths=[256, 512], unchunked_methods=[],
                            out="runs/demo-quick")
QUICK_MAMBA = dataclasses.replace(DEMO_MAMBA, methods=["base", "sdlora"], train_steps=10, num_samples=2,
                                  lengths=[128, 256],
                                  unchunked_methods=[], out="runs/demo-quick/mamba")


def summary(frame) -> str:
    """Accuracy (n) per method × length, one block per task; failed cells show their status."""
    from longctx.plots import METHOD_ORDER, length_label

    lines = []
    frame = frame[frame["chunk_size"].notna()]
    for task, rows in frame.groupby("task", sort=False):
        lengths = sorted(set(rows["length"]))
        n = int(rows["n"].max())
        lines.append(f"{task}: accuracy (answer = greedy continuation) and answer NLL (nats/token), n={n} per cell")
        lines.append(f"  {'method':<14}" + "".join(f"{length_label(n):>12}" for n in lengths))
        for method in [m for m in METHOD_ORDER if m in set(rows["method"])]:
            cells = rows[rows["method"] == method].set_index("length")
            out = []
            for n in lengths:
                if n not in cells.index:
                    out.append("-")
                    continue
                cell = cells.loc[n]
                ok = cell["status"] == "ok"
                nll = cell.get("answer_nll")
                nll_text = f" {nll:.2f}" if ok and nll is not None and nll == nll else ""
                out.append(f"{cell['acc']:.2f}{nll_text}" if ok else str(cell["status"]))
            lines.append(f"  {method:<14}" + "".join(f"{v:>12}" for v in out))
    return "\n".join(lines)


def _report(results: Path, title: str) -> list[Path]:
    """Plots for one results directory, its summary and effective-length table; the PNG paths."""
    from longctx.plots import plot_all
    from longctx.sweep.results import load_table

    paths, table = plot_all(results)
    print(f"\n== {title} ==")
    print(summary(load_table(results)))
    print("\neffective length (largest length with accuracy >= 0.5 at it and every shorter length):")
    print(table.to_string(index=False))
    return [p for p in paths if p.suffix == ".png"]


def demo_parts(out: str | Path | None = None, quick: bool = False) -> list[tuple[SweepConfig, Path]]:
    """The demo's two sweeps and their directories: `out` (default runs/demo, or runs/demo-quick
    with `quick`) for Llama, `out/mamba` for Mamba."""
    llama, mamba = (QUICK, QUICK_MAMBA) if quick else (DEMO, DEMO_MAMBA)
    out = Path(out if out is not None else llama.out)
    return [(dataclasses.replace(cfg, out=str(where)), where) for cfg, where in [(llama, out), (mamba, out / "mamba")]]


def run_demo(out: str | Path | None = None, quick: bool = False, retry_failed: bool = False) -> Path:
    """Both sweeps, then their figures and tables; returns the Llama part's directory."""
    from longctx.sweep.run import run_sweep

    parts = demo_parts(out, quick)
    done = [(cfg.base, run_sweep(cfg, where, retry_failed=retry_failed)) for cfg, where in parts]
    for base, results in done:
        pngs = _report(results, f"{base}: {results / 'results.csv'}")
        print("plots: " + ", ".join(str(p) for p in pngs))
    return parts[0][1]
