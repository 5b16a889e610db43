"""Adapters on the real base SmolLM2-135M-Instruct (9 query / 3 KV heads): every Llama method wraps it,
trains a step and round-trips save/load; a PEFT LoRA saved on it loads equal to hf + peft; yarn rope
scaling equals transformers' own and chunks exactly. The checkpoint comes through the project's own
fetch (cached; see tests/engine/test_real_base_gguf.py)."""
from __future__ import annotations

import pytest
import torch

from longctx.core import fetch
from longctx.engine import gguf as gguf_bases
from longctx.engine.bases import load_base
from longctx.engine.family import position_limit

LLAMA_METHODS = ["dense", "lora", "ssmlora", "ssmlora-scan", "lora-xs"]


@pytest.fixture(scope="module")
def smollm2():
    fetch.fetch("smollm2-135m", progress=False)
    return gguf_bases.converted_dir("smollm2-135m")


@pytest.mark.slow
@pytest.mark.parametrize("method", LLAMA_METHODS)
def test_every_llama_method_wraps_trains_and_round_trips_on_the_real_base(method, smollm2, tmp_path):
    from longctx.adapters import load_adapter
    from longctx.training.config import TrainConfig
    from longctx.training.train import train_adapter

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

    from longctx.engine.runner import chunked_forward

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


@pytest.mark.slow
def test_the_gpu_benchmark_prepares_the_real_base_as_hf_and_longctx_both_load_it(smollm2, tmp_path, monkeypatch):
    """`bench.py --base smollm2-135m [--rope-scaling yarn:4]`: the real weights linked (not copied) with a
    bf16 config, yarn scaling written into it, and the limit the figures run at. The rest of bench.py is
    the same code on any base (its CPU smoke run: tests/benchmarks/test_gpu_bench_script.py)."""
    from pathlib import Path

    from transformers import AutoConfig

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"))
    from bench import real_base_checkpoint

    plain, yarn = tmp_path / "plain", tmp_path / "yarn"
    plain.mkdir(), yarn.mkdir()
    assert real_base_checkpoint(str(plain), "smollm2-135m", None) == (49152, 8192)
    assert real_base_checkpoint(str(yarn), "smollm2-135m", "yarn:4") == (49152, 32768)
    weights = [p for p in plain.iterdir() if p.suffix == ".safetensors"]
    assert weights and all(p.is_symlink() and p.resolve().parent == smollm2.resolve() for p in weights)
    config, scaled = AutoConfig.from_pretrained(plain), AutoConfig.from_pretrained(yarn)
    assert config.dtype == torch.bfloat16 and config.rope_scaling["rope_type"] == "default"
    assert scaled.rope_scaling["rope_type"] == "yarn" and scaled.rope_scaling["factor"] == 4.0
