"""`longctx demo` (design §8): the README's main command. A small sweep on each embedded base —
on `longctx-tiny` (Llama) every Llama method trained on two retrieval tasks at a short length and
evaluated from that length up to 8× it through lm-eval (chunked), plus an unchunked `base` run
for the memory comparison; on `longctx-tiny-mamba` the Mamba methods on pass-key retrieval, the
same way — then the plots, a summary table and where the files are. ≤ 10 minutes on 2 CPU cores."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from longctx.adapters import METHOD_NAMES
from longctx.plots import length_label, plot_all
from longctx.sweep.config import SweepConfig, load_config, presets
from longctx.sweep.results import load_table
from longctx.sweep.run import run_sweep, sweep_outcome

# The two sweeps are the presets `longctx sweep demo` and `longctx sweep demo-mamba` run
# (longctx/sweep/presets/). Mamba adapters train through transformers' pure-PyTorch Mamba, so
# that part is smaller: one task, 50 steps of 4 at 128 tokens, evaluated from 128 to 1K in chunks
# of 128; SDLoRA (the Mamba-only method), LoRA and the scan SSMLoRA against the base that
# retrieves but does not answer pass-key prompts unadapted. `configs/mamba.yaml` has every method.
DEMO = load_config(presets()["demo"])
DEMO_MAMBA = load_config(presets()["demo-mamba"])
# `--quick` (a check that everything runs, not a measurement): the base, LoRA and both SSMLoRAs on
# one task, 2 samples, 10 steps, no unchunked memory baseline, in its own directory, so its cells
# never enter the full demo's table.
QUICK = dataclasses.replace(DEMO, methods=["base", "lora", "ssmlora", "ssmlora-scan"], tasks=["passkey"],
                            train_steps=10, batch_size=4, num_samples=2, lengths=[256, 512], unchunked_methods=[],
                            out="runs/demo-quick")
QUICK_MAMBA = dataclasses.replace(DEMO_MAMBA, methods=["base", "sdlora"], train_steps=10, num_samples=2,
                                  lengths=[128, 256],
                                  unchunked_methods=[], out="runs/demo-quick/mamba")


def summary(frame: Any) -> str:
    """Accuracy (n) per method × length, one block per task (a results DataFrame); failed cells show
    their status."""
    lines = []
    frame = frame[frame["chunk_size"].notna()]
    for task, rows in frame.groupby("task", sort=False):
        lengths = sorted(set(rows["length"]))
        n = int(rows["n"].max())
        lines.append(f"{task}: accuracy (answer = greedy continuation) and answer NLL (nats/token), n={n} per cell")
        lines.append(f"  {'method':<14}" + "".join(f"{length_label(n):>12}" for n in lengths))
        for method in [m for m in METHOD_NAMES if m in set(rows["method"])]:
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


def run_demo(out: str | Path | None = None, quick: bool = False, retry_failed: bool = False) -> list[Path]:
    """Both sweeps, then their figures and tables (a part with no ok cell gets none: there is
    nothing to draw); returns the two results directories, Llama first."""
    parts = demo_parts(out, quick)
    done = [(cfg.base, run_sweep(cfg, where, retry_failed=retry_failed)) for cfg, where in parts]
    for base, results in done:
        if sweep_outcome(results)[0] == 0:
            continue
        pngs = _report(results, f"{base}: {results / 'results.csv'}")
        print("plots: " + ", ".join(str(p) for p in pngs))
    return [results for _, results in done]
