"""Sweeps on real cluster engines (issue 13): a single-node Slurm started here from the operating
system's packages (skipped, with the reason, where it cannot start) and a local Ray cluster.
Each run is interrupted the hard way — an array task `scancel`led and the driver SIGKILLed
(Slurm), a worker killed mid-cell (Ray) — then finished, and must end with every cell exactly
once and the same table as a local run. The children are held at the phase to interrupt until
the interruption is done (`held_sweep`), so no verdict depends on the machine's speed. An
executor that cannot run anything (Slurm missing or not answering, a Ray address nothing listens
on, resources no node has) is one line, exit status 2, nothing written."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SWEEP_SMOKE
from held_sweep import held, held_sweep, parent_of, release

from longctx.core.errors import LongctxError

ROOT = Path(__file__).resolve().parents[2]
SMALL = SWEEP_SMOKE
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
pytestmark = pytest.mark.slow


def _config(path: Path, **executor) -> Path:
    path.write_text(yaml.safe_dump({**SMALL, "executor": executor}))
    return path


def _sweep(config: Path, out: Path, *extra: str, env=None):
    cmd = [sys.executable, "-m", "longctx.cli", "sweep", str(config), "--out", str(out), "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, cwd=ROOT, timeout=600)


def _one_line_nothing_written(done: subprocess.CompletedProcess, message: str, out: Path) -> None:
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.fixture
def stop_driver():
    """Register a background driver; it is killed (with its children) if the test leaves it running."""
    drivers = []
    yield drivers.append
    for driver in drivers:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def _table(out: Path) -> dict[str, tuple]:
    """cell id -> what the cell measured; asserts each cell has exactly one row."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    ids = [r["cell_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 4, ids  # 2 methods x 2 lengths, each once
    return {r["cell_id"]: (r["method"], r["length"], r["status"], r["n"], r["acc"],
                           None if r["answer_nll"] is None else round(r["answer_nll"], 4)) for r in rows}


@pytest.fixture(scope="module")
def local_table(sigkilled_local_sweep) -> dict[str, tuple]:
    """The same config's table from the local executor (a run SIGKILLed and finished, shared with
    `test_sweep`; deterministic, so equal to an uninterrupted run's)."""
    return _table(sigkilled_local_sweep["out"])


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _state(out: Path) -> dict:
    try:
        return json.loads((out / "dispatch.json").read_text())
    except (OSError, ValueError):
        return {}


# ---- Slurm ------------------------------------------------------------------------------------

SLURM_CONF = """ClusterName=longctxtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPort={port}
SlurmdPort={port_d}
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _start_slurm(tmp: Path) -> tuple[dict, list[Path]]:
    """munged, slurmctld and slurmd on this machine, state in `tmp`; (environment, pid files)."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm cannot start here: {', '.join(missing)} not installed (Debian: slurm-wlm, munge)")
    if os.geteuid() != 0:
        pytest.skip("Slurm cannot start here: the single-node set-up runs its daemons as root")
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        pytest.skip("Slurm cannot start here: no munge key at /etc/munge/munge.key")
    for sub in ("state", "spool"):
        (tmp / sub).mkdir()
    shutil.copy(key, tmp / "munge.key")
    os.chmod(tmp / "munge.key", 0o600)
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    memory = max(1000, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2)
    port = 20000 + os.getpid() % 20000
    conf = tmp / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=tmp, port=port, port_d=port + 1, cpus=os.cpu_count(),
                                      memory=memory))
    env = {**ENV, "SLURM_CONF": str(conf)}
    starts = [["munged", "--force", f"--socket={tmp}/munge.socket", f"--key-file={tmp}/munge.key",
               f"--pid-file={tmp}/munged.pid", f"--log-file={tmp}/munged.log", f"--seed-file={tmp}/munge.seed"],
              ["slurmctld", "-f", str(conf)], ["slurmd", "-f", str(conf)]]
    for cmd in starts:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        if done.returncode != 0:
            pytest.skip(f"Slurm cannot start here: {cmd[0]} failed: {(done.stderr or done.stdout).strip()[:300]}")
    pids = [tmp / "munged.pid", tmp / "slurmctld.pid", tmp / "slurmd.pid"]
    try:
        _wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                                   env=env).stdout, 60, "the Slurm node to come up")
    except AssertionError:
        _stop(pids)
        pytest.skip(f"Slurm cannot start here: the node never became idle (logs in {tmp})")
    return env, pids


