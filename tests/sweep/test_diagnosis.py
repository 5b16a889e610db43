"""Diagnosable sweeps (issue 11 part 5): each cell's full log kept under the results directory and
named in its row; a per-cell time limit recorded as `timeout`; out-of-memory in training or
evaluation recorded as `oom` for that cell only; the sweep goes on with the other cells, and
its exit status says whether any cell is ok (a one-line summary when some are not).

Uses the stand-in child of test_sweep_reruns (the real driver, a fast child); one test runs the
real child under a time limit it cannot meet.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_reruns import SMALL, fake  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[2]
ONE = {"unchunked_methods": []}  # base and lora, chunked: two groups of two lengths
B256, B320, L256, L320 = (("base", 128, 256, 0), ("base", 128, 320, 0), ("lora", 128, 256, 0),
                          ("lora", 128, 320, 0))

FAILURES = [  # where it fails and how, the status of each failed cell, a word its message has
    ({"base/128/320": "memoryerror"}, {B320: "oom"}, "MemoryError"),
    ({"base/128/256": "torch-oom"}, {B256: "oom"}, "CUDA out of memory"),
    ({"base/128/256": "die-oom"}, {B256: "oom"}, "CUDA out of memory"),  # the child dies: the next length still runs
    ({"lora/128/320": "sigkill"}, {L320: "oom"}, "SIGKILL"),
    ({"lora/128/256": "die"}, {L256: "error"}, "Segmentation fault"),
    ({"lora/128/256": "valueerror"}, {L256: "error"}, "ValueError: a plain failure"),
    ({"train": "memoryerror"}, {L256: "oom", L320: "oom"}, "training failed: MemoryError"),
    ({"train": "die-oom"}, {L256: "oom", L320: "oom"}, "CUDA out of memory"),
    ({"load": "die"}, {B256: "error", B320: "error", L256: "error", L320: "error"}, "Segmentation fault"),
    ({"base/128/256": "sleep"}, {B256: "timeout"}, "evaluating length 256 exceeded cell_timeout_s=3 s"),
    ({"train": "sleep"}, {L256: "timeout", L320: "timeout"}, "training the adapter exceeded train_timeout_s=3 s"),
]


@pytest.mark.parametrize("fail, failed, word", FAILURES, ids=[next(iter(f.items()))[0] + ":" + next(iter(f.values()))
                                                             for f, *_ in FAILURES])
def test_a_failing_cell_is_recorded_with_its_status_and_the_others_run(fake, fail, failed, word):
    """The limits of 3 s bind only the phase that blocks (`fake`): "sleep" blocks for STUCK_S, so a
    `timeout` row shows it was killed at its limit, not waited for; every other verdict is
    reached with no time limit at all, whatever the machine's speed."""
    fake.run(fail=fail, cell_timeout_s=3, train_timeout_s=3, **ONE)
    rows = fake.rows()
    assert set(rows) == {B256, B320, L256, L320}  # every cell recorded once
    assert {k: r["status"] for k, r in rows.items() if r["status"] != "ok"} == failed
    for key in failed:
        assert word in rows[key]["message"] and "\n" not in rows[key]["message"]
    for row in rows.values():  # the full log, tracebacks included, is where the row says
        log = Path(row["log"])
        assert log.is_file() and log.parent == fake.out / "logs"
        text = log.read_text()
        assert f"longctx-sweep-cell: begin length={row['length']}" in text or row["status"] != "ok"
        if row["status"] in ("oom", "error") and "SIGKILL" not in row["message"]:  # the message is from the log
            assert row["message"].split(":")[-1].strip() in text


def test_the_log_keeps_warnings_logging_and_tracebacks(fake):
    fake.run(fail={"lora/128/320": "valueerror"}, **ONE)
    rows = fake.rows()
    logs = {row["log"] for row in rows.values()}
    assert len(logs) == 2  # one per child group, named in each of its rows
    text = Path(rows[("lora", 128, 320, 0)]["log"]).read_text()
    assert "fake-child-warning" in text and "fake-child-info" in text  # not silenced
    assert "Traceback (most recent call last)" in text and "ValueError: a plain failure" in text
    assert (fake.out / "logs" / Path(rows[("lora", 128, 320, 0)]["log"]).with_suffix(".job.json").name).is_file()


def test_a_rerun_appends_to_the_log_of_the_same_cells(fake):
    fake.run(fail={"base/128/320": "valueerror"}, **ONE)
    log = Path(fake.rows()[("base", 128, 320, 0)]["log"])
    fake.run(retry_failed=True, **ONE)
    assert Path(fake.rows()[("base", 128, 320, 0)]["log"]) == log
    assert log.read_text().count("==== ") == 2  # both attempts, each headed


def test_the_exit_status_says_whether_any_cell_is_ok(fake, capsys):
    """No cell ok: exit 1 and one line counting the statuses; some failed: exit 0, the same line."""
    results = fake.out / "results.jsonl"
    assert fake.cli(fail={"load": "valueerror"}) == 1  # every child fails to load: 6 error rows
    assert capsys.readouterr().err.splitlines() == [
        f"longctx: sweep finished with 0 of 6 cells ok (6 error); see {results}"]
    fail = {"lora/128/320": "valueerror", "base/None/256": "memoryerror"}
    assert fake.cli("--retry-failed", fail=fail) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"longctx: sweep finished with 4 of 6 cells ok (1 oom, 1 error); see {results}"]
    assert fake.cli("--retry-failed") == 0 and capsys.readouterr().err == ""  # every cell ok: nothing to say
    assert all(r["status"] == "ok" for r in fake.rows().values())


def test_the_real_child_is_killed_at_its_time_limit(tmp_path):
    """The real `longctx.sweep.cell` cannot import torch and load a model in 0.2 s: recorded; no cell
    ok, so exit status 1 with a one-line summary."""
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "methods": ["base"], "unchunked_methods": [], "cell_timeout_s": 0.2,
                                      "out": str(tmp_path / "out")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "longctx.cli", "sweep", str(config), "--quiet"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    summary = f"longctx: sweep finished with 0 of 2 cells ok (2 timeout); see {tmp_path / 'out' / 'results.jsonl'}"
    assert run.stderr.strip().splitlines() == [summary] and "results:" in run.stdout
    from longctx.sweep.results import read_rows

    rows = read_rows(tmp_path / "out" / "results.jsonl")
    assert [r["status"] for r in rows] == ["timeout", "timeout"]
    assert all("cell_timeout_s=0.2 s" in r["message"] and Path(r["log"]).is_file() for r in rows)
