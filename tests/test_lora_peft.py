"""`lora` is PEFT's LoRA: equal to PeftModel on the same weights, and PEFT directories load."""
from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from conftest import perturb, random_ids, tiny_llama
from longctx.adapters import load_adapter, wrap


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
    ours = wrap(tiny_llama(), "lora")
    perturb(ours)
    ours.save(tmp_path / "ours")
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    ids = random_ids(1, 40)
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=0)
