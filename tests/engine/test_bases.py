"""Base-model plumbing: backend choice, families, position limits, fingerprints."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from longctx.core.errors import LongctxError
from longctx.core.identity import fingerprint
from longctx.engine.bases import choose_attn_implementation, load_base, meta_model
from longctx.engine.family import check_length, model_family, position_limit
from longctx.engine.settings import default_base_path


def test_auto_attention_is_sdpa_without_cuda_and_bad_choice_is_named():
    if not torch.cuda.is_available():
        assert choose_attn_implementation("auto") == "longctx_sdpa"
    assert choose_attn_implementation("eager") == "eager"
    with pytest.raises(LongctxError, match="unknown attn_implementation 'flash'; valid choices: auto, longctx_sdpa, sdpa"):
        choose_attn_implementation("flash")


def test_unknown_family_lists_the_modules_found():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "gpt_odd"})()
            self.c_attn = nn.Linear(4, 4)

    with pytest.raises(LongctxError, match="unsupported model family 'gpt_odd': found linear modules c_attn"):
        model_family(Odd())


def test_position_limit_and_refusal():
    model = tiny_llama(max_positions=128)
    assert model_family(model) == "llama" and position_limit(model) == 128
    check_length(model, 128)
    with pytest.raises(LongctxError, match="129 tokens exceeds the model's position limit of 128"):
        check_length(model, 129)


def test_fingerprint_tells_checkpoints_apart_and_ignores_adapters():
    from longctx.adapters import wrap

    assert fingerprint(tiny_llama(0)) == fingerprint(tiny_llama(0)) != fingerprint(tiny_llama(1))
    assert wrap(tiny_llama(0), "ssmlora").base_fingerprint == fingerprint(tiny_llama(0))
    meta = meta_model("llama-2-7b")
    assert next(meta.parameters()).device.type == "meta" and len(fingerprint(meta)) == 16


def test_unknown_embedded_name_and_unloadable_base():
    with pytest.raises(LongctxError, match="unknown embedded base 'longctx-huge'; valid choices: longctx-tiny"):
        default_base_path("longctx-huge")
    with pytest.raises(LongctxError, match="cannot load base model"):
        load_base("/definitely/not/here")


def test_local_directory_loads_through_the_same_path(tiny_base_dir):
    model, tok = load_base(str(tiny_base_dir))
    assert not model.training and model.config._attn_implementation == "longctx_sdpa"
    ids = tok("The sky is blue.", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_cuda_asked_for_without_one_is_an_error_not_a_cpu_fall_back():
    from longctx.engine.bases import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LongctxError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LongctxError, match="device 'cuda' asked for, but this machine has no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(LongctxError, match="no CUDA device"):
            load_base("longctx-tiny", device="cuda:0")


def test_dtype_auto_keeps_the_checkpoint_dtype_and_names_bad_ones(tmp_path):
    from conftest import save_tiny_base

    from longctx.engine.bases import parse_dtype

    with pytest.raises(LongctxError, match="unknown dtype 'float8'; valid choices: auto, float32"):
        parse_dtype("float8")
    path = save_tiny_base(tmp_path / "bf16")
    model, _ = load_base(str(path), dtype="bfloat16")
    model.save_pretrained(path)  # now a bf16 checkpoint
    assert next(load_base(str(path))[0].parameters()).dtype == torch.bfloat16  # auto
    assert next(load_base(str(path), dtype="float32")[0].parameters()).dtype == torch.float32


@pytest.mark.slow
def test_a_bf16_checkpoint_loads_without_a_float32_copy_in_host_memory(tmp_path):
    """Peak resident memory while loading a 297 MiB bf16 checkpoint stays well below what any
    float32 copy would add: loading goes straight to the dtype (measured: 153 MiB; the same
    checkpoint loaded as float32: 1,037 MiB)."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    from conftest import save_char_tokenizer
    save_char_tokenizer(tmp_path / "m")
    probe = ("import torch, transformers, longctx.engine.bases as m\n"
             "from longctx.engine.measure import PeakMemory\n"
             "with PeakMemory('cpu') as pm: model, _ = m.load_base(%r)\n"
             "assert next(model.parameters()).dtype == torch.bfloat16\n"
             "print(pm.delta_bytes)" % str(tmp_path / "m"))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    delta, bf16_bytes = int(out.stdout.split()[-1]), 2 * params
    assert delta < 1.6 * bf16_bytes, (delta / 2**20, bf16_bytes / 2**20)
