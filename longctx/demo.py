"""`longctx demo` (SPEC §8): the README's main command. A small sweep on the embedded base — every
method trained on two retrieval tasks at a short length, evaluated from that length up to 8×
it through lm-eval (chunked), plus an unchunked `base` run for the memory comparison — then the
plots, a summary table and where the files are. About 7 minutes on 2 CPU cores."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from longctx.sweep import SweepConfig

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
)
QUICK = dataclasses.replace(DEMO, train_steps=10, batch_size=4, num_samples=2, lengths=[256, 512])


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


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> Path:
    from longctx.plots import plot_all
    from longctx.results import load_table
    from longctx.sweep import run_sweep

    cfg = dataclasses.replace(QUICK if quick else DEMO, out=str(out))
    results = run_sweep(cfg, Path(out))
    paths, table = plot_all(results)
    print()
    print(summary(load_table(results)))
    print()
    print("effective length (largest length with accuracy >= 0.5 at it and every shorter length):")
    print(table.to_string(index=False))
    print()
    print(f"results: {results / 'results.csv'}")
    print("plots:   " + ", ".join(str(p) for p in paths if p.suffix == ".png"))
    return results
