"""lm-eval `hf`'s model arguments under `--model ssmlora`: each has hf's effect (compared with lm-eval's
own `hf` model where it can load the same thing), or is refused in one line saying why; a model
split by a device map scores as the unsplit one; docs/lmeval-model-args.md lists every argument."""
from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import perturb, save_tiny_base

from longctx.core.errors import LongctxError

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The grass is green. The sky is blue. " * 6
DEVICE_MAP = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)}, "model.norm": "cpu",
              "lm_head": "cpu"}  # longctx-tiny's modules, each named, every one on the CPU


def _requests(context: str = TEXT + "The pass key is", continuation: str = " 12345."):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, (context, continuation), 0)]


def _ssmlora(**kwargs):
    from longctx.lmeval.model import SsmloraLM

    return SsmloraLM(**{"pretrained": "longctx-tiny", "method": "base", "device": "cpu", **kwargs})


def _hf(**kwargs):
    from lm_eval.models.huggingface import HFLM

    return HFLM(**{"device": "cpu", "batch_size": 1, "dtype": "float32", **kwargs})


def _scores(lm, requests=None) -> list[float]:
    return [score for score, _ in lm.loglikelihood(requests or _requests())]


def _hf_parameters() -> list[str]:
    from lm_eval.models.huggingface import HFLM

    return [n for n in inspect.signature(HFLM.__init__).parameters if n not in ("self", "kwargs")]


# ---- the table and the accepted keys cannot go stale ------------------------------------------------------


