"""Plots and the analysis notebook on a small results fixture: every figure written as PNG and
PDF, the effective-length table computed as defined, the notebook executed headless."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from longctx.core.errors import LongctxError
from longctx.plots import effective_length, length_label, plot_all, wilson
from longctx.sweep.results import append_row, load_table

ROOT = Path(__file__).resolve().parent.parent
ACC = {  # (method, task) -> accuracy at 256, 512, 1024, 2048
    ("base", "passkey"): [0.2, 0.1, 0.0, 0.0],
    ("lora", "passkey"): [1.0, 0.8, 0.4, 0.6],
    ("ssmlora", "passkey"): [0.9, 0.7, 0.6, 0.5],
    ("base", "niah_single"): [0.0, 0.0, 0.0, 0.0],
    ("lora", "niah_single"): [0.6, 0.5, 0.3, 0.1],
    ("ssmlora", "niah_single"): [0.7, 0.6, 0.5, 0.2],
}
PARAMS = {"base": 0, "lora": 14336, "ssmlora": 7680}


def make_results(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for (method, task), accs in ACC.items():
        for length, acc in zip((256, 512, 1024, 2048), accs):
            for chunk in ([128, None] if method == "base" else [128]):
                append_row(directory / "results.jsonl", {
                    "method": method, "base": "longctx-tiny", "task": task, "length": length, "seed": 0, "n": 10,
                    "acc": acc, "stderr": 0.1, "peak_memory_bytes": (500 + length // (4 if chunk else 1)) * 2**20,
                    "tokens_per_s": 1000.0, "trainable_parameters": PARAMS[method], "total_parameters": 10**6,
                    "chunk_size": chunk, "train_length": 256, "status": "ok", "message": "",
                    "depth_acc": {"depth_0-20": acc, "depth_80-100": acc / 2}})
    append_row(directory / "results.jsonl", {"method": "lora", "task": "passkey", "length": 4096, "seed": 0,
                                              "chunk_size": 128, "status": "error", "message": "limit", "n": 0})
    return directory


@pytest.fixture
def results(tmp_path) -> Path:
    return make_results(tmp_path / "results")


def test_plot_all_writes_png_and_pdf_of_every_figure(results):
    paths, _ = plot_all(results)
    names = {p.name for p in paths}
    for figure in ("accuracy_vs_length", "memory_vs_length", "depth_heatmaps", "params_vs_effective_length"):
        assert {f"{figure}.png", f"{figure}.pdf"} <= names
        assert (results / "plots" / f"{figure}.png").stat().st_size > 10_000
    assert (results / "plots" / "effective_length.csv").read_text().startswith("task,method,effective_length")


@pytest.mark.parametrize("threshold, expected", [
    (0.5, {("base", "passkey"): 0, ("lora", "passkey"): 512, ("ssmlora", "passkey"): 2048,
           ("lora", "niah_single"): 512, ("ssmlora", "niah_single"): 1024}),
    (0.65, {("lora", "passkey"): 512, ("ssmlora", "passkey"): 512, ("ssmlora", "niah_single"): 256,
            ("lora", "niah_single"): 0}),
])
def test_effective_length_is_the_largest_length_before_accuracy_first_drops_below(threshold, expected, results):
    table = effective_length(load_table(results), threshold)
    got = {(r.method, r.task): r.effective_length for r in table.itertuples()}
    for key, value in expected.items():
        assert got[key] == value, key
    assert table.set_index("method").loc["lora", "trainable_parameters"].tolist() == [14336, 14336]


def test_wilson_interval_and_length_labels():
    low, high = wilson(0.5, 10)
    assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0.0, 10)[0] == 0.0 and 0.25 < wilson(0.0, 10)[1] < 0.35
    assert [length_label(n) for n in (256, 1024, 1536, 32768)] == ["256", "1K", "1.5K", "32K"]


def test_plot_errors_are_one_line(tmp_path):
    with pytest.raises(LongctxError, match="no results.jsonl or results.csv"):
        plot_all(tmp_path)
    make_results(tmp_path / "r")
    with pytest.raises(LongctxError, match="threshold 1.5"):
        plot_all(tmp_path / "r", threshold=1.5)


def test_results_csv_loads_like_the_jsonl(results):
    from longctx.sweep.results import write_csv

    write_csv(results / "results.jsonl", results / "results.csv")
    (results / "results.jsonl").unlink()
    table = load_table(results)
    assert len(table) == 6 * 4 + 2 * 4 + 1 and isinstance(table["depth_acc"].dropna().iloc[0], dict)


@pytest.mark.slow
def test_notebook_runs_headless_on_a_results_fixture(results):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "analysis" / "length_scaling.ipynb", as_version=4)
    os.environ["RESULTS_DIR"] = str(results)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["RESULTS_DIR"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(o.output_type == "display_data" for o in outputs) >= 2  # the two figures
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_memory_plot_shows_each_requests_own_memory_when_recorded(results, monkeypatch):
    """The memory figure plots a request's peak above what was resident before it (so weights shared by
    every method do not flatten the differences), and the process's peak for older results."""
    import matplotlib.axes

    from longctx import plots

    plotted = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, *a, **k: plotted.append((k.get("label"), list(y))) or original(self, x, y, *a, **k))
    frame = load_table(results)
    plots.memory_vs_length(frame, results / "old")
    assert ("base (unchunked)", [500 + n for n in (256, 512, 1024, 2048)]) in plotted
    plotted.clear()
    frame["request_memory_bytes"] = frame["peak_memory_bytes"] - 500 * 2**20
    plots.memory_vs_length(frame, results / "new")
    assert ("base (unchunked)", [256.0, 512.0, 1024.0, 2048.0]) in plotted