def _stop(pids: list[Path]) -> None:
    for pid_file in reversed(pids):
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    tmp = Path(f"/tmp/longctx-slurm-{os.getpid()}")  # short: munge's socket path has a length limit
    tmp.mkdir(exist_ok=True)
    env, pids = _start_slurm(tmp)
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        _stop(pids)
        shutil.rmtree(tmp, ignore_errors=True)


def _lora_job(out: Path) -> str | None:
    return next((s["job"] for tag, s in _state(out).items() if tag.startswith("lora-")), None)


def test_slurm_sweep_survives_scancel_and_a_killed_driver(slurm, local_table, tmp_path, stop_driver):
    config = _config(tmp_path / "sweep.yaml", kind="slurm", gpus_per_cell=0)
    out, hold = tmp_path / "out", tmp_path / "hold"
    stop_driver(driver := held_sweep(config, out, hold, {"lora": "train"}, slurm))
    _wait_for(lambda: held(hold, "lora") and _lora_job(out), 300, "the lora task to start training")
    subprocess.run(["scancel", _lora_job(out)], env=slurm, check=True)  # an array task killed mid-cell
    driver.send_signal(signal.SIGKILL)  # and the driver with it: nothing may depend on it
    driver.wait()
    release(hold)
    status = subprocess.run([sys.executable, "-m", "longctx.cli", "sweep", str(config), "--out", str(out),
                             "--status"], capture_output=True, text=True, env=slurm, cwd=ROOT, timeout=120)
    assert status.returncode == 0 and "queued" in status.stdout and "lora" in status.stdout, status.stderr
    done = _sweep(config, out, env=slurm)  # collects what landed, resubmits only the cancelled group
    assert done.returncode == 0, done.stderr[-2000:]
    assert _table(out) == local_table
    state = _state(out)
    assert {tag.split("-")[0]: s["attempts"] for tag, s in state.items()} == {"base": 1, "lora": 2}
    again = _sweep(config, out, env=slurm)  # nothing left: no new job
    assert again.returncode == 0 and _state(out) == state


def test_slurm_refusing_the_array_is_one_line(slurm, tmp_path):
    """The default asks one GPU per cell group; this node has none: sbatch's refusal, in one line."""
    done = _sweep(_config(tmp_path / "sweep.yaml", kind="slurm"), tmp_path / "out", env=slurm)
    assert done.returncode == 2 and "Slurm refused the job array" in done.stderr and "gpus_per_cell" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists() or not (tmp_path / "out" / "results.jsonl").read_text()


# ---- Ray --------------------------------------------------------------------------------------

def test_ray_sweep_survives_a_worker_killed_mid_cell(local_table, tmp_path, stop_driver):
    pytest.importorskip("ray", reason="the Ray executor needs `pip install longctx[cluster]`")
    config = _config(tmp_path / "sweep.yaml", kind="ray", ray_num_cpus=2, gpus_per_cell=0)
    out, hold = tmp_path / "out", tmp_path / "hold"
    stop_driver(driver := held_sweep(config, out, hold, {"lora": "length=256"}, ENV))
    _wait_for(lambda: held(hold, "lora"), 300, "the lora task to evaluate its first cell")
    os.kill(parent_of(held(hold, "lora")), signal.SIGKILL)  # the Ray worker running that cell
    release(hold)
    assert driver.wait(timeout=600) == 0, (hold / "driver.stderr").read_text()[-2000:]
    assert _table(out) == local_table
    assert {tag.split("-")[0]: s["attempts"] for tag, s in _state(out).items()} == {"base": 1, "lora": 2}