def test_docs_table_lists_every_argument_of_hf_and_of_ssmlora():
    from longctx.lmeval.args import VALID_ARGS

    text = (ROOT / "docs" / "lmeval-model-args.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.MULTILINE))
    missing = [n for n in [*_hf_parameters(), "device_map", *VALID_ARGS] if n not in listed]
    assert not missing, f"docs/lmeval-model-args.md lacks a row for {missing}"


def test_every_hf_argument_is_a_key_of_ssmlora_and_of_the_task_metadata():
    """Every `hf` key is ssmlora's (no "unknown key"), and reaches the tasks' metadata unrefused
    (lm-eval merges model_args into every task's metadata)."""
    from longctx.lmeval.args import VALID_ARGS
    from longctx.lmeval.tasks.glue import MODEL_KEYS, TASK_KEYS

    assert set(_hf_parameters()) | {"device_map"} <= set(VALID_ARGS)
    assert set(VALID_ARGS) <= MODEL_KEYS | TASK_KEYS
    assert set(_hf_parameters()) <= MODEL_KEYS  # so `--model hf` runs the longctx tasks too


def test_every_hf_argument_is_classified_once():
    """Each keyword of the installed HFLM is applied, ignored or refused, in exactly one table; a
    keyword lm-eval adds fails here (and is an unknown key) until it is classified."""
    from longctx.lmeval.args import APPLIED, HF_ARGS, IGNORED, REFUSED, UNCLASSIFIED

    assert HF_ARGS == (*_hf_parameters(), "device_map")  # read off the signature, not copied
    assert not UNCLASSIFIED, f"classify lm-eval hf's new arguments {UNCLASSIFIED} in longctx/lmeval/args.py"
    tables = [*APPLIED, *IGNORED, *REFUSED]
    assert sorted(tables) == sorted(HF_ARGS), "an argument is in two tables, or one hf no longer has"


def test_model_args_are_frozen_and_validated():
    import dataclasses

    from longctx.lmeval.args import ModelArgs, parse_model_args

    args = parse_model_args({"chunk_size": "64", "truncation": "true", "rope_scaling": "yarn:4"})
    assert (args.chunk_size, args.truncation, args.rope_scaling) == (64, "left", {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.chunk_size = 32  # type: ignore[misc]
    for bad, message in [({"truncation": "right"}, "unknown truncation 'right'"),
                         ({"ssm_carry": "keep"}, "unknown ssm_carry 'keep'"),
                         ({"chunk_size": 0}, "chunk_size must be a positive integer")]:
        with pytest.raises(LongctxError, match=message):
            ModelArgs(**bad)


# ---- a device map: the model split over devices through accelerate's hooks ------------------------------


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_device_map_with_every_module_on_cpu_scores_as_the_unsplit_run(chunk_size):
    from lm_eval.api.instance import Instance

    generate = [Instance("generate_until", {}, (TEXT, {"until": ["\n"], "max_gen_toks": 6}), 0)]
    whole = _ssmlora(chunk_size=chunk_size)
    split = _ssmlora(chunk_size=chunk_size, parallelize=True, device_map=DEVICE_MAP)
    assert hasattr(split._hf_model(), "_hf_hook") and not hasattr(whole._hf_model(), "_hf_hook")
    assert split.description["device_map"] == {**DEVICE_MAP, "model.rotary_emb": "cpu"}  # unnamed buffers follow
    assert _scores(split) == pytest.approx(_scores(whole), abs=1e-5)
    assert split.generate_until(generate) == whole.generate_until(generate)
    if chunk_size:
        assert split.log.records[0].chunks == whole.log.records[0].chunks > 1


def test_device_map_split_carries_a_stateful_adapter_as_the_unsplit_run(tmp_path):
    from longctx.adapters import wrap
    from longctx.engine.bases import load_base

    adapted = wrap(load_base("longctx-tiny")[0], "ssmlora-scan")
    perturb(adapted, scale=0.2)
    adapted.save(tmp_path / "scan")
    kwargs = {"adapter": str(tmp_path / "scan"), "method": None, "chunk_size": 24}
    whole, split = _ssmlora(**kwargs), _ssmlora(**kwargs, parallelize=True, device_map="auto")
    assert split.description["device_map"] == {"": "cpu"}  # `auto` on a machine without GPUs: all on the CPU
    assert _scores(split) == pytest.approx(_scores(whole), abs=1e-5)
    assert _scores(whole) != pytest.approx(_scores(_ssmlora(chunk_size=24)), abs=1e-3)  # the adapter acts


def test_device_map_without_parallelize_is_ignored_as_hf_ignores_it(caplog):
    with caplog.at_level(logging.WARNING, logger="lm_eval.models.ssmlora"):
        lm = _ssmlora(device_map=DEVICE_MAP, max_cpu_memory="1GiB")
    assert not hasattr(lm._hf_model(), "_hf_hook") and lm.description["device_map"] is None
    assert "device_map, max_cpu_memory ignored without parallelize=True" in caplog.text


# ---- loading arguments that reach from_pretrained ------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A local HF hub cache holding `local/tiny` at two revisions (main: seed 0, v1: seed 1)."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "models--local--tiny"
    for ref, sha, seed in (("main", "a" * 40, 0), ("v1", "b" * 40, 1)):
        save_tiny_base(repo / "snapshots" / sha, seed=seed)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return root


def test_revision_loads_that_revision_as_hf_does(hub_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    ours = _scores(_ssmlora(pretrained="local/tiny", revision="v1"))
    assert ours == pytest.approx(_scores(_hf(pretrained="local/tiny", revision="v1")), abs=1e-4)
    assert ours != pytest.approx(_scores(_ssmlora(pretrained="local/tiny")), abs=1e-3)


def test_subfolder_loads_from_that_subfolder_as_hf_does(tmp_path):
    save_tiny_base(tmp_path / "repo" / "sub", seed=2)
    ours = _ssmlora(pretrained=str(tmp_path / "repo"), subfolder="sub")
    assert _scores(ours) == pytest.approx(_scores(_hf(pretrained=str(tmp_path / "repo"), subfolder="sub")), abs=1e-4)
    assert ours.description["subfolder"] == "sub"


def test_tokenizer_argument_tokenizes_with_that_tokenizer_as_hf_does(tiny_base_dir, char_tokenizer_dir):
    ours = _ssmlora(pretrained=str(tiny_base_dir), tokenizer=str(char_tokenizer_dir))
    theirs = _hf(pretrained=str(tiny_base_dir), tokenizer=str(char_tokenizer_dir))
    assert len(ours.tok_encode("pass key")) == 8 and ours.tok_encode("pass key") == theirs.tok_encode("pass key")
    assert _scores(ours) == pytest.approx(_scores(theirs), abs=1e-4)


def test_use_fast_tokenizer_gives_hfs_tokenizer(tiny_base_dir):
    ours = _ssmlora(pretrained=str(tiny_base_dir), use_fast_tokenizer=False)
    theirs = _hf(pretrained=str(tiny_base_dir), use_fast_tokenizer=False)
    assert type(ours.tokenizer) is type(theirs.tokenizer)
    assert ours.tok_encode(TEXT) == theirs.tok_encode(TEXT)


def test_peft_is_the_adapter_directory(tmp_path):
    from longctx.adapters import wrap
    from longctx.engine.bases import load_base

    adapted = wrap(load_base("longctx-tiny")[0], "lora")
    perturb(adapted, scale=0.2)
    adapted.save(tmp_path / "lora")
    via_peft = _ssmlora(peft=str(tmp_path / "lora"), method=None)
    assert via_peft.description["adapter"] == str(tmp_path / "lora") and via_peft.description["method"] == "lora"
    assert _scores(via_peft) == pytest.approx(_scores(_ssmlora(adapter=str(tmp_path / "lora"), method=None)))
    assert _scores(via_peft) != pytest.approx(_scores(_ssmlora()), abs=1e-3)


def test_prefix_token_id_scores_an_empty_context_as_hf_does(tiny_base_dir):
    requests = _requests("", " The sky is blue.")
    ours = _scores(_ssmlora(pretrained=str(tiny_base_dir), prefix_token_id=5), requests)
    assert ours == pytest.approx(_scores(_hf(pretrained=str(tiny_base_dir), prefix_token_id=5), requests), abs=1e-4)
    assert ours != pytest.approx(_scores(_ssmlora(pretrained=str(tiny_base_dir)), requests), abs=1e-3)


def test_think_end_token_keeps_the_text_after_the_thinking_as_hf_does(monkeypatch):
    """The model's output is fixed here (the tiny base does not think); what is kept of it is hf's."""
    from lm_eval.api.instance import Instance

    import longctx.lmeval.model

    lm = _ssmlora(think_end_token="</think>")
    said = torch.tensor([lm.tok_encode("hmm, twelve</think> The key is 12.\nmore")])
    monkeypatch.setattr(longctx.lmeval.model, "greedy_generate", lambda *args, **kwargs: said)
    request = Instance("generate_until", {}, ("The pass key is", {"until": ["\n"], "max_gen_toks": 30}), 0)
    assert lm.generate_until([request]) == ["The key is 12."]


def test_arguments_hf_ignores_or_that_mean_one_request_change_nothing():
    """logits_cache (a reuse of logits), offload_folder (disk offload only), batch_size=auto (the
    largest batch that fits: one request here) and its max_batch_size, hf's other defaults."""
    lm = _ssmlora(logits_cache=False, offload_folder="/nonexistent", batch_size="auto", max_batch_size=64,
                  backend="causal", softmax_dtype="float32", autogptq=False, gptqmodel=False, tp_plan=None)
    assert lm.batch_size == 1 and _scores(lm) == pytest.approx(_scores(_ssmlora()), abs=1e-6)
    assert _ssmlora(batch_size=1, max_batch_size=64).batch_size == 1  # hf ignores max_batch_size here
    assert _ssmlora(truncation=True).description["truncation"] == "left"  # hf's truncation: cut on the left


# ---- what cannot apply: one line that says why --------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"peft": "/a", "adapter": "/b"}, "peft='/a' and adapter='/b' both name the adapter"),
    ({"revision": "v2"}, "revision='v2' does not apply to the embedded base 'longctx-tiny'"),
    ({"subfolder": "sub"}, "subfolder='sub' does not apply to the embedded base 'longctx-tiny'"),
    ({"batch_size": 4}, "batch_size=4 is not supported: ssmlora runs requests one at a time"),
    ({"batch_size": "auto", "max_batch_size": 0}, "max_batch_size must be a positive integer"),
    ({"tp_plan": "auto"}, "tp_plan='auto' is not supported by ssmlora: tensor parallelism"),
    ({"delta": "/d"}, "delta='/d' is not supported by ssmlora"),
    ({"autogptq": True}, "autogptq=True is not supported by ssmlora: a GPTQ model"),
    ({"gptqmodel": True}, "gptqmodel=True is not supported by ssmlora"),
    ({"mixed_precision_dtype": "bfloat16"}, "set dtype=bfloat16 or float16 instead"),
    ({"backend": "seq2seq"}, "decoder-only (causal) models"),
    ({"softmax_dtype": "bfloat16"}, "log-softmax runs in float32"),
    ({"enable_thinking": True}, "enable_thinking=True needs think_end_token"),
    ({"truncation": "right"}, "unknown truncation 'right'"),
    ({"parallelize": True, "max_memory_per_gpu": "lots"}, "max_memory_per_gpu='lots' is not a memory size"),
    ({"parallelize": True, "device_map": "nowhere"}, "device_map='nowhere'"),
    ({"parallelize": True, "device_map": {**DEVICE_MAP, "model.layers.3": "disk"}},
     "puts model.layers.3 (and 0 more) on disk: disk-offloaded weights are reloaded by name"),
    ({"parallelize": True, "device_map": {"model.embed_tokens": "cpu"}}, "device_map gives no device to"),
    ({"parallelize": True, "device_map": {"": "cpu", "model.layer.0": "cpu"}},
     "device_map names 'model.layer.0', which is not a module of this model"),
])
def test_arguments_that_cannot_apply_are_refused_in_one_line(kwargs, message):
    with pytest.raises(LongctxError) as err:
        _ssmlora(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_device_map_naming_a_missing_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without one, wherever this runs
    with pytest.raises(LongctxError, match="device 'cuda:0' asked for, but this machine has no CUDA device"):
        _ssmlora(parallelize=True, device_map={**DEVICE_MAP, "model.layers.0": 0})


def test_parallelize_under_several_launched_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LongctxError, match="parallelize=True under 2 launched processes is not supported"):
        _ssmlora(parallelize=True)


def test_device_map_on_a_mamba_base_scores_as_the_unsplit_run():
    kwargs = {"pretrained": "longctx-tiny-mamba", "method": "ssmlora-scan", "chunk_size": 16}
    split = _ssmlora(**kwargs, parallelize=True, device_map="auto")
    assert hasattr(split._hf_model(), "_hf_hook")
    assert _scores(split) == pytest.approx(_scores(_ssmlora(**kwargs)), abs=1e-5)
