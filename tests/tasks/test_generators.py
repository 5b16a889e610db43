"""Task generators: exact sizes in two tokenizers, needles placed once, answers recoverable by a
plain parser written here (not the generator's code), determinism across processes, disjoint
splits, and clear errors."""
from __future__ import annotations

import collections
import dataclasses
import json
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx.core.errors import LongctxError
from longctx.tasks import TASKS, TaskSpec, generate
from longctx.tasks.common import HAYSTACKS, tolerance

NUM = r"(\d+)"


def _keys_in(question: str) -> list[str]:
    names = re.search(r"magic numbers? for (.+?)(?:, in that order)?\?", question).group(1)
    return re.split(r", | and ", names)


def parse_answer(task: str, prompt: str) -> list[str]:
    """The answer, read off the prompt with regular expressions and counting only."""
    body, question = prompt.rsplit("\n", 1)
    if task == "passkey":
        return re.findall(r"The pass key is (\d+)\. Remember it\.", body)
    if task.startswith("niah"):
        found = [re.findall(rf"The magic number for {k} is {NUM}\.", body) for k in _keys_in(question)]
        return [v for values in found for v in values]
    if task == "vt":
        value = re.search(r"hold the value (\d+)", question).group(1)
        bound = dict(re.findall(r"VAR ([A-Z]+) = (\d+|VAR [A-Z]+)\.", body))
        chain = [name for name, rhs in bound.items() if rhs == value]
        while True:
            nxt = [name for name, rhs in bound.items() if rhs == f"VAR {chain[-1]}"]
            if not nxt:
                return chain
            chain.append(nxt[0])
    if task == "cwe":
        k = int(re.search(r"Which (\d+) words appear most often", question).group(1))
        words = re.findall(r"\d+\. ([a-z]+)", body.split("\n")[1])
        counts = collections.Counter(words)
        top = [w for w, _ in counts.most_common(k)]
        assert len(counts) >= 2 * k  # there are distractors, at least as many as common words
        assert counts.most_common(k + 1)[-1][1] < counts[top[-1]]  # the top k are unambiguous
        return sorted(top, key=words.index)
    if task == "fwe":
        counts = collections.Counter(re.findall(r"[a-z]+", body.split("\n")[1]))  # not the " ." padding
        ranked = counts.most_common(4)
        assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]  # unambiguous order
        return [w for w, _ in ranked[:3]]
    if task == "mqar":
        pairs = dict(re.findall(r"([a-z0-9]+): (\d+)", body.split("\n")[1]))
        keys = re.split(r", | and ", re.search(r"values of (.+), in that order", question).group(1))
        return [pairs[k] for k in keys]
    raise AssertionError(task)


def needle_strings(task: str, example) -> list[str]:
    """Strings that must occur exactly once in the prompt."""
    if task == "passkey":
        return [f"The pass key is {example.outputs[0]}. Remember it."]
    if task.startswith("niah"):
        return [f"is {v}." for v in example.outputs]
    if task == "vt":
        return [f"VAR {n} =" for n in example.outputs]
    if task == "mqar":
        keys = re.split(r", | and ", re.search(r"values of (.+), in that order", example.input).group(1))
        return [f"{k}: " for k in keys]
    return []


def check_example(task: str, example, tokenizer, length: int) -> None:
    """Log-likelihood form: the whole request, prompt + answer, has L − tolerance … L tokens."""
    n = len(tokenizer(example.input, add_special_tokens=False)["input_ids"])
    assert n == example.n_tokens, (task, length)
    whole = len(tokenizer(example.input + example.target, add_special_tokens=False)["input_ids"])
    assert whole == example.request_tokens and example.form == "loglikelihood", (task, length)
    assert length - tolerance(length) <= whole <= length, (task, length, whole)
    for needle in needle_strings(task, example):  # whole words: MQAR's key "able" is inside "variable: "
        assert len(re.findall(r"(?<![\w-])" + re.escape(needle), example.input)) == 1, (task, needle)
    assert parse_answer(task, example.input) == example.outputs, task
    sep = " " if task in ("vt", "cwe", "fwe") else ", "
    assert example.target == " " + sep.join(example.outputs)
    assert 0.0 <= example.depth <= 1.0
    assert example.target_tokens == len(tokenizer(example.target, add_special_tokens=False)["input_ids"])
    if task in ("cwe", "fwe", "mqar"):  # no haystack, nothing recorded
        assert "haystack" not in example.extra and "haystack_repeated" not in example.extra
    else:
        assert example.extra["haystack"] in HAYSTACKS and isinstance(example.extra["haystack_repeated"], bool)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [256, 1000, 4096])
