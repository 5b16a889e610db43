"""The GPU benchmark script runs end to end (`--smoke`: a tiny model, lengths / 64, on the CPU), so
the one command meant for a borrowed GPU does not fail on a Python error there."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_reports_every_figure(tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/bench.py"), "--smoke", "--device", "cpu",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert {"environment", "G4_512_ssmlora_chunk64", "G4_1024_ssmlora_chunk64", "G1", "adapters", "G2_2048", "G3_512K", "G3_1M"} <= set(figures)
    g4 = figures["G4_1024_ssmlora_chunk64"]
    assert abs(g4["hf"]["logprob"] - g4["longctx"]["logprob"]) < 1.0 and g4["longctx"]["cold_seconds"] > 0
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks/gpu"))
    from bench import WARM_REQUESTS

    assert g4["emptied_time_ratio"] > 0 and len(g4["longctx"]["warm_seconds"]) == WARM_REQUESTS  # both ways of timing it
    assert figures["G3_1M"]["tokens"] == 1024 * 16 and figures["G1"]["ratio"] > 0


def test_gpu_benchmark_without_a_gpu_says_so():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/bench.py")], capture_output=True, text=True)
    if "no CUDA device" not in run.stderr:
        pytest.skip("a CUDA device is present")
    assert run.returncode == 1 and "--smoke --device cpu" in run.stderr
