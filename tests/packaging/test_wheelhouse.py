"""scripts/wheelhouse.sh and scripts/install_offline.sh, offline.

No network: pip runs with no index and no configuration files. The wheelhouse is made against a
local stand-in index: one metadata-only wheel per distribution installed here (same name, version
and requirements; sdists for the ones PyPI has only as sdists), so the real resolution, the torch
exclusion and the --exclude pruning run. It is then installed with install_offline.sh into a fresh
venv that sees this environment's packages (as a node sees its own): only longctx is installed
from the folder, the way a node keeps what it already has.
"""
from __future__ import annotations

import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / "scripts" / "wheelhouse.sh"
INSTALL = ROOT / "scripts" / "install_offline.sh"
SDIST_ONLY = {"rouge-score", "sqlitedict", "word2number"}
PYV = f"{sys.version_info.major}.{sys.version_info.minor}"


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def offline_env(find_links: Path | str = "", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(find_links),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def run(cmd, env, cwd=None, timeout=120):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def assert_one_line_error(proc, script: str, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in last, proc.stderr


def stub_index(folder: Path) -> set[str]:
    """One wheel per installed distribution (but longctx): its name, version and Requires-Dist;
    the sdist-only ones as tiny sdists. Returns the canonical names."""
    folder.mkdir()
    names = set()
    for dist in importlib.metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if not name or canon(name) in names or canon(name) == "longctx-eval":
            continue
        names.add(canon(name))
        requires = dist.requires or []
        stem = f"{re.sub(r'[-.]+', '_', name)}-{version}"
        if canon(name) in SDIST_ONLY:
            setup = f"from setuptools import setup\nsetup(name={name!r}, version={version!r}, install_requires={requires!r}, py_modules=[])\n"
            pkg_info = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            with tarfile.open(folder / f"{stem}.tar.gz", "w:gz") as tar:
                for member, text in (("setup.py", setup), ("PKG-INFO", pkg_info)):
                    info = tarfile.TarInfo(f"{stem}/{member}")
                    info.size = len(text.encode())
                    tar.addfile(info, io.BytesIO(text.encode()))
            continue
        metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
            f"Requires-Dist: {r}\n" for r in requires)
        wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{stem}.dist-info/METADATA", metadata)
            zf.writestr(f"{stem}.dist-info/WHEEL", wheel)
            zf.writestr(f"{stem}.dist-info/RECORD", "")
    return names


def wheel_names(folder: Path) -> set[str]:
    return {canon(p.name.split("-")[0]) for p in folder.glob("*.whl")}


def node_venv(path: Path) -> Path:
    """A fresh venv (no pip of its own) that also sees this environment's site-packages, as a
    node sees its preinstalled packages: pip installs into the venv and leaves those alone."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], os.environ).stdout.strip()
    (Path(purelib) / "node_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.parametrize("script, options", [
    (WHEELHOUSE, ["--dest", "--python-version", "--platform", "--exclude", "--extras", "--constraint", "--torch-version"]),
    (INSTALL, ["WHEELHOUSE", "--editable", "--extras", "--bench", "-- BENCH_ARGS"]),
])
def test_help_lists_the_options(script, options):
    proc = run(["bash", script, "--help"], offline_env())
    assert proc.returncode == 0, proc.stderr
    for option in options:
        assert option in proc.stdout, proc.stdout


@pytest.mark.parametrize("script, args, fragment", [
    (WHEELHOUSE, ["--frobnicate"], "unknown argument: --frobnicate"),
    (WHEELHOUSE, ["--python-version", "3"], "--python-version takes MAJOR.MINOR"),
    (WHEELHOUSE, ["--extras", "cuda"], "--extras takes dev, gpu or dev,gpu"),
    (INSTALL, [], "no WHEELHOUSE given"),
    (INSTALL, ["/no/such/folder"], "no such wheelhouse folder"),
])
def test_bad_arguments_are_one_line_and_nonzero(script, args, fragment, tmp_path):
    proc = run(["bash", script, *args], offline_env(), cwd=tmp_path)
    assert_one_line_error(proc, script.name, fragment)
    assert not (tmp_path / "wheelhouse").exists()


def test_wheelhouse_fails_loudly_when_pip_fails(tmp_path):
    """Nothing to download from (an empty index): pip fails, so does the script, in one line,
    and the folder gets no wheels."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run(["bash", WHEELHOUSE, "--dest", tmp_path / "wh"], offline_env(empty))
    assert_one_line_error(proc, "wheelhouse.sh", "pip could not")
    assert not list((tmp_path / "wh").glob("*.whl"))


def test_install_offline_stops_when_torch_is_missing(tmp_path):
    python = node_venv(tmp_path / "node")
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], os.environ).stdout.strip()
    Path(purelib, "torch.py").write_text("raise ImportError('no torch on this node')\n")
    (tmp_path / "wh").mkdir()
    proc = run(["bash", INSTALL, tmp_path / "wh"], offline_env(PYTHON=str(python)))
    assert_one_line_error(proc, "install_offline.sh", "torch is missing", "no torch on this node")


