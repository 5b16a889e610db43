"""Invariants every adapter method shares (table-driven over METHODS)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import METHODS, OWN_PARAMS, perturb, random_ids, tiny_llama

from longctx.adapters import ADAPTERS, METHOD_NAMES, get_adapter, load_adapter, saved_metadata, wrap
from longctx.adapters import METHODS as TABLE
from longctx.core.errors import LongctxError
from longctx.engine.runner import chunked_forward


def logits(adapted_or_model, ids, mask=None):
    with torch.no_grad():
        return adapted_or_model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_equals_base(method, ids):
    reference = logits(tiny_llama(), ids)
    adapted = wrap(tiny_llama(), method)
    if method == "lora-xs":  # R starts at N(0, r_init_std²) as in its reference, not at 0: a fresh
        gap = (logits(adapted, ids) - reference).abs().max().item()  # one is close (measured 3.6e-5)
        assert 0 < gap < 10 * adapted.recipe.alpha / adapted.recipe.rank * adapted.recipe.r_init_std
        with torch.no_grad():  # and exactly the base with R = 0
            for param in filter(lambda p: p.requires_grad, adapted.model.parameters()):
                param.zero_()
    torch.testing.assert_close(logits(adapted, ids), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_only_the_methods_parameters_train(method):
    adapted = wrap(tiny_llama(), method)
    trainable = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in adapted.model.named_parameters() if not p.requires_grad]
    prefix = OWN_PARAMS[method]
    if prefix is None:
        assert trainable == []
    elif prefix == "":
        assert frozen == [] and adapted.trainable_parameters() == adapted.total_parameters()
    else:
        assert trainable and all(prefix in n for n in trainable)
        assert not any(prefix in n for n in frozen)
    assert adapted.trainable_parameters() == sum(p.numel() for p in adapted.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, ids, tmp_path):
    adapted = wrap(tiny_llama(), method)
    perturb(adapted)
    expected = logits(adapted, ids)
    adapted.save(tmp_path / "adapter")
    config = saved_metadata(tmp_path / "adapter")
    assert config["method"] == method and config["base_fingerprint"]
    reloaded = load_adapter(tiny_llama(), tmp_path / "adapter")
    assert reloaded.method.name == method and reloaded.insertion_points == adapted.insertion_points
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_same_input_twice_gives_same_logits(method, ids):
    adapted = wrap(tiny_llama(), method)
    perturb(adapted)
    first = chunked_forward(adapted, ids, chunk_size=40, keep=torch.arange(96)).logits
    other = chunked_forward(adapted, random_ids(2, 96, seed=5), chunk_size=40).logits  # another sequence
    second = chunked_forward(adapted, ids, chunk_size=40, keep=torch.arange(96)).logits
    assert other.shape[1] == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(logits(adapted, ids), logits(adapted, ids), rtol=0, atol=0)


# ssmlora is checked in one forward only: its chunk carry is position-aligned by definition
# (design §4), so left padding shifts which token inherits which state between chunks.
PADDING_CASES = [(m, c) for m in METHODS for c in (None, 16) if not (m == "ssmlora" and c)]


@pytest.mark.parametrize("method, chunk_size", PADDING_CASES)
def test_left_padding_does_not_change_real_tokens(method, chunk_size):
    adapted = wrap(tiny_llama(), method)
    perturb(adapted)
    short, long = random_ids(1, 40, seed=2), random_ids(1, 64, seed=3)
    pad = 64 - 40
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])  # (2, 64)
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    keep = torch.arange(64)
    padded = chunked_forward(adapted, batch, mask, chunk_size=chunk_size, keep=keep).logits
    alone = chunked_forward(adapted, short, chunk_size=chunk_size, keep=torch.arange(40)).logits
    torch.testing.assert_close(padded[0, pad:], alone[0], rtol=0, atol=1e-4)
    other = chunked_forward(adapted, long, chunk_size=chunk_size, keep=keep).logits
    torch.testing.assert_close(padded[1], other[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_for_another_base_is_refused(method, tmp_path):
    adapted = wrap(tiny_llama(seed=0), method)
    adapted.save(tmp_path / "a")
    with pytest.raises(LongctxError, match="fingerprint") as err:
        load_adapter(tiny_llama(seed=1), tmp_path / "a")
    assert "\n" not in str(err.value)


def test_missing_and_corrupt_directories_give_one_line_errors(tmp_path):
    with pytest.raises(LongctxError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongctxError, match="no adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "empty")
    wrap(tiny_llama(), "ssmlora").save(tmp_path / "bad")
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(LongctxError, match="corrupt"):
        load_adapter(tiny_llama(), tmp_path / "bad")
    wrap(tiny_llama(), "ssmlora").save(tmp_path / "trunc")
    weights = tmp_path / "trunc" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(LongctxError, match="cannot read"):
        load_adapter(tiny_llama(), tmp_path / "trunc")


def test_unknown_method_and_bad_recipe_values():
    with pytest.raises(LongctxError, match="unknown method 'lorax'; valid choices: base, dense, lora"):
        wrap(tiny_llama(), "lorax")
    with pytest.raises(LongctxError, match="rank must be a positive integer"):
        wrap(tiny_llama(), "ssmlora", rank=0)
    with pytest.raises(LongctxError, match="unknown recipe field 'rnak'"):
        wrap(tiny_llama(), "ssmlora", rnak=4)
    with pytest.raises(LongctxError, match="matched no module.*found: .*q_proj"):
        wrap(tiny_llama(), "ssmlora", insertion=["qkv"])


def test_failed_save_leaves_previous_directory_intact(tmp_path, monkeypatch):
    adapted = wrap(tiny_llama(), "ssmlora")
    adapted.save(tmp_path / "a")
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        adapted.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary left behind


def test_the_methods_table_names_each_class_once_in_display_order():
    assert METHOD_NAMES == tuple(TABLE) == tuple(ADAPTERS) and len(ADAPTERS) == len(TABLE)
    assert METHOD_NAMES[:3] == ("base", "dense", "lora")  # the order the CLI and the plots show
    for name in METHOD_NAMES:
        assert name in ADAPTERS and get_adapter(name).name == name
        assert ADAPTERS[name] is get_adapter(name)  # one instance per method
    assert "nope" not in ADAPTERS
    with pytest.raises(KeyError):
        ADAPTERS["nope"]
    with pytest.raises(LongctxError, match="unknown method 'nope'; valid choices: base, dense, lora"):
        get_adapter("nope")


def test_the_table_and_the_plots_import_no_torch():
    code = ("import sys, longctx.adapters, longctx.plots; assert longctx.adapters.METHOD_NAMES; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
