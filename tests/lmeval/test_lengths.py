"""One definition of length: L means the whole request fits in L tokens — special tokens + prompt +
answer (log-likelihood form) or + max_gen_toks (generation form) — so L = the position limit
runs; a length over the limit is refused per length (NaN, recorded, one warning line) while the
other lengths are evaluated."""
from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_base
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx.core.resources import task_dir
from longctx.tasks import TASKS, generate
from longctx.tasks.common import tolerance

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = str(task_dir())
LIMIT = 512  # max_position_embeddings of the tiny base below
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def base512(tmp_path_factory) -> str:
    return str(save_tiny_base(tmp_path_factory.mktemp("base512"), max_positions=LIMIT))


def _request_tokens(tokenizer, example, max_gen_toks, special) -> int:
    """The request measured here: one tokenization of the whole text the model will see."""
    if max_gen_toks is None:
        return special + len(tokenizer(example.input + example.target, add_special_tokens=False)["input_ids"])
    return special + len(tokenizer(example.input, add_special_tokens=False)["input_ids"]) + max_gen_toks


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(sorted(TASKS)), length=st.integers(600, 5000), seed=st.integers(0, 10**6),
       tok=st.sampled_from(["bpe", "char"]), max_gen_toks=st.sampled_from([None, 16, 64]),
       special=st.sampled_from([0, 1]))
def test_the_whole_request_is_in_the_band_in_both_forms(task, length, seed, tok, max_gen_toks, special, tokenizers):
    (example,) = generate(task, tokenizers[tok], length, n=1, seed=seed, max_gen_toks=max_gen_toks,
                          special_tokens=special)
    measured = _request_tokens(tokenizers[tok], example, max_gen_toks, special)
    assert measured == example.request_tokens
    assert length - tolerance(length) <= measured <= length
    assert example.form == ("loglikelihood" if max_gen_toks is None else "generate_until")
    assert example.n_tokens == len(tokenizers[tok](example.input, add_special_tokens=False)["input_ids"])


def test_too_short_for_the_generation_budget_names_a_length_that_works(tokenizers):
    from longctx.tasks.common import TooShort

    with pytest.raises(TooShort) as err:
        generate("passkey", tokenizers["bpe"], 100, n=1, max_gen_toks=64)
    minimum = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert "length 100 is too short for passkey" in str(err.value)
    (example,) = generate("passkey", tokenizers["bpe"], minimum, n=1, max_gen_toks=64)
    assert example.request_tokens <= minimum


def _manager(tokenizer: str, lengths, n=2, **extra):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=TASK_DIR, include_defaults=False,
                       metadata={"max_seq_lengths": list(lengths), "num_samples": n, "tokenizer": tokenizer, **extra})


def _evaluate(lm, tokenizer: str, lengths, tasks=("longctx_passkey", "longctx_passkey_gen"), n=2, **extra):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=_manager(tokenizer, lengths, n, **extra),
                                   log_samples=True)


@pytest.mark.parametrize("add_bos_token", [None, True])
def test_length_equal_to_the_position_limit_runs_in_both_forms(add_bos_token, base512):
    """L = max_position_embeddings: every request (prompt + answer, prompt + max_gen_toks, with a
    BOS where the tokenizer adds one) fits, runs, and has exactly the size the task measured."""
    from longctx.lmeval.model import SsmloraLM

    lm = SsmloraLM(pretrained=base512, method="base", add_bos_token=add_bos_token)
    extra = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    results = _evaluate(lm, base512, [LIMIT], **extra)
    agg = lm.log.per_length()[str(LIMIT)]
    assert agg["status"] == "ok" and agg["refused"] == 0 and agg["requests"] == 4
    assert agg["max_request_tokens"] <= LIMIT
    for task in ("longctx_passkey", "longctx_passkey_gen"):
        assert isinstance(results["results"][task][f"{LIMIT},none"], float)
        assert not math.isnan(results["results"][task]["acc,none"])
    measured = sorted(s["doc"]["request_tokens"] for task in results["samples"] for s in results["samples"][task])
    assert measured == sorted(r.request_tokens for r in lm.log.records)  # the model ran what the task sized
    assert all(LIMIT - tolerance(LIMIT) <= t <= LIMIT for t in measured)
    if add_bos_token:
        assert lm.tok_encode("The sky")[0] == lm.tokenizer.bos_token_id


