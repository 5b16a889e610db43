"""`longctx train` run directories: continued only with the settings they were trained with (else one
line, exit 2, nothing written), resumed from the last complete checkpoint (a save cut short by
SIGKILL leaves an empty or partial `checkpoint-N/`, ignored)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, longctx_here  # noqa: F401  (a fixture)

from longctx.core.errors import LongctxError
from longctx.training.config import TrainConfig
from longctx.training.train import CHECKPOINT_STATE, SETTINGS_NAME, last_complete_checkpoint, train_adapter


# The run the fixture trains, as `longctx train` arguments (n_validation and eval_every are not
# settings of the adapter: the command's defaults differ from the fixture's and must not matter).
def _args(steps: int = 2) -> list[str]:
    return ["train", "--method", "lora", "--task", "passkey", "--train-length", "96", "--steps", str(steps),
            "--batch-size", "1", "--quiet"]


ARGS = _args()


def _config(out: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"method": "lora", "task": "passkey", "train_length": 96, "out": str(out), "steps": 2,
                          "batch_size": 1, "n_validation": 1, "eval_every": 2, **changes})


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    train_adapter(_config(out), progress=False)
    return out


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    """A copy of the trained run directory, to continue or damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.mark.parametrize("extra, fragment", [
    (["--task", "niah_single"], "task 'passkey', not 'niah_single'"),
    (["--method", "lora-xs"], "method 'lora', not 'lora-xs'"),
    (["--train-length", "128"], "train_length 96, not 128"),
    (["--batch-size", "2"], "batch_size 1, not 2"),
    (["--seed", "1"], "seed 0, not 1"),
    (["--lr", "0.01"], "learning_rate 0.001, not 0.01"),
    (["--chunk-size", "32"], "chunk_size None, not 32"),
    (["--dtype", "bfloat16"], "dtype 'float32', not 'bfloat16'"),
    (["--base", "longctx-tiny-mamba"], "base 'longctx-tiny', not 'longctx-tiny-mamba'"),
    (["--rank", "4"], "recipe field rank 8, not 4"),
    (["--steps", "1"], "has trained 2 steps, more than --steps 1"),
])
def test_a_run_directory_is_not_continued_with_other_settings(extra, fragment, trained, longctx_here):
    before = _snapshot(trained)
    code, _, err = longctx_here(*ARGS, "--out", str(trained), *extra)
    assert_one_line_error(code, err, f"run directory {str(trained)!r}", fragment,
                          "use another --out or remove the directory")
    assert _snapshot(trained) == before  # nothing written: the adapter, its log and checkpoints as they were


def test_the_same_settings_reuse_the_run_and_more_steps_continue_it(run_dir):
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    trained_bytes = adapter.read_bytes()
    train_adapter(_config(run_dir, n_validation=2, eval_every=1), progress=False)  # validation is no setting
    assert adapter.read_bytes() == trained_bytes  # resumed at its last step: the same adapter
    assert json.loads((run_dir / "train_log.json").read_text())["resumed_from"].endswith("checkpoint-2")
    train_adapter(_config(run_dir, steps=3), progress=False)
    log = json.loads((run_dir / "train_log.json").read_text())
    assert log["resumed_from"].endswith("checkpoint-2") and log["config"]["steps"] == 3
    assert adapter.read_bytes() != trained_bytes
    assert last_complete_checkpoint(run_dir / "checkpoints").name == "checkpoint-3"


def test_a_run_from_before_the_settings_file_is_checked_against_its_train_log(run_dir):
    (run_dir / SETTINGS_NAME).unlink()
    with pytest.raises(LongctxError, match="was trained with seed 0, not 5"):
        train_adapter(_config(run_dir, seed=5), progress=False)
    assert not (run_dir / SETTINGS_NAME).exists()
    (run_dir / "train_log.json").unlink()  # checkpoints and an adapter, and nothing saying how they were made
    with pytest.raises(LongctxError, match="holds a trained adapter or checkpoint but no record of its settings"):
        train_adapter(_config(run_dir), progress=False)


def test_another_base_under_the_same_name_is_another_setting(tmp_path, tiny_base_dir):
    from conftest import save_tiny_base

    base = Path(shutil.copytree(tiny_base_dir, tmp_path / "base"))
    cfg = _config(tmp_path / "run", base=str(base), train_length=256, steps=1)
    train_adapter(cfg, progress=False)
    save_tiny_base(base, seed=1)  # retrained in place: same path, other weights
    with pytest.raises(LongctxError, match="was trained with base_fingerprint '[0-9a-f]+', not '[0-9a-f]+'"):
        train_adapter(cfg, progress=False)


def test_the_completeness_marker_is_the_file_trainer_writes_last():
    from transformers.trainer import TRAINER_STATE_NAME

    assert CHECKPOINT_STATE == TRAINER_STATE_NAME


def test_checkpoints_cut_short_are_ignored_and_the_run_resumes_from_the_last_complete_one(run_dir):
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "checkpoint-3").mkdir()  # SIGKILL right after the directory was made
    partial = Path(shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-4"))
    (partial / "trainer_state.json").unlink()  # ... or before Trainer wrote its state, the last file
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-2"
    train_adapter(_config(run_dir, steps=4), progress=False)
    log = json.loads((run_dir / "train_log.json").read_text())
    assert log["resumed_from"].endswith("checkpoint-2")
    assert [h["step"] for h in log["history"] if "loss" in h][-1] == 4


def test_a_run_killed_before_its_first_checkpoint_was_complete_starts_over(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # empty: the SIGKILLed save
    (out / "checkpoints" / "checkpoint-2").mkdir()
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert last_complete_checkpoint(out / "checkpoints") is None
    train_adapter(_config(out), progress=False)
    log = json.loads((out / "train_log.json").read_text())
    assert log["resumed_from"] is None and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_an_out_that_is_a_file_is_refused(tmp_path, longctx_here):
    (tmp_path / "run").write_text("mine")
    code, _, err = longctx_here(*ARGS, "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "is a file, not a run directory")
    assert (tmp_path / "run").read_text() == "mine"
