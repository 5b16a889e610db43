"""A `longctx sweep` whose cell children stop at a chosen phase until the test releases them, so
that a test can interrupt, kill or observe a sweep mid-flight whatever the machine's speed (a
test that waited for a log line and then acted raced with the work: on a loaded machine the
work could finish first, or be slower than a fixed delay).

`held_sweep` starts this file as a script: in `driver` mode it runs the `longctx` command line
with every sweep child replaced by this file in `child` mode — locally and on Ray or Slurm
workers (the work function is defined here, in `__main__`, so it is pickled by value and the
workers run it). A child whose method is in the hold spec, on reaching its phase, creates
`DIR/held-<method>-<pid>` and waits until `DIR/release` exists, then goes on as the real child.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HOLD = "LONGCTX_TEST_HOLD"  # the environment variable holding the spec: {"dir": ..., "at": {method: phase}}
ROOT = Path(__file__).resolve().parent.parent


def held_sweep(config: Path, out: Path, hold: Path, at: dict[str, str], env: dict[str, str]) -> subprocess.Popen:
    """`longctx sweep CONFIG --out OUT --quiet` in the background (its own session; stderr in
    hold/driver.stderr), each child of method m stopping at phase `at[m]` (`train`, `load`,
    `length=L`) until `release(hold)`."""
    hold.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "driver", "sweep", str(config), "--out", str(out), "--quiet"]
    with open(hold / "driver.stderr", "wb") as stderr:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, start_new_session=True,
                                env={**env, HOLD: json.dumps({"dir": str(hold), "at": at})})


def held(hold: Path, method: str) -> int | None:
    """The pid of a child of `method` waiting at its phase (None while there is none)."""
    found = sorted(hold.glob(f"held-{method}-*"))
    return int(found[0].name.rsplit("-", 1)[1]) if found else None


def release(hold: Path) -> None:
    """Let every held child (and any later one) go on."""
    (hold / "release").touch()


def parent_of(pid: int) -> int:
    """The parent process of `pid` (a held child's: the worker that runs its group)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def _driver(argv: list[str]) -> int:
    from longctx.cli import main
    from longctx.sweep import cluster, supervisor

    child = [sys.executable, str(Path(__file__).resolve()), "child"]
    supervisor.CHILD = child
    work = cluster.work

    def held_work(job_files: list[str]) -> None:  # runs on a cluster worker, pickled by value
        supervisor.CHILD = child
        work(job_files)

    cluster.work = held_work
    return main(argv)


def _child(argv: list[str]) -> None:
    from longctx.sweep import cell as sweep_cell
    from longctx.sweep import child

    spec = json.loads(os.environ[HOLD])
    method, hold = json.loads(Path(argv[0]).read_text())["method"], Path(spec["dir"])
    phase = child.phase

    def held_phase(name: str) -> None:
        phase(name)
        if spec["at"].get(method) == name and not (hold / "release").exists():
            (hold / f"held-{method}-{os.getpid()}").touch()
            while not (hold / "release").exists():
                time.sleep(0.05)

    child.phase = held_phase  # what `child.run` calls before each phase
    sweep_cell.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "driver":
        sys.exit(_driver(sys.argv[2:]))
    _child(sys.argv[2:])