def test_missing_extra_and_bad_executor_settings_are_one_line(tmp_path, monkeypatch):
    import importlib.util

    from longctx.sweep.executors import parse_executor, require

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    with pytest.raises(LongctxError, match=r"needs the 'submitit' package: pip install 'longctx\[cluster\]'"):
        require("submitit", "slurm")
    with pytest.raises(LongctxError, match="unknown executor 'pbs'"):
        parse_executor({}, "pbs")
    with pytest.raises(LongctxError, match="Slurm allocates whole GPUs"):
        parse_executor({"kind": "slurm", "gpus_per_cell": 0.5})
    with pytest.raises(LongctxError, match="unknown key 'partitions' in executor"):
        parse_executor({"partitions": "gpu"})
    with pytest.raises(LongctxError, match="executor must be a mapping"):
        parse_executor(["slurm"])
    with pytest.raises(LongctxError, match="executor.workers must be a positive integer, got 0"):
        parse_executor({"workers": 0})
    bad = _sweep(_config(tmp_path / "s.yaml", kind="pbs"), tmp_path / "out")
    assert bad.returncode == 2 and "pbs" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_impossible_executor_resources_are_refused_before_anything_runs(tmp_path):
    """Resources no Ray task could ever get (it would wait forever at 0 cells): one line, nothing written."""
    from longctx.sweep.executors import ExecutorConfig, parse_executor, ray_fit_error

    for values, message in [
        ({"ray_num_cpus": 0}, "executor.ray_num_cpus=0 leaves no room for a cell group of executor.cpus_per_cell=1"),
        ({"ray_num_cpus": 2, "cpus_per_cell": 3}, "executor.ray_num_cpus=2 leaves no room for a cell group of "
                                                  "executor.cpus_per_cell=3: give ray_num_cpus >= cpus_per_cell"),
        ({"gpus_per_cell": 1.5}, "executor.gpus_per_cell=1.5: Ray shares a GPU only below 1"),
        ({"ray_address": "head-node"}, "executor.ray_address must be HOST:PORT, ray://HOST:PORT or auto, got "
                                       "'head-node'"),
        ({"ray_num_cpus": "2"}, "executor.ray_num_cpus must be an integer or null, got '2'"),
    ]:
        with pytest.raises(LongctxError) as err:
            parse_executor({"kind": "ray", **values})
        assert message in str(err.value) and "\n" not in str(err.value)
    parse_executor({"kind": "local", "ray_num_cpus": 0})  # not a Ray sweep: nothing to refuse
    cfg = ExecutorConfig(kind="ray", cpus_per_cell=4, gpus_per_cell=1)
    assert ray_fit_error([{"CPU": 2.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], cfg) is None  # one node fits
    assert ray_fit_error([{"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}], cfg) == (
        "no node of the Ray cluster can run a cell group of executor.cpus_per_cell=4 and gpus_per_cell=1: its nodes "
        "have at most 8 CPUs and 1 GPUs; give smaller cpus_per_cell / gpus_per_cell")
    assert ray_fit_error([{"CPU": 8.0}], cfg).endswith("give gpus_per_cell: 0 to run on CPUs")
    out = tmp_path / "out"
    done = _sweep(_config(tmp_path / "s.yaml", kind="ray", ray_num_cpus=1, cpus_per_cell=2), out)
    _one_line_nothing_written(done, "executor.ray_num_cpus=1 leaves no room for a cell group", out)


def test_a_local_ray_cluster_too_small_for_a_cell_group_is_refused(tmp_path):
    pytest.importorskip("ray", reason="the Ray executor needs `pip install longctx[cluster]`")
    out = tmp_path / "out"
    done = _sweep(_config(tmp_path / "s.yaml", kind="ray", gpus_per_cell=0, cpus_per_cell=4096), out)
    _one_line_nothing_written(done, "no node of the Ray cluster can run a cell group of executor.cpus_per_cell=4096",
                              out)


def test_an_unreachable_ray_address_is_one_line_and_quick(tmp_path):
    pytest.importorskip("ray", reason="the Ray executor needs `pip install longctx[cluster]`")
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    done = _sweep(_config(tmp_path / "s.yaml", kind="ray", gpus_per_cell=0, ray_address=f"127.0.0.1:{port}"), out)
    _one_line_nothing_written(done, f"cannot reach the Ray cluster at executor.ray_address='127.0.0.1:{port}': "
                                    f"Connection refused", out)


def test_slurm_missing_or_not_answering_is_one_line(tmp_path):
    """No `sbatch` on PATH; then Slurm's commands there but the controller not answering."""
    path = tmp_path / "bin"
    path.mkdir()
    config, out = _config(tmp_path / "s.yaml", kind="slurm", gpus_per_cell=0), tmp_path / "out"
    done = _sweep(config, out, env={**ENV, "PATH": str(path)})
    _one_line_nothing_written(done, "--executor slurm needs Slurm's 'sbatch' command, which is not on PATH", out)
    for command in ("sbatch", "srun", "squeue"):
        (path / command).write_text("#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller "
                                    "(connect failure)' >&2\nexit 1\n")
        (path / command).chmod(0o755)
    done = _sweep(config, out, env={**ENV, "PATH": f"{path}:{os.environ['PATH']}"})
    _one_line_nothing_written(done, "Slurm does not answer: squeue: error: Unable to contact slurm controller", out)


# ---- local, several groups at once -------------------------------------------------------------

def test_local_workers_run_groups_side_by_side_with_the_same_table(local_table, tmp_path, stop_driver):
    """`executor: {workers: 2}`: the two groups run at once — both children are there together,
    base loading and lora training, each held until the other arrives (one group at a time, the
    second would never come) — and the table is the one-at-a-time run's."""
    config, out, hold = _config(tmp_path / "sweep.yaml", kind="local", workers=2), tmp_path / "out", tmp_path / "h"
    stop_driver(driver := held_sweep(config, out, hold, {"base": "load", "lora": "train"}, ENV))
    _wait_for(lambda: held(hold, "base") and held(hold, "lora"), 300, "both groups running at once")
    release(hold)
    assert driver.wait(timeout=600) == 0, (hold / "driver.stderr").read_text()[-2000:]
    assert _table(out) == local_table


def test_ctrl_c_with_local_workers_leaves_the_running_cells_for_the_next_run(local_table, tmp_path, stop_driver):
    """Ctrl-C (SIGINT to the terminal's process group) while one group trains and the other
    evaluates — both children held there until the interrupt is sent, so the sweep cannot finish
    first —: exit 130, no cell recorded, and the next run finishes the table."""
    config, out, hold = _config(tmp_path / "sweep.yaml", kind="local", workers=2), tmp_path / "out", tmp_path / "h"
    stop_driver(driver := held_sweep(config, out, hold, {"base": "length=256", "lora": "train"}, ENV))
    _wait_for(lambda: held(hold, "base") and held(hold, "lora"), 300, "the lora group training, base evaluating")
    os.killpg(driver.pid, signal.SIGINT)
    release(hold)
    assert driver.wait(timeout=300) == 130, (hold / "driver.stderr").read_text()[-2000:]
    rows = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
    assert rows == []  # the cells in flight are left for the next run, not recorded as failed
    assert _sweep(config, out).returncode == 0
    assert _table(out) == local_table


@pytest.mark.parametrize("slot,workers,gpus,expected", [
    (0, 1, ["0", "1"], {}),  # one at a time: nothing changes
    (0, 2, [], {"OMP_NUM_THREADS": "1"}),
    (1, 2, ["0", "1"], {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "1"}),
    (2, 4, ["3", "5"], {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "3"}),  # GPUs shared in turn
])
def test_local_worker_env_shares_cores_and_gpus(monkeypatch, slot, workers, gpus, expected):
    from longctx.sweep.executors import local_worker_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert local_worker_env(slot, workers, gpus) == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert "OMP_NUM_THREADS" not in local_worker_env(slot, workers, gpus)