@pytest.mark.slow
def test_wheelhouse_then_offline_install(tmp_path):
    index_names = stub_index(tmp_path / "index")
    env = offline_env(tmp_path / "index")

    # The whole closure, for this Python; torch left out and never resolved from its metadata.
    full = tmp_path / "full"
    proc = run(["bash", WHEELHOUSE, "--dest", full, "--python-version", PYV], env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"wheelhouse: \d+ wheels, [\d.]+ MiB in ", proc.stdout), proc.stdout
    names = wheel_names(full)
    for needed in ["longctx-eval", "transformers", "peft", "lm-eval", "datasets", "mambapy", *SDIST_ONLY]:
        assert needed in names, sorted(names)
    assert not {n for n in names if n in {"torch", "triton"} or n.startswith(("nvidia-", "cuda-"))}, sorted(names)
    # What only torch needs never comes in (here torch's own metadata requires sympy and networkx).
    only_torch = {"sympy", "networkx"} & index_names
    assert not only_torch & names, sorted(names)
    assert all(p.name.endswith(".whl") for p in full.iterdir())

    # --exclude leaves a package out, and what only it needs.
    small = tmp_path / "small"
    proc = run(["bash", WHEELHOUSE, "--dest", small, "--python-version", PYV, "--exclude", "numpy",
                "--exclude", "lm_eval"], env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    left = wheel_names(small)
    assert {"longctx-eval", "transformers", "pandas"} <= left, sorted(left)
    assert not {"numpy", "lm-eval", "sqlitedict", "word2number", "rouge-score", "pytablewriter"} & left, sorted(left)
    assert left < names

    # Installed offline into a fresh venv that already has every dependency: only longctx comes
    # from the folder, and it imports and runs away from the checkout.
    python = node_venv(tmp_path / "node")
    proc = run(["bash", INSTALL, full], offline_env(PYTHON=str(python)), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "longctx ready: " + str(tmp_path / "node") in proc.stdout, proc.stdout
    assert re.search(r"Successfully installed longctx-eval-\S+\s*$", proc.stdout, re.M), proc.stdout
    cli = run([tmp_path / "node" / "bin" / "longctx", "--help"], offline_env(), cwd=tmp_path)
    assert cli.returncode == 0 and "demo" in cli.stdout, cli.stdout + cli.stderr

    # --editable from a checkout, then --bench with its arguments (a stand-in bench.py).
    project = tmp_path / "project"
    # The checkout without what is not the project's: dot-folders (.git, .venv, compat.sh's .compat of
    # several GB ...), built and run outputs.
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".*", "wheelhouse", "runs", "build", "*.egg-info",
                                                                 "__pycache__"))
    (project / "benchmarks" / "gpu").mkdir(parents=True, exist_ok=True)
    (project / "benchmarks" / "gpu" / "bench.py").write_text(
        "import os, sys\nprint('BENCH', os.getcwd(), sys.argv[1:])\n")
    python = node_venv(tmp_path / "node-editable")
    proc = run(["bash", INSTALL, full, "--editable", project, "--", "--steps", "2"],
               offline_env(PYTHON=str(python)), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "longctx ready: " + str(project / "longctx") in proc.stdout, proc.stdout
    assert f"BENCH {project} ['--steps', '2']" in proc.stdout, proc.stdout
