"""longctx installed like a library: a wheel built from a clean clone, installed into a fresh venv,
used from a temporary directory far from any checkout — `longctx params`, `longctx train`,
`longctx sweep` and the stock `lm_eval --model ssmlora … --tasks longctx_passkey` (no
--include_path: the installed start-up hook adds the package's task folder).

The venv sees this environment's packages (as a cluster node sees its preinstalled ones), so only
longctx itself comes from the wheel, installed offline by scripts/install_offline.sh.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_wheelhouse import INSTALL, node_venv, offline_env, run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """Clean clone -> wheel -> fresh venv; returns the venv's bin folder and a scratch directory."""
    tmp = tmp_path_factory.mktemp("wheel-install")
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    build = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
                 clone], offline_env(), timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp / "dist").glob("longctx_eval-*.whl")
    python = node_venv(tmp / "venv")
    proc = run(["bash", INSTALL, tmp / "dist"], offline_env(PYTHON=str(python)), cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    work = tmp / "elsewhere"
    work.mkdir()
    return {"bin": python.parent, "work": work, "wheel": wheel}


def longctx(installed, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = offline_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return run([installed["bin"] / "longctx", *args], env, cwd=installed["work"], timeout=timeout)


def test_the_installed_package_is_the_wheel_and_carries_its_data(installed):
    code = ("import longctx, longctx.core.resources as r; print(longctx.__file__); "
            "print(len(list(r.recipe_dir().glob('*.yaml'))), len(list(r.task_dir().glob('longctx_*.yaml'))))")
    out = run([installed["bin"] / "python", "-c", code], offline_env(), cwd=installed["work"])
    assert out.returncode == 0, out.stderr
    location, counts = out.stdout.split("\n")[:2]
    assert location.startswith(str(installed["bin"].parent)) and "site-packages" in location, location
    assert counts == "7 20", counts  # every method's recipe; nine tasks x two forms + two groups


def test_params_train_and_stock_lm_eval_from_another_directory(installed):
    params = longctx(installed, "params", "--base", "longctx-tiny")
    assert params.returncode == 0, params.stderr[-2000:]
    assert all(m in params.stdout for m in ("lora", "ssmlora-scan", "lora-xs"))
    train = longctx(installed, "train", "--method", "lora", "--task", "passkey", "--train-length", "128",
                    "--steps", "2", "--batch-size", "1", "--out", "trained", "--quiet")
    assert train.returncode == 0, train.stderr[-2000:]
    adapter = installed["work"] / "trained" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    env = offline_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    evaluation = run([installed["bin"] / "python", "-m", "lm_eval", "--model", "ssmlora", "--model_args",
                      f"pretrained=longctx-tiny,adapter={adapter},chunk_size=64", "--tasks", "longctx_passkey",
                      "--metadata", json.dumps({"max_seq_lengths": [128], "num_samples": 2}),
                      "--output_path", "lm"], env, cwd=installed["work"], timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "longctx_passkey" in evaluation.stdout and "|128" in evaluation.stdout.replace(" ", "")
    (results,) = (installed["work"] / "lm").rglob("results_*.json")
    assert json.loads(results.read_text())["config"]["longctx"]["method"] == "lora"


def test_sweep_from_another_directory(installed):
    config = installed["work"] / "tiny.yaml"
    config.write_text("methods: [base]\ntasks: [passkey]\nlengths: [128]\ntrain_length: 128\ntrain_steps: 1\n"
                      "batch_size: 1\nnum_samples: 2\nchunk_size: 64\nout: swept\n")
    sweep = longctx(installed, "sweep", str(config))
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    rows = (installed["work"] / "swept" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and ",ok," in rows[1], rows
