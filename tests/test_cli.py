"""The `longctx` command: real runs, and bad input as one line with exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import tiny_llama

from longctx.adapters import wrap


def longctx(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "longctx.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def longctx_here(capsys, monkeypatch):
    """`longctx ARGS` through `longctx.cli.main` in this process (what the console script calls;
    no interpreter start-up per call): (exit status, stdout, stderr). An exception that escapes
    `main` fails the test, as a traceback would fail `assert_one_line_error`."""
    from transformers.utils import logging as hf_logging

    from longctx import cli

    # main() turns transformers' progress bars off through the environment, which transformers read
    # when this process imported it: turn them off here too, for this test only.
    monkeypatch.setattr(hf_logging, "_tqdm_active", False)
    for key in ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS",
                "TRANSFORMERS_VERBOSITY"):  # main() sets these: keep them to this test
        monkeypatch.setenv(key, os.environ.get(key, "1" if key.endswith("OFFLINE") else "error"))

    def run(*args):
        try:
            code = cli.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_params_on_llama_2_7b_shapes_shows_the_ssmlora_to_lora_ratio():
    code, out, err = longctx("params", "--base", "shape:llama-2-7b", "--method", "lora,ssmlora")
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "4,194,304" in lines["lora"] and "2,101,248" in lines["ssmlora"]
    assert lines["ssmlora"].rstrip().endswith("0.50")


def test_forward_runs_every_method_chunked_and_matches_unchunked(tiny_base_dir):
    code, out, err = longctx("forward", "--base", str(tiny_base_dir), "--length", "300",
                             "--chunk-size", "64", "--init", "random")
    assert code == 0, err
    rows = out.splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["base", "dense", "lora", "ssmlora", "ssmlora-scan", "lora-xs"], out
    for row in rows:
        delta = float(row.split()[-1])
        assert delta < 1e-3 or row.startswith("ssmlora "), row


@pytest.mark.parametrize("args, fragments", [
    (["forward", "--method", "lorax"], ["unknown method 'lorax'", "valid choices: base, dense, lora"]),
    (["forward", "--chunk-size", "0"], ["chunk_size must be a positive integer, got '0'"]),
    (["forward", "--chunk-size", "abc"], ["chunk_size must be a positive integer, got 'abc'"]),
    (["forward", "--ssm-carry", "keep"], ["unknown ssm_carry 'keep'"]),
    (["params", "--base", "shape:gpt-9"], ["unknown model shape 'gpt-9'", "llama-2-7b"]),
    (["params", "--base", "/no/such/model"], ["cannot load base model '/no/such/model'"]),
    (["pretrain", "--out", "x", "--arch", "rwkv"], ["rwkv", "llama"]),
    (["pretrain", "--out", "x", "--set", "widht=3"], ["unknown recipe field 'widht'", "hidden_size"]),
    (["pretrain", "--out", "x", "--set", "recall_steps=lots"], ["recall_steps: 'lots' is not a valid int"]),
    (["pretrain", "--out", "x", "--set", "steps=5"], ["recipe field steps: set it with --steps"]),
    (["pretrain", "--out", "x", "--set", "mixed_blocks=text"], ["unknown mixed_blocks 'text'", "copy, mqar, table"]),
    (["pretrain", "--out", "x", "--set", "precision=fp16"], ["unknown precision 'fp16'", "bf16, fp32"]),
    (["pretrain", "--out", "x", "--set", "recall_advance=1.5"], ["recall_advance: 1.5 is not an accuracy in [0, 1]"]),
    (["pretrain", "--out", "x", "--set", "state_size=0"], ["state_size: 0 is not a positive int"]),
    (["pretrain", "--out", "x", "--time-limit", "0"], ["time limit: 0.0 is not a positive number of minutes"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
])
def test_bad_input_is_one_line_exit_2(args, fragments, tiny_base_dir, longctx_here):
    args = [*args, "--base", str(tiny_base_dir)] if args[0] == "forward" else args
    code, _, err = longctx_here(*args)
    assert_one_line_error(code, err, *fragments)


def test_bad_input_from_the_real_command_is_one_line_exit_2():
    """The same through the interpreter (`python -m longctx.cli`): nothing but the one line."""
    code, _, err = longctx("forward", "--method", "lorax")
    assert_one_line_error(code, err, "unknown method 'lorax'", "valid choices: base, dense, lora")


def test_missing_corrupt_or_foreign_adapter_directory(tiny_base_dir, tmp_path, longctx_here):
    base = ["forward", "--base", str(tiny_base_dir), "--length", "200", "--adapter"]
    assert_one_line_error(*longctx_here(*base, str(tmp_path / "none"))[::2], "does not exist")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{")
    assert_one_line_error(*longctx_here(*base, str(tmp_path / "bad"))[::2], "corrupt")
    wrap(tiny_llama(seed=5), "ssmlora").save(tmp_path / "foreign")
    assert_one_line_error(*longctx_here(*base, str(tmp_path / "foreign"))[::2], "fingerprint")


def test_length_beyond_the_position_limit(tiny_base_dir, longctx_here):
    code, _, err = longctx_here("forward", "--base", str(tiny_base_dir), "--length", "4096")
    assert_one_line_error(code, err, "position limit of 512", "rope_scaling")


def test_the_command_keeps_hugging_face_offline_unless_told_otherwise():
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, which the command modules do: main()
    # sets the defaults before it imports them. Importing longctx.cli itself imports neither them
    # nor torch (so `--help` and a bad argument answer at once) and changes no environment.
    script = ("import os, sys\n"
              "import longctx.cli as cli\n"
              "assert not {'torch', 'huggingface_hub', 'longctx.commands'} & set(sys.modules)\n"
              "assert os.environ.get('HF_HUB_OFFLINE') in (None, '0')\n"
              "cli.main(['params', '--base', 'shape:llama-2-7b', '--method', 'lora'])\n"
              "import huggingface_hub.constants as hub\n"
              "print('OFFLINE', hub.HF_HUB_OFFLINE)\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    for extra, expected in (({}, "OFFLINE True"), ({"HF_HUB_OFFLINE": "0"}, "OFFLINE False")):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             env={**env, **extra})
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip().splitlines()[-1] == expected
