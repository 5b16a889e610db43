"""Canaries: every internal of transformers, lm-eval and PEFT that longctx reaches into, checked by
name and signature. When a release moves one, the failure here names the library, its version,
the internal and the longctx module that relies on it — before a user's run meets it.

(Public, documented APIs — `AutoModelForCausalLM`, `LoraConfig`, `simple_evaluate` … — are
covered by the behaviour tests; this table is for what a release may move without notice.)
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect

import pytest
import torch

# (distribution, module, attribute, parameters its callable must take, longctx module using it)
INTERNALS = [
    ("transformers", "transformers.cache_utils", "DynamicCache", ("config",), "longctx/engine/cache.py, runner.py"),
    ("transformers", "transformers.cache_utils", "DynamicLayer", (), "longctx/engine/cache.py"),
    ("transformers", "transformers.cache_utils", "DynamicLayer.lazy_initialization", ("key_states", "value_states"),
     "longctx/engine/cache.py"),
    ("transformers", "transformers.cache_utils", "DynamicLayer.update", ("key_states", "value_states"),
     "longctx/engine/cache.py"),
    ("transformers", "transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS", (), "longctx/engine/attention.py"),
    ("transformers", "transformers.masking_utils", "flash_attention_mask", (), "longctx/engine/attention.py"),
    ("transformers", "transformers", "AttentionInterface.register", (), "longctx/engine/attention.py"),
    ("transformers", "transformers.models.mamba.modeling_mamba", "MambaMixer.forward", ("hidden_states",),
     "longctx/engine/mamba.py, adapters/sdlora.py"),
    ("transformers", "transformers.models.mamba.modeling_mamba", "mamba_selective_scan", (), "longctx/engine/mamba.py"),
    ("transformers", "transformers.models.mamba.modeling_mamba", "apply_mask_to_padding_states", (),
     "longctx/engine/mamba.py"),
    ("transformers", "transformers.models.mamba.modeling_mamba", "causal_conv1d_fn", (), "longctx/engine/mamba.py"),
    ("transformers", "transformers.trainer_callback", "PrinterCallback", (), "longctx/training/train.py"),
    ("transformers", "transformers.trainer", "TRAINER_STATE_NAME", (), "longctx/training/train.py"),
    ("transformers", "transformers.integrations.accelerate", "check_and_set_device_map", ("device_map",),
     "longctx/engine/placement.py"),
    ("transformers", "transformers.integrations.accelerate", "_get_device_map",
     ("model", "device_map", "max_memory"), "longctx/engine/placement.py"),
    ("lm-eval", "lm_eval.models.huggingface", "HFLM.__init__",
     ("pretrained", "tokenizer", "batch_size", "max_length", "add_bos_token"), "longctx/lmeval/model.py"),
    ("lm-eval", "lm_eval.models.utils", "handle_stop_sequences", (), "longctx/lmeval/model.py"),
    ("lm-eval", "lm_eval.api.registry", "model_registry", (), "longctx/lmeval/plugin.py"),
    ("lm-eval", "lm_eval.tasks.manager", "TaskManager.__init__", ("include_path", "include_defaults"),
     "longctx/lmeval/plugin.py"),
    ("lm-eval", "lm_eval.api.task", "ConfigurableTask", (), "longctx/lmeval/tasks/glue.py"),
    ("peft", "peft.tuners.lora", "LoraLayer", (), "longctx/adapters/sdlora.py"),
    ("peft", "peft.tuners.lora", "Linear", (), "longctx/adapters/sdlora.py"),
]


def _resolve(module: str, attribute: str) -> object:
    obj: object = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("dist,module,attribute,params,user", INTERNALS,
                         ids=[f"{d}:{a}" for d, _, a, _, _ in INTERNALS])
def test_internal_is_where_longctx_reaches_for_it(dist, module, attribute, params, user):
    where = f"{dist} {importlib.metadata.version(dist)}: {module}.{attribute}"
    try:
        obj = _resolve(module, attribute)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{where} has moved ({exc}); {user} relies on it")
    if params:
        taken = inspect.signature(obj).parameters  # type: ignore[arg-type]
        missing = [p for p in params if p not in taken]
        assert not missing, f"{where} no longer takes {missing}; {user} passes them"


def test_mamba_cache_keyword_is_one_longctx_knows():
    """longctx.engine.mamba.cache_keyword reads the mixer's cache argument: `cache` (5.24+) or `cache_params`."""
    mixer = _resolve("transformers.models.mamba.modeling_mamba", "MambaMixer.forward")
    names = inspect.signature(mixer).parameters  # type: ignore[arg-type]
    version = importlib.metadata.version("transformers")
    assert {"cache", "cache_params"} & set(names), (
        f"transformers {version}: MambaMixer.forward takes neither `cache` nor `cache_params` "
        f"({list(names)}); longctx/engine/mamba.py passes the carried state under one of them")


def test_mamba_scan_and_convolution_take_the_arguments_longctx_passes():
    """Called, not inspected: transformers 5.25 wraps both in kernel-dispatch modules whose
    signature is (*args, **kwargs). longctx/engine/mamba.py's chunk path calls them exactly so."""
    module = "transformers.models.mamba.modeling_mamba"
    version = importlib.metadata.version("transformers")
    scan, conv = _resolve(module, "mamba_selective_scan"), _resolve(module, "causal_conv1d_fn")
    b, d, t, n = 1, 2, 3, 2
    x, dt, z = torch.randn(b, d, t), torch.randn(b, d, t), torch.randn(b, d, t)  # (B, D, T)
    a, bb, cc = -torch.rand(d, n), torch.randn(b, n, t), torch.randn(b, n, t)  # (D, N), (B, N, T)
    try:
        y, last = scan(x, dt, a, bb, cc, D=torch.ones(d), z=z, delta_bias=torch.zeros(d), delta_softplus=True,
                       return_last_state=True, use_mambapy=False)
        out = conv(torch.randn(b, d, t + 3), torch.randn(d, 4), torch.zeros(d), activation="silu")
    except TypeError as exc:
        pytest.fail(f"transformers {version}: {module}'s scan or convolution no longer takes longctx/engine/mamba.py's "
                    f"arguments ({exc})")
    assert y.shape == (b, d, t) and last.shape == (b, d, n), f"transformers {version}: scan output shapes moved"
    assert out.shape == (b, d, t + 3), f"transformers {version}: causal_conv1d_fn output shape moved"
