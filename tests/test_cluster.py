"""Sweeps on real cluster engines (issue 13): a single-node Slurm started here from the operating
system's packages (skipped, with the reason, where it cannot start) and a local Ray cluster.
Each run is interrupted the hard way — an array task `scancel`led and the driver SIGKILLed
(Slurm), a worker killed mid-cell (Ray) — then finished, and must end with every cell exactly
once and the same table as a local run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import SWEEP_SMOKE
from longctx.errors import LongctxError

ROOT = Path(__file__).resolve().parent.parent
SMALL = SWEEP_SMOKE
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
pytestmark = pytest.mark.slow


def _config(path: Path, **executor) -> Path:
    path.write_text(yaml.safe_dump({**SMALL, "executor": executor}))
    return path


def _sweep(config: Path, out: Path, *extra: str, env=None, background: bool = False):
    cmd = [sys.executable, "-m", "longctx.cli", "sweep", str(config), "--out", str(out), "--quiet", *extra]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env or ENV, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, cwd=ROOT, timeout=600)


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


def _log_says(out: Path, method: str, text: str) -> bool:
    return any(text in p.read_text(errors="replace") for p in (out / "logs").glob(f"{method}-*.log")) \
        if (out / "logs").is_dir() else False


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


def test_slurm_sweep_survives_scancel_and_a_killed_driver(slurm, local_table, tmp_path):
    config, out = _config(tmp_path / "sweep.yaml", kind="slurm", gpus_per_cell=0), tmp_path / "out"
    driver = _sweep(config, out, env=slurm, background=True)
    _wait_for(lambda: _log_says(out, "lora", "begin train"), 180, "the lora task to start training")
    lora = next(s["job"] for tag, s in _state(out).items() if tag.startswith("lora-"))
    subprocess.run(["scancel", lora], env=slurm, check=True)  # an array task killed mid-cell
    driver.send_signal(signal.SIGKILL)  # and the driver with it: nothing may depend on it
    driver.wait()
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

def _worker_of(method: str) -> int | None:
    """PID of the Ray worker running `method`'s group: the parent of its sweep_cell child."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "longctx.sweep_cell" in cmd and f"/{method}-" in cmd:
                status = (proc / "status").read_text()
                return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        except (OSError, ValueError, StopIteration):
            continue
    return None


def test_ray_sweep_survives_a_worker_killed_mid_cell(local_table, tmp_path):
    pytest.importorskip("ray", reason="the Ray executor needs `pip install longctx[cluster]`")
    config, out = _config(tmp_path / "sweep.yaml", kind="ray", ray_num_cpus=2, gpus_per_cell=0), tmp_path / "out"
    driver = _sweep(config, out, background=True)
    _wait_for(lambda: _log_says(out, "lora", "begin length=256") and _worker_of("lora"), 180,
              "the lora task to evaluate its first cell")
    os.kill(_worker_of("lora"), signal.SIGKILL)
    assert driver.wait(timeout=600) == 0
    assert _table(out) == local_table
    assert {tag.split("-")[0]: s["attempts"] for tag, s in _state(out).items()} == {"base": 1, "lora": 2}


def test_missing_extra_and_bad_executor_settings_are_one_line(tmp_path, monkeypatch):
    import importlib.util

    from longctx.executors import parse_executor, require

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


# ---- local, several groups at once -------------------------------------------------------------

def _span(log: Path) -> tuple[float, float]:
    """(start, end) of a group's log: its first child's stamp ("==== 2026-11-26T19:40:01 longctx
    sweep: ..."), to the second, and its last write."""
    stamp = log.read_text().split("\n", 1)[0].split()[1]
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")), log.stat().st_mtime


def test_local_workers_run_groups_side_by_side_with_the_same_table(local_table, tmp_path):
    """`executor: {workers: 2}`: the two groups run at once (each child with one of the two cores'
    threads), and the table is the one-at-a-time run's."""
    config, out = _config(tmp_path / "sweep.yaml", kind="local", workers=2), tmp_path / "out"
    done = _sweep(config, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _table(out) == local_table
    spans = {log.name.split("-")[0]: _span(log) for log in (out / "logs").glob("*.log")}
    assert set(spans) == {"base", "lora"}
    (base_start, base_end), (lora_start, lora_end) = spans["base"], spans["lora"]
    assert lora_start < base_end - 2 and base_start < lora_end - 2, spans  # overlapping by seconds


def test_ctrl_c_with_local_workers_leaves_the_running_cells_for_the_next_run(local_table, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while two groups train and evaluate: exit
    130, no cell recorded as failed, and the next run finishes the table."""
    config, out = _config(tmp_path / "sweep.yaml", kind="local", workers=2), tmp_path / "out"
    cmd = [sys.executable, "-m", "longctx.cli", "sweep", str(config), "--out", str(out), "--quiet"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
                              start_new_session=True)
    _wait_for(lambda: _log_says(out, "lora", "begin train"), 180, "the lora group to start training")
    os.killpg(driver.pid, signal.SIGINT)
    assert driver.wait(timeout=120) == 130, driver.stderr.read()[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] \
        if (out / "results.jsonl").exists() else []
    assert all(r["status"] == "ok" for r in rows), rows
    assert _sweep(config, out).returncode == 0
    assert _table(out) == local_table


@pytest.mark.parametrize("slot,workers,gpus,expected", [
    (0, 1, ["0", "1"], {}),  # one at a time: nothing changes
    (0, 2, [], {"OMP_NUM_THREADS": "1"}),
    (1, 2, ["0", "1"], {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "1"}),
    (2, 4, ["3", "5"], {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "3"}),  # GPUs shared in turn
])
def test_local_worker_env_shares_cores_and_gpus(monkeypatch, slot, workers, gpus, expected):
    from longctx.executors import local_worker_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert local_worker_env(slot, workers, gpus) == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert "OMP_NUM_THREADS" not in local_worker_env(slot, workers, gpus)
