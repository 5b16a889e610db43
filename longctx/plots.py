"""`longctx plot RESULTS_DIR` (design §8): the figures a length-scaling paper needs, from the sweep's
results table, as PNG and PDF under `RESULTS_DIR/plots/`.

accuracy vs length (line per method, log₂ axis, 95% Wilson bands, facet per task); peak memory
vs length (chunked solid, unchunked dashed); needle depth × length heatmaps; the effective
context length table (largest length up to which accuracy stays ≥ a threshold); trainable
parameters vs effective length.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from longctx.adapters import METHOD_NAMES
from longctx.core.errors import LongctxError
from longctx.core.fileio import atomic_write_text
from longctx.sweep.results import load_table, series_label

DEFAULT_THRESHOLD = 0.5


def length_label(n: int | float) -> str:
    """1024 -> '1K', 1536 -> '1.5K', 300 -> '300'."""
    n = int(n)
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    if n >= 1024:
        return f"{n / 1024:.1f}K"
    return str(n)


def wilson(acc: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0, 1 and small n)."""
    if not n:
        return (0.0, 1.0)
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _methods(frame: Any) -> list[str]:
    """The series present (`results.series_label`: the method, plus its training chunk size if any),
    methods in display order (`longctx.adapters.METHOD_NAMES`), whole-sequence training before chunked."""
    present = list(dict.fromkeys(frame["method"]))
    rank = {m: i for i, m in enumerate(METHOD_NAMES)}
    return sorted(present, key=lambda s: (rank.get(s.split(" (")[0], len(rank)), " (" in s, s))


def _with_series(frame: Any) -> Any:
    """The table with each row's `method` replaced by its series label (one line per trained variant)."""
    frame = frame.copy()
    if "train_chunk_size" in frame:
        frame["method"] = [series_label(row) for row in frame.to_dict("records")]
    return frame


def _on_base(frame: Any) -> str:
    """' — on <base>' for titles, so figures from different bases are not mistaken for each other."""
    bases = [str(b) for b in dict.fromkeys(frame["base"]) if b == b] if "base" in frame else []
    return f" — {', '.join(bases)}" if bases else ""


def _ok(frame: Any) -> Any:
    return frame[frame["status"] == "ok"].copy()


