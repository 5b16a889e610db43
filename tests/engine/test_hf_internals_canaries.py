"""Canaries: every internal of transformers and PEFT that longctx reaches into, checked by
name and signature. When a release moves one, the failure here names the library, its version,
the internal and the longctx module that relies on it — before a user's run meets it. lm-eval's
are in tests/lmeval/test_harness_canaries.py.

(Public, documented APIs — `AutoModelForCausalLM`, `LoraConfig`, `get_peft_model` … — are
covered by the behaviour tests; this table is for what a release may move without notice.)
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
from pathlib import Path

import pytest
import torch

from longctx.engine.hf_internals import TRAINER_STATE_NAME

HF = "longctx/engine/hf_internals.py"  # the one module that reaches into transformers' internals
PEFT = "longctx/adapters/peft_seam.py"  # the one module that uses PEFT
MAMBA = "transformers.models.mamba.modeling_mamba"

# (distribution, module, attribute, parameters its callable must take, longctx module relying on it)
INTERNALS = [
    ("transformers", "transformers.cache_utils", "DynamicCache", ("config",), HF),
    ("transformers", "transformers.cache_utils", "DynamicLayer", (), HF),
    ("transformers", "transformers.cache_utils", "DynamicLayer.lazy_initialization", ("key_states", "value_states"),
     HF),
    ("transformers", "transformers.cache_utils", "DynamicLayer.update", ("key_states", "value_states"), HF),
    ("transformers", "transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS", (), HF),
    ("transformers", "transformers.masking_utils", "flash_attention_mask", (), HF),
    ("transformers", "transformers", "AttentionInterface.register", (), HF),
    ("transformers", MAMBA, "MambaMixer.forward", ("hidden_states",), HF),
    ("transformers", MAMBA, "mamba_selective_scan", (), HF),
    ("transformers", MAMBA, "apply_mask_to_padding_states", (), HF),
    ("transformers", MAMBA, "causal_conv1d_fn", (), HF),
    ("transformers", "transformers", "LlamaForCausalLM.forward", ("input_ids", "position_ids", "logits_to_keep"), HF),
    ("transformers", "transformers.trainer_callback", "PrinterCallback", (), HF),
    ("transformers", "transformers.trainer", "TRAINER_STATE_NAME", (), HF),
    ("transformers", "transformers.integrations.accelerate", "check_and_set_device_map", ("device_map",), HF),
    ("transformers", "transformers.integrations.accelerate", "_get_device_map",
     ("model", "device_map", "max_memory"), HF),
    ("peft", "peft", "LoraConfig.from_peft_type", (), PEFT),
    ("peft", "peft", "LoraConfig.check_kwargs", (), PEFT),
    ("peft", "peft.tuners.lora", "LoraLayer", (), PEFT),
    ("peft", "peft.tuners.lora", "Linear", ("base_layer", "adapter_name", "config", "r", "lora_alpha"), PEFT),
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
        pytest.fail(f"{where} has moved; {user} relies on it ({exc})")
    if params:
        taken = inspect.signature(obj).parameters  # type: ignore[arg-type]
        missing = [p for p in params if p not in taken]
        assert not missing, f"{where} no longer takes {missing}; {user} passes them"


def test_cache_keywords_are_ones_longctx_knows():
    """hf_internals reads the cache argument's name off the classes: `cache` (5.24+) or the old names."""
    version = importlib.metadata.version("transformers")
    mixer = inspect.signature(_resolve(MAMBA, "MambaMixer.forward")).parameters  # type: ignore[arg-type]
    assert {"cache", "cache_params"} & set(mixer), (
        f"transformers {version}: MambaMixer.forward takes neither `cache` nor `cache_params` "
        f"({list(mixer)}); {HF} passes the carried state under one of them")
    llama = inspect.signature(_resolve("transformers", "LlamaForCausalLM.forward")).parameters  # type: ignore[arg-type]
    assert {"cache", "past_key_values"} & set(llama), (
        f"transformers {version}: LlamaForCausalLM.forward takes neither `cache` nor `past_key_values` "
        f"({list(llama)}); {HF} passes the KV cache under one of them")


def test_checkpoint_file_name_is_the_one_trainer_writes_last():
    """hf_internals spells TRAINER_STATE_NAME out, so that reading checkpoints skips importing the trainer."""
    version = importlib.metadata.version("transformers")
    theirs = _resolve("transformers.trainer", "TRAINER_STATE_NAME")
    assert theirs == TRAINER_STATE_NAME, (
        f"transformers {version}: TRAINER_STATE_NAME is {theirs!r}, not {TRAINER_STATE_NAME!r}; {HF} relies on it")


def test_mamba_scan_and_convolution_take_the_arguments_longctx_passes():
    """Called, not inspected: transformers 5.25 wraps both in kernel-dispatch modules whose
    signature is (*args, **kwargs). longctx/engine/mamba.py's chunk path calls them exactly so,
    reaching them through hf_internals.mamba_slow_path."""
    module = MAMBA
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
        pytest.fail(f"transformers {version}: {module}'s scan or convolution no longer takes the arguments "
                    f"longctx/engine/mamba.py passes them through {HF} ({exc})")
    assert y.shape == (b, d, t) and last.shape == (b, d, n), f"transformers {version}: scan output shapes moved"
    assert out.shape == (b, d, t + 3), f"transformers {version}: causal_conv1d_fn output shape moved"


PACKAGE = Path(__file__).resolve().parents[2] / "longctx"
SEAMS = {"transformers.": HF, "peft": PEFT}  # an import of a module starting so belongs in that seam only


def _foreign_reaches(path: Path) -> list[str]:
    """`line: what` for each import of a transformers submodule or of PEFT, and each use of a
    config's private `_attn_implementation`, in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [f"{node.lineno}: import {n}" for n in names if n.startswith(tuple(SEAMS)) or n == "peft"]
        if isinstance(node, ast.Attribute) and node.attr == "_attn_implementation" or (
                isinstance(node, ast.Constant) and node.value == "_attn_implementation"):
            found.append(f"{node.lineno}: _attn_implementation")
    return found


@pytest.mark.parametrize("layer", ["engine", "adapters", "training", "pretrain"])
def test_only_the_seams_reach_into_transformers_and_peft(layer):
    seams = {PACKAGE.parent / seam for seam in SEAMS.values()}
    stray = {str(path.relative_to(PACKAGE.parent)): reaches for path in sorted((PACKAGE / layer).rglob("*.py"))
             if path not in seams and (reaches := _foreign_reaches(path))}
    assert not stray, f"transformers internals or PEFT reached outside {HF} / {PEFT}: {stray}"
