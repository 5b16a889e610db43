"""`lora` is PEFT's LoRA: equal to PeftModel on the same weights, and PEFT directories load."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import perturb, random_ids, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from longctx.adapters import load_adapter, saved_metadata, wrap
from longctx.core.errors import LongctxError


def peft_lora(model):
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_equals_peft_model_with_the_same_weights():
    ours = wrap(tiny_llama(), "lora")
    perturb(ours)
    theirs = peft_lora(tiny_llama())
    set_peft_model_state_dict(theirs, ours.method.weights(ours.model))
    assert ours.insertion_points == [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]
    assert ours.trainable_parameters() == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    ids = random_ids(2, 50)
    assert (logits(ours, ids) - logits(tiny_llama(), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=0)


def test_directory_saved_by_peft_loads_with_equal_logits(tmp_path):
    theirs = peft_lora(tiny_llama())
    perturb(type("Holder", (), {"model": theirs})())
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_llama(), tmp_path / "peft")
    assert ours.method.name == "lora" and ours.recipe.rank == 8 and ours.recipe.alpha == 16
    ids = random_ids(1, 40)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=0)


def test_peft_loads_our_directory(tmp_path):
    """...without a warning: longctx's own block is in longctx_config.json, not among PEFT's keys."""
    ours = wrap(tiny_llama(), "lora")
    perturb(ours)
    ours.save(tmp_path / "ours")
    assert "longctx" not in json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved_metadata(tmp_path / "ours")["method"] == "lora"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    ids = random_ids(1, 40)
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=0)


def test_directory_saved_with_the_block_in_adapter_config_still_loads(tmp_path):
    """Directories saved before longctx_config.json existed carry the block as adapter_config.json's
    `longctx` key: they load with their recipe and their base is still checked."""
    ours = wrap(tiny_llama(), "lora", insertion="sparse-qv")
    perturb(ours)
    directory = ours.save(tmp_path / "old")
    config = json.loads((directory / "adapter_config.json").read_text())
    block = (directory / "longctx_config.json").read_text()
    (directory / "adapter_config.json").write_text(json.dumps({**config, "longctx": json.loads(block)}))
    (directory / "longctx_config.json").unlink()
    loaded = load_adapter(tiny_llama(), directory)
    assert loaded.recipe == ours.recipe and loaded.insertion_points == ours.insertion_points
    ids = random_ids(1, 40)
    torch.testing.assert_close(logits(loaded, ids), logits(ours, ids), rtol=0, atol=0)
    with pytest.raises(LongctxError, match="was made for base"):
        load_adapter(tiny_llama(seed=1), directory)
