"""Base-model plumbing: backend choice, families, position limits, fingerprints."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from longctx.errors import LongctxError
from longctx.models import (check_length, choose_attn_implementation, default_base_path, fingerprint,
                            load_base, meta_model, model_family, position_limit)


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
