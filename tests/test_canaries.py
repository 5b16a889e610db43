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

# (distribution, module, attribute, parameters its callable must take, longctx module using it)
INTERNALS = [
    ("transformers", "transformers.cache_utils", "DynamicCache", ("config",), "longctx/cache.py, runner.py"),
    ("transformers", "transformers.cache_utils", "DynamicLayer", (), "longctx/cache.py"),
    ("transformers", "transformers.cache_utils", "DynamicLayer.lazy_initialization", ("key_states", "value_states"),
     "longctx/cache.py"),
    ("transformers", "transformers.cache_utils", "DynamicLayer.update", ("key_states", "value_states"),
     "longctx/cache.py"),
    ("transformers", "transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS", (), "longctx/attention.py"),
    ("transformers", "transformers.masking_utils", "flash_attention_mask", (), "longctx/attention.py"),
    ("transformers", "transformers", "AttentionInterface.register", (), "longctx/attention.py"),
    ("transformers", "transformers.models.mamba.modeling_mamba", "MambaMixer.forward", ("hidden_states",),
     "longctx/mamba.py, adapters/sdlora.py"),
    ("transformers", "transformers.models.mamba.modeling_mamba", "mamba_selective_scan",
     ("delta_bias", "delta_softplus", "return_last_state", "use_mambapy"), "longctx/mamba.py"),
    ("transformers", "transformers.models.mamba.modeling_mamba", "apply_mask_to_padding_states", (),
     "longctx/mamba.py"),
    ("transformers", "transformers.models.mamba.modeling_mamba", "causal_conv1d_fn", ("activation",),
     "longctx/mamba.py"),
    ("transformers", "transformers.trainer_callback", "PrinterCallback", (), "longctx/train.py"),
    ("transformers", "transformers.trainer_utils", "get_last_checkpoint", (), "longctx/train.py"),
    ("lm-eval", "lm_eval.models.huggingface", "HFLM.__init__",
     ("pretrained", "tokenizer", "batch_size", "max_length", "add_bos_token"), "longctx/lmeval_model.py"),
    ("lm-eval", "lm_eval.models.utils", "handle_stop_sequences", (), "longctx/lmeval_model.py"),
    ("lm-eval", "lm_eval.api.registry", "model_registry", (), "longctx/lmeval_plugin.py"),
    ("lm-eval", "lm_eval.tasks.manager", "TaskManager.__init__", ("include_path", "include_defaults"),
     "longctx/lmeval_plugin.py"),
    ("lm-eval", "lm_eval.api.task", "ConfigurableTask", (), "longctx/tasks/lmeval_task.py"),
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
    """longctx.mamba.cache_keyword reads the mixer's cache argument: `cache` (5.24+) or `cache_params`."""
    mixer = _resolve("transformers.models.mamba.modeling_mamba", "MambaMixer.forward")
    names = inspect.signature(mixer).parameters  # type: ignore[arg-type]
    version = importlib.metadata.version("transformers")
    assert {"cache", "cache_params"} & set(names), (
        f"transformers {version}: MambaMixer.forward takes neither `cache` nor `cache_params` "
        f"({list(names)}); longctx/mamba.py passes the carried state under one of them")