def test_longctx_tiny_runs_at_its_limit_of_4096_in_both_forms():
    from longctx.engine.settings import default_base_path
    from longctx.lmeval.model import SsmloraLM

    base = str(default_base_path())
    lm = SsmloraLM(pretrained=base, method="base", chunk_size=1024)
    assert lm.position_limit == 4096
    results = _evaluate(lm, base, [4096], n=1)
    agg = lm.log.per_length()["4096"]
    assert agg["status"] == "ok" and agg["requests"] == 2 and agg["max_request_tokens"] <= 4096
    assert not math.isnan(results["results"]["longctx_passkey"]["4096,none"])


def test_a_run_mixing_an_allowed_and_an_over_limit_length_evaluates_the_allowed_one(base512, caplog):
    """The over-limit length is refused per length: not run, NaN in the table and in `acc`,
    `status: refused` in per_length, one warning line; the allowed length is evaluated."""
    from lm_eval.utils import make_table

    from longctx.lmeval.model import SsmloraLM

    lm = SsmloraLM(pretrained=base512, method="base")
    with caplog.at_level(logging.WARNING, logger="lm_eval.models.ssmlora"):
        results = _evaluate(lm, base512, [LIMIT, 2 * LIMIT])
    per_length = lm.log.per_length()
    assert per_length[str(LIMIT)]["status"] == "ok" and per_length[str(LIMIT)]["requests"] == 4
    assert per_length[str(2 * LIMIT)] == {"status": "refused", "requests": 4, "refused": 4,
                                          "requests_by_rank": {"0": 4}, "max_request_tokens": 2 * LIMIT}
    assert all(r.status == "refused" for r in lm.log.records if r.label == 2 * LIMIT)
    for task in ("longctx_passkey", "longctx_passkey_gen"):
        metrics = results["results"][task]
        assert not math.isnan(metrics[f"{LIMIT},none"]) and math.isnan(metrics[f"{2 * LIMIT},none"])
        assert math.isnan(metrics["acc,none"])  # the run-wide mean includes a refused length
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and f"length {2 * LIMIT} refused" in warnings[0] and f"limit of {LIMIT}" in warnings[0]
    rows = {line.split("|")[5].strip(): line for line in make_table(results).splitlines() if line.count("|") > 8}
    assert "nan" in rows[str(2 * LIMIT)].lower() and "nan" not in rows[str(LIMIT)].lower()


def test_truncation_runs_an_over_limit_length_instead(base512):
    from longctx.lmeval.model import SsmloraLM

    lm = SsmloraLM(pretrained=base512, method="base", truncation="left")
    results = _evaluate(lm, base512, [2 * LIMIT], tasks=("longctx_passkey",))
    agg = lm.log.per_length()[str(2 * LIMIT)]
    assert agg["status"] == "ok" and agg["truncated_tokens"] > 0 and agg["max_input_tokens"] <= LIMIT
    assert not math.isnan(results["results"]["longctx_passkey"]["acc,none"])


def test_a_generation_budget_beyond_the_one_sized_for_is_refused_at_the_limit(base512):
    """--gen_kwargs max_gen_toks larger than the task's 64: at L = limit the request no longer fits."""
    from lm_eval.api.instance import Instance

    from longctx.lmeval.model import SsmloraLM
    from longctx.lmeval.tasks.glue import REFUSED_GENERATION

    (obj,) = _manager(base512, [LIMIT], n=1).load(["longctx_passkey_gen"])["tasks"].values()
    doc = next(iter(obj.test_docs()))
    lm = SsmloraLM(pretrained=base512, method="base")
    requests = [Instance("generate_until", doc, (doc["input"], {"until": ["\n"], "max_gen_toks": n}), 0)
                for n in (64, 128)]
    ok, over = lm.generate_until(requests)
    assert ok != REFUSED_GENERATION and over == REFUSED_GENERATION
    assert lm.log.per_length()[str(LIMIT)]["status"] == "partial"


def test_stock_lm_eval_runs_the_limit_and_refuses_the_length_beyond(tmp_path):
    """`lm_eval` on longctx-tiny with 4096 (its limit) and 8192: exit 0, a score for 4096, NaN for
    8192, and the warning line on stderr."""
    run = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "ssmlora", "--model_args",
                          "pretrained=longctx-tiny,method=base,chunk_size=2048", "--tasks", "longctx_passkey",
                          "--metadata", '{"max_seq_lengths":[4096,8192],"num_samples":1}'],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split("|")[5].strip(): line for line in run.stdout.splitlines() if line.count("|") > 8}
    value = {length: row.split("|")[7].strip().lower() for length, row in rows.items()}  # the Value column
    assert not math.isnan(float(value["4096"])) and value["8192"] == "nan"
    assert "length 8192 refused" in run.stderr and "limit of 4096" in run.stderr
