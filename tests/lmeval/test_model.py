"""The `ssmlora` lm-eval model type and the task YAMLs, through lm-eval's own machinery:
registration in the stock registry, YAMLs loaded by TaskManager, equality with lm-eval's `hf`
model, chunked = unchunked, truncation policies, per-length records, one-line errors."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.core.errors import LongctxError
from longctx.core.resources import task_dir
from longctx.engine.settings import default_base_path

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = str(task_dir())
LM_EVAL = str(Path(sys.executable).parent / "lm_eval")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def base_path() -> str:
    return str(default_base_path())


def _manager(**metadata):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=TASK_DIR, include_defaults=False, metadata=metadata)


def _docs(task: str, base_path: str, lengths=(256,), n=2) -> list[dict]:
    loaded = _manager(max_seq_lengths=list(lengths), num_samples=n, tokenizer=base_path).load([task])
    (obj,) = loaded["tasks"].values()
    return list(obj.test_docs())


def test_ssmlora_is_in_lm_evals_registry_from_a_fresh_interpreter():
    code = "from lm_eval.api.registry import get_model; print(get_model('ssmlora').__name__, get_model('hf').__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.split() == ["SsmloraLM", "HFLM"]


def test_importing_longctx_does_not_import_lm_eval():
    code = "import sys, longctx, longctx.lmeval.plugin; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.strip() == "False"


def test_every_yaml_loads_through_task_manager(base_path):
    groups = {"longctx": 9, "longctx_gen": 9, "longctx_niah": 4}
    names = sorted(Path(p).stem for p in glob.glob(f"{TASK_DIR}/*.yaml"))
    manager = _manager(max_seq_lengths=[256, 300], num_samples=1, tokenizer=base_path)
    tasks = manager.load([n for n in names if n not in groups])["tasks"]
    assert len(tasks) == 18  # nine tasks, two forms each
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert [d["max_length"] for d in docs] == [256, 300], name  # lengths interleaved
        assert all(d["n_tokens"] <= d["max_length"] for d in docs)
    for group, size in groups.items():
        assert len(manager.load([group])["tasks"]) == size, group


def _instances(task: str, base_path: str, lengths=(256,), n=2):
    from lm_eval.api.instance import Instance

    docs = _docs(task, base_path, lengths, n)
    return [Instance("loglikelihood", doc, (doc["input"], doc["target"]), 0) for doc in docs]


def _ssmlora(base_path, **kwargs):
    from longctx.lmeval.model import SsmloraLM

    return SsmloraLM(pretrained=base_path, **kwargs)


@pytest.mark.parametrize("task", ["longctx_passkey", "longctx_mqar"])
def test_method_base_unchunked_equals_lm_evals_hf_model(task, base_path):
    from lm_eval.models.huggingface import HFLM

    requests = _instances(task, base_path, lengths=(256, 700), n=2)
    ours = _ssmlora(base_path, method="base").loglikelihood(requests)
    theirs = HFLM(pretrained=base_path, device="cpu", batch_size=1, dtype="float32").loglikelihood(requests)
    assert [g for _, g in ours] == [g for _, g in theirs]
    for (a, _), (b, _) in zip(ours, theirs):
        assert abs(a - b) < 1e-5 * max(1.0, abs(b)), (a, b)


@pytest.mark.parametrize("method", ["base", "lora", "ssmlora-scan"])
def test_chunked_equals_unchunked(method, base_path):
    requests = _instances("longctx_niah_single", base_path, lengths=(300,), n=2)
    whole = _ssmlora(base_path, method=method).loglikelihood(requests)
    chunked_lm = _ssmlora(base_path, method=method, chunk_size=37)
    chunked = chunked_lm.loglikelihood(requests)
    for (a, ga), (b, gb) in zip(whole, chunked):
        assert ga == gb and abs(a - b) < 1e-4
    assert chunked_lm.log.records[0].chunks == -(-chunked_lm.log.records[0].input_tokens // 37)


@pytest.mark.parametrize("method", ["base", "ssmlora", "ssmlora-scan"])
def test_bfloat16_model_type_matches_float32_and_keeps_its_dtype(method, base_path):
    """`dtype=bfloat16` runs chunked through the model type: same greedy verdicts and log-likelihoods
    within bf16 error of the float32 run, the model in bf16, the dtype in the results' config."""
    requests = _instances("longctx_passkey", base_path, lengths=(300,), n=2)
    full = _ssmlora(base_path, method=method, chunk_size=64).loglikelihood(requests)
    lm = _ssmlora(base_path, method=method, chunk_size=64, dtype="bfloat16")
    half = lm.loglikelihood(requests)
    assert lm.get_model_info()["model_dtype"] == "torch.bfloat16"
    assert _ssmlora(base_path, method=method).get_model_info()["model_dtype"] == "torch.float32"  # auto
    # the attention that ran is in the results' config: here CPU's flash kernel, two calls merged,
    # grouped K/V folded (4 query / 2 KV heads), chunked training's backward through the same kernel,
    # the last layer attending only the kept rows (no adapter past its q/k/v projections)
    assert lm.get_model_info()["longctx"]["attention"] == {
        "implementation": "longctx_sdpa", "kernel": "cpu_flash", "one_call": False, "grouped_kv_as_is": False,
        "backward": "cpu_flash", "last_layer_kept_rows_only": True}
    for (a, ga), (b, gb) in zip(full, half):
        assert abs(a - b) < 0.05 * max(1.0, abs(a)), (a, b)  # measured ≤ 1.6% relative (passkey, 300 tokens)


