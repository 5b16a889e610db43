"""The lm-eval seam: `accelerate launch -m lm_eval --model ssmlora` splits the requests over the
processes and gives the one-process results; every accepted model argument takes effect or is
refused in one line."""
from __future__ import annotations

import glob
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_base

from longctx.core.errors import LongctxError

PYTHON = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base512(tmp_path_factory) -> str:
    return str(save_tiny_base(tmp_path_factory.mktemp("base512"), max_positions=512))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lm_eval_args(base: str, out: Path) -> list[str]:
    return ["-m", "lm_eval", "--model", "ssmlora", "--model_args", f"pretrained={base},method=base",
            "--tasks", "longctx_passkey", "--metadata", '{"max_seq_lengths":[256],"num_samples":4}',
            "--device", "cpu", "--output_path", str(out), "--log_samples"]


def _outputs(out: Path) -> tuple[dict, dict]:
    (results,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    (samples,) = glob.glob(str(out / "**" / "samples_longctx_passkey_*.jsonl"), recursive=True)
    rows = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    return json.loads(Path(results).read_text()), {row["doc_id"]: row for row in rows}


@pytest.mark.slow
def test_accelerate_launch_splits_requests_over_two_processes_with_the_one_process_results(base512, tmp_path):
    """Two CPU processes (gloo) vs one: the same per-sample log-likelihoods and metrics, and each
    process ran half of the requests (config.longctx.per_length[L].requests_by_rank).

    accelerate 1.15's `--cpu` launcher starts a single process unless given an MPI hostfile, so the
    processes are started by its torchrun launcher (`--multi_gpu`) and put on the CPU by `--device cpu`."""
    one = subprocess.run([PYTHON, *_lm_eval_args(base512, tmp_path / "one")], capture_output=True, text=True,
                         env=ENV, cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(_free_port()), *_lm_eval_args(base512, tmp_path / "two")],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    (r1, s1), (r2, s2) = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert r1["config"]["longctx"]["per_length"]["256"]["requests_by_rank"] == {"0": 4}
    assert r2["config"]["longctx"]["per_length"]["256"]["requests_by_rank"] == {"0": 2, "1": 2}
    assert r2["config"]["longctx"]["processes"] == 2 and r1["config"]["longctx"]["processes"] == 1
    assert "process 0 of 2 ran 2 loglikelihood" in two.stderr and "process 1 of 2 ran 2 loglikelihood" in two.stderr
    assert sorted(s1) == sorted(s2) == [0, 1, 2, 3]
    for doc_id, row in s1.items():
        (a, greedy_a), (b, greedy_b) = row["filtered_resps"][0], s2[doc_id]["filtered_resps"][0]
        assert abs(float(a) - float(b)) < 1e-5 and greedy_a == greedy_b, doc_id
    m1, m2 = r1["results"]["longctx_passkey"], r2["results"]["longctx_passkey"]
    for key in ("acc,none", "256,none", "answer_nll,none"):
        assert math.isclose(m1[key], m2[key], rel_tol=1e-6, abs_tol=1e-9), key
    assert two.stdout.count("|longctx_passkey|") == 1  # one results table: rank 0's


def test_padding_requests_run_once():
    from longctx.lmeval.parallel import unique_requests

    a, b = object(), object()
    unique, where = unique_requests([a, b, b, b])  # lm-eval pads a short shard with its last request
    assert unique == [a, b] and where == [0, 1, 1, 1]


def test_rank_zero_gathers_every_process_records():
    from longctx.lmeval.parallel import adopt, sync_log
    from longctx.lmeval.stats import RequestLog, RequestRecord

    lm = SimpleNamespace(log=RequestLog(torch.device("cpu")), position_limit=512, device="cpu")
    adopt(lm, SimpleNamespace(process_index=0, num_processes=2, device=torch.device("cpu")))
    lm.rank, lm.world_size = lm._rank, lm._world_size
    lm.log.records.append(RequestRecord(256, 255, 1, 0, request_tokens=256))
    other = [RequestRecord(256, 250, 1, 0, request_tokens=251, rank=1),
             RequestRecord(1024, 0, 0, 0, request_tokens=1024, status="refused", rank=1)]
    lm.gather_object = lambda obj, dst=0: [obj, other]
    sync_log(lm, "loglikelihood")
    per_length = lm.log.per_length()
    assert per_length["256"]["requests_by_rank"] == {"0": 1, "1": 1}
    assert per_length["1024"]["status"] == "refused" and lm.log.synced == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 8}, "batch_size=8 is not supported: ssmlora runs requests one at a time"),
    ({"batch_size": "auto", "max_batch_size": 0}, "max_batch_size must be a positive integer"),
    ({"add_bos_token": "maybe"}, "add_bos_token must be true or false"),
    ({"trust_remote_code": "sometimes"}, "trust_remote_code must be true or false"),
    ({"load_in_4bit": True}, "unknown model_args key 'load_in_4bit' for ssmlora (valid: pretrained, adapter, "
                             "method, chunk_size"),
])
def test_arguments_that_cannot_take_effect_are_refused_in_one_line(kwargs, message, base512):
    from longctx.lmeval.model import SsmloraLM

    with pytest.raises(LongctxError) as err:
        SsmloraLM(pretrained=base512, method="base", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_batch_size_one_is_accepted(base512):
    from longctx.lmeval.model import SsmloraLM

    assert SsmloraLM(pretrained=base512, method="base", batch_size="1", max_batch_size=1).batch_size == 1


def test_trust_remote_code_reaches_the_loader(base512, monkeypatch):
    import longctx.lmeval.model
    from longctx.lmeval.model import SsmloraLM

    seen, original = [], longctx.lmeval.model.load_base

    def load_base(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(longctx.lmeval.model, "load_base", load_base)
    lm = SsmloraLM(pretrained=base512, method="base", trust_remote_code="true")
    assert seen == [True] and lm.description["trust_remote_code"] is True


def test_add_bos_token_is_honoured_as_lm_evals_hf_model_does(base512):
    """add_bos_token=True: requests start with BOS, scores equal `hf`'s with the same argument."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from longctx.lmeval.model import SsmloraLM

    text = "The grass is green. The sky is blue. The pass key is"
    requests = [Instance("loglikelihood", {}, (text, " 12345."), 0)]
    ours = SsmloraLM(pretrained=base512, method="base", add_bos_token=True)
    theirs = HFLM(pretrained=base512, device="cpu", batch_size=1, dtype="float32", add_bos_token=True)
    plain = SsmloraLM(pretrained=base512, method="base")
    assert ours.tok_encode(text)[0] == ours.tokenizer.bos_token_id != plain.tok_encode(text)[0]
    assert ours.tok_encode(text) == theirs.tok_encode(text)
    ((a, _),), ((b, _),), ((c, _),) = (lm.loglikelihood(requests) for lm in (ours, theirs, plain))
    assert abs(a - b) < 1e-4 and abs(a - c) > 1e-4
    assert ours.log.records[0].request_tokens == len(ours.tok_encode(text + " 12345."))
