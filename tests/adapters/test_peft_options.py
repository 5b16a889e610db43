"""A LoRA directory saved by PEFT loads as PEFT loads it, option by option (docs/peft-options.md).

Each case builds an adapter with PEFT on the tiny Llama base, gives it random non-zero weights,
saves it with `save_pretrained` and loads it through `load_adapter`: the logits, unchunked and
chunked, equal those of `PeftModel.from_pretrained` on the same base; or the load is refused in
one line naming the option.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from longctx.adapters import load_adapter
from longctx.core.errors import LongctxError
from longctx.engine.runner import chunked_forward

TOLERANCE = 1e-4  # max abs logit difference, float32
N_TOKENS, CHUNK = 24, 7


def tiny_llama_with_biases():
    """The tiny Llama with a bias on every projection (zero at init, as HF initialises them), so
    that PEFT's `bias` option has biases to train."""
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


# (id, LoraConfig options on top of r=8, alpha=16 on q_proj/v_proj, base, refusal or None)
CASES = [
    ("use_rslora", {"use_rslora": True}, tiny_llama, None),
    ("rank_pattern", {"rank_pattern": {"v_proj": 2, r"model\.layers\.3\.self_attn\.q_proj": 16}}, tiny_llama, None),
    ("alpha_pattern", {"alpha_pattern": {r"model\.layers\.1\.self_attn\.q_proj": 64}}, tiny_llama, None),
    ("layers_to_transform", {"layers_to_transform": [0, 2]}, tiny_llama, None),
    ("layers_pattern", {"layers_to_transform": [1], "layers_pattern": "layers"}, tiny_llama, None),
    ("use_dora", {"use_dora": True}, tiny_llama, None),
    ("bias=all", {"bias": "all"}, tiny_llama_with_biases, None),
    ("bias=lora_only", {"bias": "lora_only"}, tiny_llama_with_biases, None),
    ("lora_bias", {"lora_bias": True}, tiny_llama, None),
    ("modules_to_save", {"modules_to_save": ["lm_head", "norm"]}, tiny_llama, None),
    ("target_modules regex", {"target_modules": r".*\.layers\.[02]\.(self_attn\.o_proj|mlp\.up_proj)"}, tiny_llama,
     None),
    ("target_modules all-linear", {"target_modules": "all-linear"}, tiny_llama, None),
    ("exclude_modules", {"target_modules": ["q_proj", "v_proj", "o_proj"], "exclude_modules": ["o_proj"]},
     tiny_llama, None),
    ("fan_in_fan_out", {"fan_in_fan_out": True}, tiny_llama, None),
    ("init_lora_weights=False", {"init_lora_weights": False}, tiny_llama, None),
    ("init_lora_weights=gaussian", {"init_lora_weights": "gaussian"}, tiny_llama, None),
    ("init_lora_weights=pissa", {"init_lora_weights": "pissa"}, tiny_llama, None),  # residual base, as PEFT
    ("init_lora_weights=olora", {"init_lora_weights": "olora"}, tiny_llama, None),
    ("trainable_token_indices", {"trainable_token_indices": [3, 4, 5]}, tiny_llama, None),
    ("layer_replication", {"layer_replication": [[0, 2], [1, 4]]}, tiny_llama, None),
    ("alora_invocation_tokens", {"alora_invocation_tokens": [5, 6]}, tiny_llama,
     "alora_invocation_tokens=[5, 6] is not supported"),
]


def save_peft_adapter(base, options: dict, directory) -> None:
    """A PEFT LoRA adapter on `base` with `options`, every trainable tensor (LoRA A and B, DoRA
    magnitudes, biases, saved modules) moved off its initial value, saved by PEFT."""
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                           "task_type": "CAUSAL_LM", **options})
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(directory)


def all_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("options, make_base, refusal", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_peft_option_loads_as_peft_loads_it_or_is_refused(options, make_base, refusal, tmp_path):
    save_peft_adapter(make_base(), options, tmp_path / "peft")
    if refusal:
        with pytest.raises(LongctxError) as err:
            load_adapter(make_base(), tmp_path / "peft")
        assert refusal in str(err.value) and "\n" not in str(err.value)
        return
    ids = random_ids(1, N_TOKENS)
    reference = all_logits(PeftModel.from_pretrained(make_base(), tmp_path / "peft").eval(), ids)
    assert (reference - all_logits(make_base(), ids)).abs().max() > 1e-2  # the adapter is no no-op
    ours = load_adapter(make_base(), tmp_path / "peft")
    assert ours.method.name == "lora" and ours.recipe.insertion  # a regex: the modules PEFT matched
    every = torch.arange(N_TOKENS)
    for chunk_size in (None, CHUNK):
        got = chunked_forward(ours, ids, chunk_size=chunk_size, keep=every)
        assert got.n_chunks == (1 if chunk_size is None else -(-N_TOKENS // CHUNK))
        assert (got.logits - reference).abs().max() <= TOLERANCE, chunk_size


def test_rslora_scaling_is_peft_s_and_survives_a_longctx_save(tmp_path):
    """The issue's case: rslora scales by alpha / sqrt(r) (16 / sqrt(8)), not alpha / r (2); saved
    again by longctx and reloaded, the directory still carries it."""
    save_peft_adapter(tiny_llama(), {"use_rslora": True}, tmp_path / "peft")
    ours = load_adapter(tiny_llama(), tmp_path / "peft")
    again = load_adapter(tiny_llama(), ours.save(tmp_path / "ours"))
    for adapted in (ours, again):
        layer = adapted.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
        assert layer.scaling["default"] == pytest.approx(16 / 8 ** 0.5)
    ids = random_ids(1, N_TOKENS)
    assert torch.equal(all_logits(again, ids), all_logits(ours, ids))


def test_config_peft_rejects_is_one_line_naming_the_file(tmp_path):
    save_peft_adapter(tiny_llama(), {}, tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "layers_pattern": "layers", "layers_to_transform": None}))
    with pytest.raises(LongctxError) as err:
        load_adapter(tiny_llama(), tmp_path / "peft")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "layers_pattern" in message


def test_lm_eval_model_with_a_peft_adapter_equals_hf_with_peft(tmp_path):
    """`--model ssmlora --model_args pretrained=longctx-tiny,adapter=DIR,chunk_size=…` scores as
    lm-eval's own `hf` model with `peft=DIR` on the same base."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from longctx.engine.bases import load_base
    from longctx.engine.settings import default_base_path
    from longctx.lmeval.model import SsmloraLM

    save_peft_adapter(load_base("longctx-tiny")[0], {"use_rslora": True, "rank_pattern": {"v_proj": 4}},
                      tmp_path / "peft")
    text = "The grass is green. The sky is blue. " * 4
    requests = [Instance("loglikelihood", {}, (text + "The pass key is", " 12345."), 0)]
    ours = SsmloraLM(pretrained="longctx-tiny", adapter=str(tmp_path / "peft"), chunk_size=8)
    theirs = HFLM(pretrained=str(default_base_path()), peft=str(tmp_path / "peft"), device="cpu", batch_size=1,
                  dtype="float32")
    base = HFLM(pretrained=str(default_base_path()), device="cpu", batch_size=1, dtype="float32")
    (got, _), (want, _) = ours.loglikelihood(requests)[0], theirs.loglikelihood(requests)[0]
    assert ours.log.records[0].chunks > 1
    assert abs(got - want) <= TOLERANCE and abs(want - base.loglikelihood(requests)[0][0]) > 1e-2