def test_model_type_refuses_a_missing_cuda_device(base_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without one, wherever this runs
    with pytest.raises(LongctxError, match="device 'cuda' asked for, but this machine has no CUDA device"):
        _ssmlora(base_path, method="base", device="cuda")


def test_generation_chunked_equals_unchunked_and_stops_at_newline(base_path):
    from lm_eval.api.instance import Instance

    docs = _docs("longctx_passkey_gen", base_path, lengths=(256,), n=2)
    requests = [Instance("generate_until", d, (d["input"], {"until": ["\n"], "max_gen_toks": 12}), 0) for d in docs]
    whole = _ssmlora(base_path, method="base").generate_until(requests)
    chunked = _ssmlora(base_path, method="base", chunk_size=50).generate_until(requests)
    assert whole == chunked and all("\n" not in text for text in whole)


def test_loglikelihood_rolling_matches_hf(base_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    text = ("The grass is green. The sky is blue. " * 30).strip()
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    ours = _ssmlora(base_path, method="base", chunk_size=64).loglikelihood_rolling(requests)
    theirs = HFLM(pretrained=base_path, device="cpu", batch_size=1, dtype="float32").loglikelihood_rolling(requests)
    assert abs(ours[0] - theirs[0]) < 1e-3


def test_input_beyond_the_limit_is_refused_naming_limit_and_remedies(base_path):
    """A longctx length over the limit is refused per length (recorded, NaN; tests/lmeval/test_lengths.py);
    a request of another task that does not fit still stops the run with the limit and remedies."""
    import math

    from lm_eval.api.instance import Instance

    lm = _ssmlora(base_path, method="base", max_length=300)
    (result,) = lm.loglikelihood(_instances("longctx_passkey", base_path, lengths=(512,), n=1))
    assert math.isnan(result[0]) and lm.log.per_length()["512"]["status"] == "refused"
    doc = _docs("longctx_passkey", base_path, lengths=(512,), n=1)[0]
    foreign = Instance("loglikelihood", {}, (doc["input"], doc["target"]), 0)  # no longctx length
    with pytest.raises(LongctxError) as err:
        lm.loglikelihood([foreign])
    message = str(err.value)
    assert "limit of 300 tokens" in message and "rope_scaling" in message and "truncation=left|middle" in message


@pytest.mark.parametrize("mode", ["left", "middle"])
def test_truncation_keeps_the_answer_and_is_recorded(mode, base_path):
    requests = _instances("longctx_passkey", base_path, lengths=(512,), n=1)
    lm = _ssmlora(base_path, method="base", max_length=300, truncation=mode)
    (result,) = lm.loglikelihood(requests)
    record = lm.log.records[0]
    assert record.input_tokens == 300 and record.truncated_tokens > 0
    info = lm.get_model_info()["longctx"]
    assert info["truncation"] == mode and info["per_length"]["512"]["truncated_tokens"] == record.truncated_tokens
    assert result[0] < 0


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"adapter": "/nonexistent/adapter"}, "/nonexistent/adapter"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": "abc"}, "chunk_size"),
    ({"ssm_carry": "sometimes"}, "unknown ssm_carry 'sometimes'"),
    ({"truncation": "right"}, "unknown truncation 'right'"),
    ({"colour": "blue"}, "unknown model_args key 'colour'"),
])
def test_bad_model_args_are_one_clear_line(kwargs, message, base_path):
    with pytest.raises(LongctxError) as err:
        _ssmlora(base_path, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("metadata, message", [
    ({"max_seq_lengths": [-5]}, "length -5 is not an integer"),
    ({"max_seq_lengths": []}, "non-empty list"),
    ({"colour": 1}, "unknown metadata key 'colour'"),
    ({"num_samples": 0}, "num_samples 0"),
    ({"haystack": "poems"}, "unknown haystack 'poems'"),
])
def test_bad_metadata_is_one_clear_line(metadata, message, base_path):
    with pytest.raises(LongctxError) as err:
        _manager(tokenizer=base_path, **metadata).load(["longctx_passkey"])
    assert message in str(err.value) and "\n" not in str(err.value)


def _lm_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LM_EVAL, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_stock_lm_eval_command_prints_per_length_rows_and_writes_records(tmp_path):
    run = _lm_eval("--model", "ssmlora", "--model_args", "pretrained=longctx-tiny,method=base,chunk_size=512",
                   "--tasks", "longctx_passkey,longctx_niah_single", "--include_path", TASK_DIR, "--metadata",
                   '{"max_seq_lengths":[512,2048]}', "--limit", "3", "--output_path", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("|")]
    assert any(re.search(r"\|\s*512\s*\|", r) for r in rows) and any(re.search(r"\|\s*2048\s*\|", r) for r in rows)
    (results,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    info = json.loads(Path(results).read_text())["config"]["longctx"]
    assert set(info["per_length"]) == {"512", "2048"}
    for agg in info["per_length"].values():
        assert agg["peak_memory_bytes"] > 0 and agg["tokens_per_s"] > 0 and agg["requests"] >= 2
    assert info["per_length"]["2048"]["chunks"] == 4  # request ≤ 2048 tokens: ≤ 2047 fed, 4 chunks of 512
    assert info["per_length"]["2048"]["max_request_tokens"] <= 2048


@pytest.mark.slow
def test_stock_lm_eval_with_an_adapter_directory(tmp_path, base_path):
    from longctx.adapters import wrap
    from longctx.engine.bases import load_base

    model, _ = load_base(base_path)
    wrap(model, "ssmlora").save(tmp_path / "adapter")
    run = _lm_eval("--model", "ssmlora", "--model_args", f"pretrained=longctx-tiny,adapter={tmp_path / 'adapter'},"
                   "chunk_size=256", "--tasks", "longctx_passkey", "--include_path", TASK_DIR, "--metadata",
                   '{"max_seq_lengths":[512]}', "--limit", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert any(re.search(r"\|\s*512\s*\|", line) for line in run.stdout.splitlines())


@pytest.mark.parametrize("args, message", [
    (["--model_args", "pretrained=longctx-tiny,method=nope"], "unknown method 'nope'"),
    (["--model_args", "pretrained=longctx-tiny", "--metadata", '{"max_seq_lengths":[512'], "Invalid JSON"),
    (["--model_args", "pretrained=longctx-tiny", "--metadata", '{"max_seq_lengths":[-1]}'], "length -1"),
])
def test_stock_lm_eval_bad_input_is_one_line_exit_2(args, message, tmp_path):
    run = _lm_eval("--model", "ssmlora", "--tasks", "longctx_passkey", "--include_path", TASK_DIR, "--limit", "1",
                   *args, cwd=tmp_path)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("lm_eval: error:") and message in run.stderr


def test_loglikelihood_metrics_name_the_length_the_depth_bin_and_the_answer_nll():
    from longctx.lmeval.tasks.glue import process_generation, process_loglikelihood

    doc = {"task": "passkey", "max_length": 1024, "depth": 0.45, "target_tokens": 6, "outputs": ["12345"]}
    assert process_loglikelihood(doc, [(-3.0, True)]) == {"acc": 1.0, "1024": 1.0, "depth_40-60": 1.0,
                                                         "answer_nll": 0.5}
    assert process_generation(doc, ["The pass key is 12345.\n"]) == {"acc": 1.0, "1024": 1.0, "depth_40-60": 1.0}
    assert process_generation({**doc, "outputs": ["1", "9"]}, ["1 2"])["acc"] == 0.5


@pytest.mark.slow
def test_longctx_eval_forwards_to_lm_eval_with_our_tasks(tmp_path):
    run = subprocess.run([sys.executable, "-m", "longctx.cli", "eval", "--model", "ssmlora", "--model_args",
                          "pretrained=longctx-tiny,method=lora-xs,chunk_size=128", "--tasks", "longctx_vt",
                          "--metadata", '{"max_seq_lengths":[300]}', "--limit", "1"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert any(re.search(r"\|\s*300\s*\|", line) for line in run.stdout.splitlines())
    bad = subprocess.run([sys.executable, "-m", "longctx.cli", "eval", "--model", "ssmlora", "--model_args",
                          "pretrained=longctx-tiny,method=nope", "--tasks", "longctx_vt", "--limit", "1"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("ids", [[], [0], [5, 128255, 2**40, 3], list(range(70000))])
def test_token_tensor_equals_torch_tensor_of_the_list(ids):
    import torch

    from longctx.engine.runner import token_tensor

    out = token_tensor(ids, "cpu")
    assert out.dtype == torch.int64 and out.shape == (1, len(ids))
    assert torch.equal(out, torch.tensor([ids], dtype=torch.int64).view(1, len(ids)))


def test_a_requests_clock_stops_after_one_device_synchronisation(base_path, monkeypatch):
    """The runner queues a GPU's work without waiting; a request's seconds (`measure.TimedRegion`)
    end only once the device has finished: one synchronisation before the clock starts (the previous
    work is not this request's) and one just before it stops, none per chunk. Recorded here with
    stand-ins for the clock and the synchronisation (on a GPU: tests/engine/test_cuda.py)."""
    import torch
    from lm_eval.api.instance import Instance

    from longctx.engine import measure

    lm = _ssmlora(base_path, method="base", chunk_size=16)
    events, ticks = [], iter(range(100))
    monkeypatch.setattr(measure, "clock", lambda: events.append("clock") or float(next(ticks)))
    monkeypatch.setattr(measure, "synchronize", lambda device: events.append(("sync", torch.device(device))))
    text = "The grass is green. The sky is blue. " * 8
    lm.loglikelihood([Instance("loglikelihood", {}, (text * k, " The pass key is 12345."), 0) for k in (1, 2)])
    lm.generate_until([Instance("generate_until", {}, (text, {"until": ["\n"], "max_gen_toks": 3}), 0)])
    assert len(lm.log.records) == 3 and all(r.chunks > 3 for r in lm.log.records)  # chunks of 16
    assert events == [("sync", lm.device), "clock", ("sync", lm.device), "clock"] * 3
    assert [r.seconds for r in lm.log.records] == [1.0, 1.0, 1.0]  # the clock's readings around the sync
