"""Training, sweeps and the demo: answer-only loss, checkpoint resume, a sweep that survives
SIGKILL at any moment, failing cells recorded, bad configs refused with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SWEEP_SMOKE

from longctx.core.errors import LongctxError
from longctx.core.resources import preset_dir
from longctx.sweep.results import COLUMNS, cell_key, read_rows

ROOT = Path(__file__).resolve().parents[2]
# `longctx ARGS` as the console script runs it; a `sweep` also checks that its process (the driver:
# config, plan, dispatch, the table) never imported torch, exiting 99 if it did (its cells run in
# child processes, which do).
DRIVER = ("import sys\nfrom longctx.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
          "except SystemExit as exit_:\n    code = exit_.code\n"
          "sys.exit(99 if sys.argv[1] == 'sweep' and 'torch' in sys.modules else code)")
LONGCTX = [sys.executable, "-c", DRIVER]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMOKE = SWEEP_SMOKE


def _config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SMOKE, "out": str(tmp_path / "out"), **changes}))
    return path


def _longctx(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*LONGCTX, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def test_training_loss_covers_answer_tokens_only():
    from transformers import AutoTokenizer

    from longctx.engine.settings import default_base_path
    from longctx.tasks import generate
    from longctx.training.train import encode_examples, pad_batch

    tok = AutoTokenizer.from_pretrained(default_base_path())
    (example,) = generate("passkey", tok, 256, 1, split="train")
    (row,) = encode_examples(tok, [example])
    answer = [t for t in row["labels"] if t != -100]
    assert tok.decode(answer) == example.target
    assert row["labels"][-len(answer):] == row["input_ids"][-len(answer):]
    batch = pad_batch([row, {"input_ids": [5, 6], "labels": [-100, 6]}], pad_id=0)
    assert batch["labels"].shape == batch["input_ids"].shape and int((batch["labels"][1] != -100).sum()) == 1


@pytest.mark.slow
def test_train_writes_adapter_and_log_and_resumes_from_its_checkpoint(tmp_path):
    from longctx.training.config import TrainConfig
    from longctx.training.train import train_adapter

    cfg = TrainConfig(method="lora", task="passkey", train_length=128, out=str(tmp_path / "run"), steps=4,
                      batch_size=2, n_validation=2, eval_every=2)
    adapter = train_adapter(cfg, progress=False)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["resumed_from"] is None and any("loss" in h for h in log["history"])
    assert [h["step"] for h in log["history"] if "validation_accuracy" in h][:2] == [2, 4]
    cfg.steps = 6
    train_adapter(cfg, progress=False)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["resumed_from"] and log["resumed_from"].endswith("checkpoint-4")


@pytest.mark.parametrize("change, message", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"task": "nope"}, "unknown task 'nope'"),
    ({"method": "base"}, "no trainable parameters"),
])
def test_train_refuses_bad_input(change, message, tmp_path):
    from longctx.training.config import TrainConfig
    from longctx.training.train import train_adapter

    cfg = TrainConfig(**{"method": "lora", "task": "passkey", "train_length": 128, "out": str(tmp_path / "r"),
                         **change})
    with pytest.raises(LongctxError, match=message):
        train_adapter(cfg, progress=False)
    assert not (tmp_path / "r" / "adapter").exists()


def _complete(out: Path, expected: int) -> list[dict]:
    rows = read_rows(out / "results.jsonl")
    lines = [line for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    assert len(lines) == len(rows) == expected  # every cell exactly once, every line parses
    assert all(json.loads(line).keys() == set(COLUMNS) for line in lines)
    return rows


@pytest.mark.slow
def test_sweep_survives_sigkill_at_several_points(sigkilled_local_sweep):
    """The sweep SIGKILLed four times mid-flight, then finished (`conftest.sigkilled_local_sweep`)."""
    config, out = sigkilled_local_sweep["config"], sigkilled_local_sweep["out"]
    rows = _complete(out, expected=4)
    assert {cell_key(r)[:3] for r in rows} == {(m, "passkey", n) for m in ("base", "lora") for n in (256, 320)}
    assert all(r["status"] == "ok" for r in rows)
    again = _longctx("sweep", str(config), "--quiet")  # nothing left: nothing repeated
    assert again.returncode == 0 and _complete(out, expected=4) == rows
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].split(",") == list(COLUMNS)


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_rest_completes(tmp_path):
    config = _config(tmp_path, methods=["base"], lengths=[256, 5000], unchunked_methods=["base"])
    run = _longctx("sweep", str(config), "--quiet")
    assert run.returncode == 0, run.stderr[-2000:]  # some cells ok: exit 0, the failures summed up in one line
    results = tmp_path / "out" / "results.jsonl"
    assert run.stderr.splitlines() == [f"longctx: sweep finished with 2 of 4 cells ok (2 error); see {results}"]
    rows = {(r["length"], r["chunk_size"]): r for r in _complete(tmp_path / "out", expected=4)}
    assert rows[(256, 128)]["status"] == rows[(256, None)]["status"] == "ok"
    for chunk in (128, None):
        failed = rows[(5000, chunk)]
        assert failed["status"] == "error" and "limit of 4096 tokens" in failed["message"]
        log = Path(failed["log"]).read_text()  # the child's whole output, lm-eval's logging included
        assert Path(failed["log"]).parent == tmp_path / "out" / "logs"
        assert "longctx-sweep-cell: begin length=5000" in log and "INFO lm_eval" in log
    assert all(r["cell_id"] and r["identity"]["task"]["length"] == r["length"] for r in rows.values())


@pytest.mark.parametrize("change, message", [
    ({"methods": None}, "missing the key 'methods'"),
    ({"methods": ["nope"]}, "unknown method 'nope'"),
    ({"tasks": ["nope"]}, "unknown task 'nope'"),
    ({"lengths": []}, "lengths in"),
    ({"lengths": [-3]}, "length -3"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"ssm_carry": "sometimes"}, "unknown ssm_carry 'sometimes'; valid choices: chunk, reset"),
    ({"cell_timeout_s": -5}, "cell_timeout_s must be a positive number, got -5"),
    ({"lengths": [256, 256]}, "bad.yaml lists 256 twice; give each value once"),
    ({"train_steps": "4"}, "bad.yaml must be an integer, got '4'"),
    ({"executor": {"kind": "ray", "ray_num_cpus": 0}}, "executor.ray_num_cpus=0 leaves no room for a cell group"),
])
def test_bad_sweep_configs_are_one_line_exit_2_and_write_nothing(change, message, tmp_path):
    values = {**SMOKE, "out": str(tmp_path / "out"), **change}
    values = {k: v for k, v in values.items() if v is not None}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(values))
    run = _longctx("sweep", str(tmp_path / "bad.yaml"), timeout=120)
    assert run.returncode == 2 and message in run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_output_directory_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run = _longctx("sweep", str(_config(tmp_path)), "--out", str(blocker / "out"), timeout=120)
    assert run.returncode == 2 and "cannot write to output directory" in run.stderr
    assert run.stderr.count("\n") == 1


def test_missing_config_file_is_one_line_exit_2(tmp_path):
    run = _longctx("sweep", str(tmp_path / "absent.yaml"), timeout=120)
    assert run.returncode == 2 and "does not exist" in run.stderr


def test_resuming_a_results_directory_on_another_base_is_refused(tmp_path):
    from longctx.sweep.results import append_row

    out = tmp_path / "out"
    out.mkdir()
    append_row(out / "results.jsonl", {"method": "base", "base": "longctx-tiny", "task": "passkey", "length": 256,
                                       "seed": 0, "chunk_size": 128, "status": "ok", "n": 1, "acc": 1.0})
    before = (out / "results.jsonl").read_bytes()
    run = _longctx("sweep", str(_config(tmp_path, base="longctx-tiny-mamba")), timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "holds results on base 'longctx-tiny'" in run.stderr and "'longctx-tiny-mamba'" in run.stderr
    assert (out / "results.jsonl").read_bytes() == before and not (out / "results.csv").exists()


@pytest.mark.slow
def test_quick_demo_runs_both_bases_and_reports_them(tmp_path):
    """The README's main command, shortened: both sweeps, their plots and summaries."""
    run = _longctx("demo", "--quick", "--out", str(tmp_path / "demo"), timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    for results, base, methods in [(tmp_path / "demo", "longctx-tiny", 4), (tmp_path / "demo" / "mamba",
                                                                           "longctx-tiny-mamba", 2)]:
        rows = read_rows(results / "results.jsonl")
        assert {r["base"] for r in rows} == {base} and all(r["status"] == "ok" for r in rows), rows
        assert len({r["method"] for r in rows}) == methods
        assert (results / "plots" / "accuracy_vs_length.png").is_file() and (results / "results.csv").is_file()
        assert f"== {base}: {results / 'results.csv'} ==" in run.stdout
    assert "sdlora" in run.stdout and "ssmlora-scan" in run.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + sorted(preset_dir().glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_configs_and_presets_parse(path):
    from longctx.engine.gguf import REAL_BASES
    from longctx.engine.settings import EMBEDDED_BASES
    from longctx.sweep.run import load_config

    cfg = load_config(path)
    assert cfg.base in {**EMBEDDED_BASES, **REAL_BASES}
    assert "sdlora" not in cfg.methods or EMBEDDED_BASES[cfg.base] == "mamba"  # SDLoRA is Mamba-only


def test_the_demo_runs_the_presets_which_a_sweep_names():
    from longctx.demo import DEMO, DEMO_MAMBA
    from longctx.sweep.config import load_config, presets

    assert set(presets()) == {"demo", "demo-mamba"}
    assert load_config("demo") == DEMO and load_config("demo-mamba") == DEMO_MAMBA
    for cfg in (DEMO, DEMO_MAMBA):
        assert max(cfg.lengths) >= 8 * cfg.train_length  # the demo evaluates 1× to 8×
    with pytest.raises(LongctxError, match="'nodemo' does not exist and is no preset .presets: demo, demo-mamba.$"):
        load_config("nodemo")