def _length_axis(ax: Any, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("input length (tokens)")


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


MARKERS = "osD^vP*X"


def _style(index: int) -> dict[str, Any]:
    """How the `index`-th method is drawn: its colour, a marker of its own, and markers and lines
    that shrink with the index, so methods with equal values (several at accuracy 1.0) stay visible
    one inside the other instead of the last one hiding the others."""
    return {"color": f"C{index}", "marker": MARKERS[index % len(MARKERS)], "markersize": max(3.0, 8.0 - 1.2 * index),
            "linewidth": max(1.0, 2.6 - 0.4 * index)}


def accuracy_vs_length(frame: Any, out: Path) -> list[Path]:
    """Accuracy (and, where recorded, the answer's NLL per token) vs length, a column per task."""
    import matplotlib.pyplot as plt

    ok, tasks = _ok(frame), list(dict.fromkeys(frame["task"]))
    ok = ok[ok["chunk_size"].notna()]
    lengths = sorted(set(ok["length"]))
    has_nll = "answer_nll" in ok and ok["answer_nll"].notna().any()
    fig, axes = plt.subplots(2 if has_nll else 1, len(tasks), figsize=(4.6 * len(tasks), 3.6 * (2 if has_nll else 1)),
                             squeeze=False, sharey="row", constrained_layout=True)
    for col, task in enumerate(tasks):
        for index, method in enumerate(_methods(frame)):
            cells = ok[(ok["task"] == task) & (ok["method"] == method)]
            cells = cells.groupby("length").agg(acc=("acc", "mean"), n=("n", "sum"),
                                                nll=("answer_nll", "mean") if has_nll else ("acc", "size")).reset_index()
            if cells.empty:
                continue
            band = [wilson(a, int(n)) for a, n in zip(cells["acc"], cells["n"])]
            axes[0][col].plot(cells["length"], cells["acc"], label=method, **_style(index))
            axes[0][col].fill_between(cells["length"], [b[0] for b in band], [b[1] for b in band], alpha=0.15,
                                      color=f"C{index}")
            if has_nll:
                axes[1][col].plot(cells["length"], cells["nll"], label=method, **_style(index))
        axes[0][col].set_title(task)
        axes[0][col].set_ylim(-0.03, 1.03)
        for ax in axes[:, col]:
            _length_axis(ax, lengths)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (answer = greedy continuation)")
    if has_nll:
        axes[1][0].set_ylabel("answer NLL (nats per token, lower is better)")
    axes[0][-1].legend(title="method", fontsize=8, loc="best")
    fig.suptitle(f"Accuracy (95% Wilson bands) and answer likelihood vs input length{_on_base(frame)}")
    paths = _save(fig, out, "accuracy_vs_length")
    plt.close(fig)
    return paths


def _memory_column(frame: Any) -> str:
    """Each request's own memory (its peak above what was resident before it, so the weights do not
    hide the differences), or the process's peak for results written before that was recorded."""
    own = "request_memory_bytes"
    return own if own in frame and frame[own].notna().all() else "peak_memory_bytes"


def memory_vs_length(frame: Any, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    ok = _ok(frame)
    lengths = sorted(set(ok["length"]))
    column = _memory_column(ok)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for index, method in enumerate(_methods(ok)):
        for chunked, style in ((True, "-"), (False, "--")):
            rows = ok[(ok["method"] == method) & (ok["chunk_size"].notna() == chunked)]
            rows = rows.groupby("length")[column].max().reset_index()
            if rows.empty:
                continue
            label = f"{method} ({'chunked' if chunked else 'unchunked'})"
            ax.plot(rows["length"], rows[column] / 2**20, style, label=label, alpha=0.85, **_style(index))
    _length_axis(ax, lengths)
    ax.set_ylabel("request's own peak memory (MiB)" if column == "request_memory_bytes"
                  else "process peak memory per request (MiB)")
    ax.set_title(f"Peak memory vs input length{_on_base(frame)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths = _save(fig, out, "memory_vs_length")
    plt.close(fig)
    return paths


def depth_heatmaps(frame: Any, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import numpy as np

    ok = _ok(frame)
    ok = ok[ok["depth_acc"].map(lambda d: isinstance(d, dict) and bool(d)) & ok["chunk_size"].notna()]
    if ok.empty:
        return []
    tasks, methods = list(dict.fromkeys(ok["task"])), _methods(ok)
    lengths = sorted(set(ok["length"]))
    bins = sorted({b for d in ok["depth_acc"] for b in d}, key=lambda b: int(b.split("_")[1].split("-")[0]))
    fig, axes = plt.subplots(len(tasks), len(methods), figsize=(2.4 * len(methods) + 1.6, 2.3 * len(tasks) + 0.6),
                             squeeze=False, constrained_layout=True)
    for i, task in enumerate(tasks):
        for j, method in enumerate(methods):
            grid = np.full((len(bins), len(lengths)), np.nan)
            for _, row in ok[(ok["task"] == task) & (ok["method"] == method)].iterrows():
                for b, value in row["depth_acc"].items():
                    grid[bins.index(b), lengths.index(row["length"])] = value
            ax = axes[i][j]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(bins)), [b.removeprefix("depth_") + "%" if j == 0 else "" for b in bins],
                          fontsize=7)
            ax.set_title(f"{method} · {task}", fontsize=8)
            if j == 0:
                ax.set_ylabel("needle depth")
            if i == len(tasks) - 1:
                ax.set_xlabel("input length (tokens)")
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle(f"Accuracy by needle depth and input length (white: no examples in that bin){_on_base(frame)}")
    paths = _save(fig, out, "depth_heatmaps")
    plt.close(fig)
    return paths


def effective_length(frame: Any, threshold: float = DEFAULT_THRESHOLD) -> Any:
    """Per (task, method): the largest length up to which accuracy stays ≥ `threshold` at every
    evaluated length (0 when the shortest already falls below), with trainable parameters."""
    import pandas as pd

    ok = _ok(frame)
    ok = ok[ok["chunk_size"].notna()]
    rows = []
    for (task, method), cells in ok.groupby(["task", "method"], sort=False):
        by_length = cells.groupby("length")["acc"].mean().sort_index()
        effective = 0
        for length, acc in by_length.items():
            if acc < threshold:
                break
            effective = int(length)
        rows.append({"task": task, "method": method, "effective_length": effective,
                     "max_evaluated": int(by_length.index.max()),
                     "trainable_parameters": int(cells["trainable_parameters"].max() or 0)})
    return pd.DataFrame(rows)


def params_vs_effective(table: Any, out: Path, threshold: float) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), constrained_layout=True)
    for task, rows in table.groupby("task", sort=False):
        ax.scatter(rows["trainable_parameters"] + 1, rows["effective_length"], label=task, s=40)
        for _, r in rows.iterrows():
            ax.annotate(r["method"], (r["trainable_parameters"] + 1, r["effective_length"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (+1, log scale)")
    ax.set_ylabel(f"effective length (tokens; acc ≥ {threshold:g})")
    ax.set_title("Trainable parameters vs effective context length")
    ax.grid(alpha=0.3)
    ax.legend(title="task", fontsize=8)
    paths = _save(fig, out, "params_vs_effective_length")
    plt.close(fig)
    return paths


def plot_all(results_dir: str | Path, threshold: float = DEFAULT_THRESHOLD) -> tuple[list[Path], Any]:
    """Every figure plus `effective_length.csv`; returns (written paths, effective-length table)."""
    import matplotlib  # deferred: matplotlib is slow to import and only plotting needs it

    matplotlib.use("Agg")
    if not 0 <= threshold <= 1:
        raise LongctxError(f"threshold {threshold!r} is not in [0, 1]")
    frame = _with_series(load_table(Path(results_dir)))
    out = Path(results_dir) / "plots"
    paths = accuracy_vs_length(frame, out) + memory_vs_length(frame, out) + depth_heatmaps(frame, out)
    table = effective_length(frame, threshold)
    paths += params_vs_effective(table, out, threshold)
    atomic_write_text(out / "effective_length.csv", table.to_csv(index=False))
    return paths + [out / "effective_length.csv"], table