@pytest.mark.parametrize("tok", ["bpe", "char"])
def test_prompt_sizes_needles_and_answers(task, length, tok, tokenizers):
    for example in generate(task, tokenizers[tok], length, n=3, seed=5):
        check_example(task, example, tokenizers[tok], length)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("tok", ["bpe", "char"])
def test_prompt_sizes_at_32k(task, tok, tokenizers):
    (example,) = generate(task, tokenizers[tok], 32768, n=1, seed=1)
    check_example(task, example, tokenizers[tok], 32768)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(sorted(TASKS)), length=st.integers(256, 6000), seed=st.integers(0, 10**6),
       tok=st.sampled_from(["bpe", "char"]))
def test_generation_terminates_and_succeeds_at_any_length(task, length, seed, tok, tokenizers):
    (example,) = generate(task, tokenizers[tok], length, n=1, seed=seed)
    check_example(task, example, tokenizers[tok], length)


def test_needle_depths_follow_the_requested_depths(tokenizers):
    examples = generate("niah_single", tokenizers["bpe"], 2048, n=5, depths=[0.0, 0.25, 0.5, 0.75, 1.0])
    for example, want in zip(examples, [0.0, 0.25, 0.5, 0.75, 1.0]):
        assert abs(example.depth - want) < 0.06, (example.depth, want)


def test_splits_share_no_needles(tokenizers):
    answers = {split: {v for e in generate("niah_multikey", tokenizers["bpe"], 512, n=30, split=split)
                       for v in e.outputs}
               for split in ("train", "validation", "test")}
    assert not answers["train"] & answers["test"]
    assert not answers["train"] & answers["validation"]
    assert not answers["validation"] & answers["test"]


def test_same_seed_gives_byte_identical_documents_in_two_processes(tmp_path):
    script = ("import json,sys; from transformers import AutoTokenizer; from longctx.engine.settings import default_base_path;"
              "from longctx.tasks import TASKS, generate; tok = AutoTokenizer.from_pretrained(default_base_path());"
              "print(json.dumps([e.to_dict() for t in sorted(TASKS) for e in generate(t, tok, 700, n=2, seed=3)]))")
    outs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout
            for h in (1, 2)]
    assert outs[0] == outs[1] and len(json.loads(outs[0])) == 2 * len(TASKS)


def test_first_examples_do_not_depend_on_n(tokenizers):
    few = generate("vt", tokenizers["bpe"], 512, n=2)
    many = generate("vt", tokenizers["bpe"], 512, n=5)
    assert [e.to_dict() for e in few] == [e.to_dict() for e in many[:2]]


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "nope"}, "unknown task 'nope'"),
    ({"length": -5}, "length -5 is not an integer"),
    ({"length": 20}, "length 20 is not an integer >= 64"),
    ({"split": "dev"}, "unknown split 'dev'"),
    ({"haystack": "poems"}, "unknown haystack 'poems'"),
    ({"depths": [1.5]}, "depth 1.5 is not a number in [0, 1]"),
    ({"depths": []}, "depths must be a non-empty list"),
])
def test_bad_arguments_name_the_value(kwargs, message, tokenizers):
    args = {"task": "passkey", "length": 512, "n": 1, **kwargs}
    with pytest.raises(LongctxError) as err:
        generate(args.pop("task"), tokenizers["bpe"], args.pop("length"), **args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_too_short_a_length_says_the_minimum(tokenizers):
    with pytest.raises(LongctxError, match=r"too short for niah_multiquery.*at least \d+"):
        generate("niah_multiquery", tokenizers["char"], 100, n=1)


def test_every_task_is_one_frozen_spec_named_by_its_key():
    for name, spec in TASKS.items():
        assert isinstance(spec, TaskSpec) and spec.name == name and callable(spec.generator)
        assert spec.haystack in HAYSTACKS
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.haystack = "essay"  # type: ignore[misc]
    assert [t for t in TASKS if TASKS[t].haystack == "essay"] == [t for t in TASKS if t.startswith("niah_")]
