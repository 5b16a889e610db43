"""A cell's identity is everything that changes its result (design §8, issue 11 part 2): a rerun
with a changed setting re-runs exactly the changed cells, trains a new adapter only where the
training settings (or recipe, or base) changed, moves rows of cells no longer in the config to
the archive, and an unchanged rerun repeats nothing; `--retry-failed`; `demo --quick`'s directory.

The sweep driver runs for real (identities, archive, child processes, time limits); the child is
this file run as a script — `longctx.sweep.child.main` with stand-in training, loading and
evaluation that record each call — so a rerun costs a fraction of a second. `FAKE_SWEEP` (JSON)
tells the stand-ins where to record and which phase should fail how.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from longctx.core.errors import LongctxError

SMALL = {"methods": ["base", "lora"], "tasks": ["passkey"], "lengths": [256, 320], "train_length": 256,
         "train_steps": 2, "batch_size": 2, "num_samples": 1, "chunk_size": 128, "unchunked_methods": ["base"]}
B, L, U = ("base", 128), ("lora", 128), ("base", None)  # (method, chunk size) of the three groups
STUCK_S = 120  # a "sleep" phase blocks far longer than any time limit a test sets


# ---- the stand-in child ------------------------------------------------------------------------

def _spec() -> dict:
    return json.loads(os.environ.get("FAKE_SWEEP", "{}"))


def _act(where: str) -> None:
    """Fail as the spec says for this phase (`train`, `load`, or `method/chunk/length`)."""
    action = _spec().get("fail", {}).get(where)
    if action == "sleep":
        time.sleep(STUCK_S)
    elif action == "memoryerror":
        raise MemoryError("cannot allocate the activations")
    elif action == "torch-oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    elif action == "valueerror":
        raise ValueError("a plain failure")
    elif action == "die-oom":  # an OOM the child cannot catch: message on stderr, then gone
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr, flush=True)
        os._exit(1)
    elif action == "die":
        print("Fatal Python error: Segmentation fault", file=sys.stderr, flush=True)
        os._exit(3)
    elif action == "sigkill":  # what the kernel's OOM killer does
        os.kill(os.getpid(), signal.SIGKILL)


def _record(**entry) -> None:
    with open(_spec()["calls"], "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _fake_train(job) -> None:
    _record(kind="train", out=job.train["out"], steps=job.train["steps"])
    _act("train")
    Path(job.adapter).mkdir(parents=True, exist_ok=True)
    (Path(job.adapter) / "adapter_config.json").write_text("{}")


class _FakeLM:
    description = {"trainable_parameters": 0, "total_parameters": 1}


def _fake_load(job) -> _FakeLM:
    import logging
    import warnings

    warnings.warn("fake-child-warning")  # must reach the log: children do not silence warnings
    logging.getLogger("fake").info("fake-child-info")
    _act("load")
    return _FakeLM()


def _fake_evaluate(lm: _FakeLM, job, length: int, cell_id: str) -> dict:
    group = job.group
    _record(kind="eval", method=group.method, chunk=group.chunk_size, length=length, seed=group.seed,
            cell_id=cell_id)
    _act(f"{group.method}/{group.chunk_size}/{length}")
    return {"n": job.config["num_samples"], "acc": 1.0, "status": "ok", "message": ""}


# ---- helpers -----------------------------------------------------------------------------------

def _stuck_phases(job: dict, fail: dict) -> set[str]:
    """The phases of `job`'s children that the spec makes block ("sleep")."""
    phases = set()
    for where, action in fail.items():
        if action == "sleep" and where in ("train", "load"):
            phases.add(where)
        elif action == "sleep" and where.rsplit("/", 1)[0] == f"{job['method']}/{job['chunk_size']}":
            phases.add(f"length={where.rsplit('/', 1)[1]}")
    return phases


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Sweeps in tmp_path/out with the stand-in child; `fake.run(**changes)` returns the calls.

    The driver's time limits apply to the phases the spec makes block only: on any other phase
    (a child starting up on a loaded machine) a limit would make the verdict depend on speed."""
    from longctx.sweep import supervisor

    monkeypatch.setattr(supervisor, "CHILD", [sys.executable, str(Path(__file__).resolve())])
    monkeypatch.setattr(supervisor, "POLL_S", 0.02)
    supervise = supervisor.supervise

    def stuck_phases_only(job_file, log, limits, extra_env=None):
        stuck = _stuck_phases(json.loads(Path(job_file).read_text()), Fake.fail)
        only = {"cell": None, "train": None, **{p: limits.get(p, limits.get("cell")) for p in stuck}}
        return supervise(job_file, log, only, extra_env)

    monkeypatch.setattr(supervisor, "supervise", stuck_phases_only)

    class Fake:
        out = tmp_path / "out"
        calls = tmp_path / "calls.jsonl"
        fail: dict = {}

        def run(self, fail: dict | None = None, retry_failed: bool = False, **changes) -> list[dict]:
            from longctx.sweep.run import parse_config, run_sweep

            Fake.fail = fail or {}
            self.calls.unlink(missing_ok=True)
            monkeypatch.setenv("FAKE_SWEEP", json.dumps({"calls": str(self.calls), "fail": fail or {}}))
            run_sweep(parse_config({**SMALL, **changes}), self.out, progress=False, retry_failed=retry_failed)
            lines = self.calls.read_text().splitlines() if self.calls.is_file() else []
            return [json.loads(line) for line in lines]

        def cli(self, *args: str, fail: dict | None = None, **changes) -> int:
            """`longctx sweep CONFIG --quiet ARGS` in this process (the stand-in child); its exit status."""
            import yaml

            from longctx.cli import main

            Fake.fail = fail or {}
            monkeypatch.setenv("FAKE_SWEEP", json.dumps({"calls": str(self.calls), "fail": fail or {}}))
            for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):  # main sets them; restored after
                monkeypatch.setenv(name, os.environ.get(name, "1" if "BARS" in name else "error"))
            config = tmp_path / "sweep.yaml"
            config.write_text(yaml.safe_dump({**SMALL, "out": str(self.out), **changes}))
            try:
                return main(["sweep", str(config), "--quiet", *args])
            except SystemExit as exit:
                return exit.code

        def rows(self) -> dict[tuple, dict]:
            from longctx.sweep.results import read_rows

            return {(r["method"], r["chunk_size"], r["length"], r["seed"]): r
                    for r in read_rows(self.out / "results.jsonl")}

    return Fake()


def _evaluated(calls: list[dict]) -> set[tuple]:
    return {(c["method"], c["chunk"], c["length"], c["seed"]) for c in calls if c["kind"] == "eval"}


def _cells(groups, lengths=(256, 320), seed=0) -> set[tuple]:
    return {(m, c, n, seed) for m, c in groups for n in lengths}


def _child_starts(out: Path) -> int:
    return sum(log.read_text().count("==== ") for log in (out / "logs").glob("*.log"))


ALL = _cells([B, L, U])
RERUNS = [  # change, cells evaluated again (or newly), adapters trained, rows archived
    ({}, set(), 0, 0),
    ({"cell_timeout_s": 100, "train_timeout_s": 100}, set(), 0, 0),  # limits change no result
    ({"num_samples": 2}, ALL, 0, 6),
    ({"train_steps": 3}, _cells([L]), 1, 2),
    ({"batch_size": 1}, _cells([L]), 1, 2),
    ({"learning_rate": 0.002}, _cells([L]), 1, 2),
    ({"recipe_overrides": {"lora": {"rank": 4}}}, _cells([L]), 1, 2),
    ({"recipe_overrides": {"base": {}, "lora": {}}}, set(), 0, 0),  # no field changed: same recipe
    ({"dtype": "bfloat16"}, ALL, 1, 6),
    ({"train_length": 320}, _cells([L]), 1, 2),
    ({"chunk_size": 64}, _cells([("base", 64), ("lora", 64)]), 0, 4),
    ({"ssm_carry": "reset"}, _cells([B, L]), 0, 4),  # carry mode: chunked cells only
    ({"haystack": "essay"}, ALL, 0, 6),
    ({"depths": [0.5]}, ALL, 0, 6),
    ({"truncation": "left"}, ALL, 0, 6),
    ({"lengths": [256, 320, 384]}, _cells([B, L, U], [384]), 0, 0),
    ({"lengths": [256]}, set(), 0, 3),
    ({"methods": ["base"]}, set(), 0, 2),
    ({"seeds": [0, 1]}, _cells([B, L, U], seed=1), 1, 0),
]


@pytest.mark.parametrize("change, evaluated, trained, archived", RERUNS,
                         ids=[json.dumps(c) if c else "unchanged" for c, *_ in RERUNS])
def test_a_rerun_reruns_exactly_the_changed_cells(fake, change, evaluated, trained, archived):
    from longctx.sweep.results import ARCHIVE, load_table, read_rows

    first = fake.run()
    assert _evaluated(first) == ALL and sum(c["kind"] == "train" for c in first) == 1
    starts, before = _child_starts(fake.out), (fake.out / "results.jsonl").read_bytes()
    calls = fake.run(**change)
    assert _evaluated(calls) == evaluated
    assert sum(c["kind"] == "train" for c in calls) == trained
    archive = read_rows(fake.out / ARCHIVE) if (fake.out / ARCHIVE).is_file() else []
    assert len(archive) == archived
    current = _current_ids(change)
    assert {r["cell_id"] for r in fake.rows().values()} == current  # the current config's cells, no stale row
    assert len(load_table(fake.out)) == len(current)  # what plots and summaries read
    assert len((fake.out / "results.csv").read_text().splitlines()) == 1 + len(current)
    if not evaluated and not archived:  # nothing to do: no child started, the table untouched
        assert _child_starts(fake.out) == starts and (fake.out / "results.jsonl").read_bytes() == before


def _current_ids(change: dict) -> set[str]:
    from longctx.sweep.run import base_identity, parse_config, plan

    cfg = parse_config({**SMALL, **change})
    return {c["cell_id"] for group in plan(cfg, base_identity(cfg.base)) for c in group.cells}


def test_a_changed_base_reruns_every_cell_and_retrains(fake, monkeypatch):
    from longctx.sweep import run as sweep

    fake.run()
    monkeypatch.setattr(sweep, "base_identity", lambda base: "another-checkpoint")
    calls = fake.run()
    assert _evaluated(calls) == ALL and sum(c["kind"] == "train" for c in calls) == 1
    assert {r["identity"]["base"]["id"] for r in fake.rows().values()} == {"another-checkpoint"}


def test_rows_carry_their_identity_and_a_reverted_setting_reuses_its_adapter(fake):
    from longctx.core.identity import cell_identity

    fake.run()
    for row in fake.rows().values():
        assert row["cell_id"] == cell_identity(row["identity"]) and row["status"] == "ok"
        assert set(row["identity"]) == {"version", "base", "method", "recipe", "training", "task", "evaluation"}
    assert fake.rows()[(*U, 256, 0)]["identity"]["training"] is None  # `base` trains nothing
    assert sum(c["kind"] == "train" for c in fake.run(train_steps=3)) == 1
    assert sum(c["kind"] == "train" for c in fake.run()) == 0  # back to 2 steps: that adapter is cached
    assert len(list((fake.out / "adapters").iterdir())) == 2


def test_failed_cells_are_kept_unless_retry_failed(fake):
    from longctx.sweep.results import ARCHIVE, read_rows

    fail = {"lora/128/320": "valueerror", "base/128/256": "memoryerror", "base/None/320": "sleep"}
    fake.run(fail=fail, cell_timeout_s=3)
    failed = {(*B, 256, 0): "oom", (*L, 320, 0): "error", (*U, 320, 0): "timeout"}
    assert {k: r["status"] for k, r in fake.rows().items() if r["status"] != "ok"} == failed
    assert fake.run() == []  # without --retry-failed: kept as recorded, nothing rerun
    calls = fake.run(retry_failed=True)
    assert _evaluated(calls) == set(failed) and not any(c["kind"] == "train" for c in calls)
    assert all(r["status"] == "ok" for r in fake.rows().values()) and len(fake.rows()) == 6
    archived = read_rows(fake.out / ARCHIVE)
    assert {r["status"] for r in archived} == {"oom", "error", "timeout"}
    assert {r["archive_reason"] for r in archived} == {"retried (--retry-failed)"}
    assert fake.run(retry_failed=True) == []  # nothing failed any more


def test_a_second_sweep_on_the_same_directory_is_refused(fake):
    import fcntl

    fake.out.mkdir()
    with open(fake.out / ".sweep.lock", "a+") as held:  # as a running sweep holds it
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LongctxError, match=r"another sweep \(pid 4242\) is running on"):
            fake.run()
    assert fake.run() and len(fake.rows()) == 6  # released: the next sweep runs


@pytest.mark.parametrize("change", [
    {"train_steps": 3}, {"batch_size": 3}, {"learning_rate": 0.01}, {"dtype": "bfloat16"}, {"train_length": 512},
    {"recipe_overrides": {"lora": {"alpha": 8}}}, {"seed": 1}, {"base_id": "other"},
])
def test_adapter_key_covers_every_training_setting(change):
    from longctx.sweep.group import Group
    from longctx.sweep.run import group_adapter_key, parse_config

    def key(seed=0, base_id="b", **values):
        return group_adapter_key(parse_config({**SMALL, **values}), Group(seed, "lora", "passkey", 128), base_id)

    assert key(**change) != key()


@pytest.mark.parametrize("change", [{"num_samples": 5}, {"chunk_size": 64}, {"ssm_carry": "reset"},
                                    {"haystack": "essay"}, {"truncation": "left"}, {"cell_timeout_s": 5}])
def test_adapter_key_ignores_evaluation_settings(change):
    from longctx.sweep.group import Group
    from longctx.sweep.run import group_adapter_key, parse_config

    group = Group(0, "lora", "passkey", 128)
    assert (group_adapter_key(parse_config({**SMALL, **change}), group, "b")
            == group_adapter_key(parse_config(SMALL), group, "b"))


def test_cell_identity_is_a_stable_hash_of_its_inputs():
    from longctx.core.identity import cell_identity

    assert cell_identity({"a": 1, "b": [1, 2]}) == cell_identity({"b": [1, 2], "a": 1})
    assert cell_identity({"a": 1}) != cell_identity({"a": 2})
    assert cell_identity({"a": 1, "b": [1, 2]}) == "8baa73198470c7bb"  # canonical JSON, sha256: same in any process


def test_base_identity_follows_the_files_not_the_name(tmp_path, monkeypatch):
    from longctx.core import identity
    from longctx.engine.settings import default_base_path
    from longctx.sweep import run as sweep

    copy = tmp_path / "tiny"
    shutil.copytree(default_base_path("longctx-tiny"), copy)
    original = sweep.base_identity(str(copy))
    assert original == sweep.base_identity("longctx-tiny")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert sweep.base_identity(str(copy)) != original
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 1024)  # large files: sampled blocks, the end included
    sampled = sweep.base_identity(str(copy))
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert sweep.base_identity(str(copy)) != sampled
    assert sweep.base_identity("no-such/hub-model") == "name:no-such/hub-model"


class _Engine:
    """A cluster engine standing in for Slurm: its first submission vanishes (cancelled, a node
    lost), later ones run their bundles here, at once; no job is ever alive afterwards."""

    name, outlives_driver, submitted = "slurm", True, []

    def __init__(self, cfg, out) -> None:
        pass

    def submit(self, work, bundles: list[list[str]]) -> list[str]:
        first = not _Engine.submitted
        for bundle in bundles:
            if not first:
                work(bundle)
            _Engine.submitted.append(bundle)
        return [f"job{len(_Engine.submitted) - len(bundles) + i}" for i in range(len(bundles))]

    def alive(self, job_ids: list[str]) -> dict[str, str]:
        return {}


def test_retry_failed_gives_groups_that_used_their_attempts_fresh_ones(fake, monkeypatch):
    """A group whose jobs all vanished is given up after `max_attempts` (error rows); a plain rerun
    keeps those rows, and `--retry-failed` really submits it again (its attempts start afresh)."""
    from longctx.sweep import cluster, executors
    from longctx.sweep.results import ARCHIVE, read_rows

    monkeypatch.setitem(executors.ENGINES, "slurm", _Engine)
    monkeypatch.setattr(cluster, "POLL_S", 0)
    monkeypatch.setattr(_Engine, "submitted", [])
    one_try = {"executor": {"kind": "slurm", "gpus_per_cell": 0, "max_attempts": 1}, "unchunked_methods": []}
    fake.run(**one_try)
    assert len(_Engine.submitted) == 2 and {r["status"] for r in fake.rows().values()} == {"error"}
    assert all("the 1 job(s) submitted for this cell ended without a result" in r["message"]
               for r in fake.rows().values())
    fake.run(**one_try)  # failed rows are kept as recorded: nothing submitted
    assert len(_Engine.submitted) == 2
    calls = fake.run(retry_failed=True, **one_try)
    assert len(_Engine.submitted) == 4 and _evaluated(calls) == _cells([B, L])
    assert {r["status"] for r in fake.rows().values()} == {"ok"} and len(read_rows(fake.out / ARCHIVE)) == 4
    state = json.loads((fake.out / "dispatch.json").read_text())
    assert sorted(s["attempts"] for s in state.values()) == [1, 1]


def test_quick_demo_has_its_own_directory(tmp_path, monkeypatch):
    """`longctx demo --quick` then `longctx demo`: the quick 2-sample cells never reach runs/demo."""
    from longctx import demo
    from longctx.cli import build_parser

    runs = []
    monkeypatch.setattr(demo, "run_sweep", lambda cfg, where, **kw: runs.append((cfg, Path(where))) or Path(where))
    monkeypatch.setattr(demo, "_report", lambda results, title: [])
    monkeypatch.chdir(tmp_path)
    for quick in (True, False):
        args = build_parser().parse_args(["demo"] + ["--quick"] * quick)
        demo.run_demo(args.out, quick=args.quick)
    assert [where for _, where in runs] == [Path("runs/demo-quick"), Path("runs/demo-quick/mamba"),
                                            Path("runs/demo"), Path("runs/demo/mamba")]
    assert [cfg.num_samples for cfg, _ in runs] == [2, 2, 10, 10]
    assert [cfg.out for cfg, _ in runs] == [str(where) for _, where in runs]
    assert demo.demo_parts("x", quick=True)[1][1] == Path("x/mamba")  # --out still wins


if __name__ == "__main__":  # the stand-in child
    from longctx.sweep.child import main

    main(sys.argv[1:], evaluate=_fake_evaluate, load=_fake_load, trainer=_fake_train)


def test_a_demo_with_no_ok_cell_says_so_and_exits_1(fake, tmp_path, monkeypatch, capsys):
    """Every child fails to load its model: `longctx demo` draws nothing, says for each part how
    its table ended, and exits 1 (as `longctx sweep` does), instead of 0 over an empty demo."""
    from longctx.cli import main

    monkeypatch.setenv("FAKE_SWEEP", json.dumps({"calls": str(fake.calls), "fail": {"load": "valueerror"}}))
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--quick", "--out", str(out)])
    assert exit_.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("longctx")]
    assert err == [f"longctx: sweep finished with 0 of 8 cells ok (8 error); see {out / 'results.jsonl'}",
                   f"longctx: sweep finished with 0 of 4 cells ok (4 error); see {out / 'mamba' / 'results.jsonl'}"]
    assert not (out / "plots").exists() and not (out / "mamba" / "plots").exists()
