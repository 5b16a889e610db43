"""SDLoRA on Mamba: the shared adapter invariants, the reference's selection sizes, save/load,
and `longctx params` counting what trains after selection (numerics against a plain reference
forward, frozen unselected entries and the discarded warm-up: tests/adapters/test_reference_sdlora.py)."""
from __future__ import annotations

import pytest
import torch
from conftest import perturb, random_ids
from conftest import tiny_mamba

from longctx.adapters import load_adapter, wrap
from longctx.core.errors import LongctxError


def test_fresh_adapter_equals_base_and_only_its_parameters_train():
    ids = random_ids(1, 30)
    adapted = wrap(tiny_mamba(), "sdlora")
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, tiny_mamba()(ids).logits)
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert sorted({n.split(".mixer.")[1] for n in names}) == [
        "out_proj.lora_A.default.weight", "out_proj.lora_B.default.weight", "sdlora_delta_A"]  # warm-up: all of A_log


def test_reference_sizes_are_selected_and_counted():
    """1% of channels (the reference's round(0.99 D) frozen, at least one), 25% of states; A_log at
    the selected entries and x_proj's B and C columns of the selected channels train."""
    from longctx.adapters.sdlora import n_trained

    assert (n_trained(1536, 0.99), n_trained(16, 0.75), n_trained(16, 0.9), n_trained(16, 0.95)) == (15, 4, 2, 1)
    assert n_trained(96, 0.99) == 1 and n_trained(40, 0.99) == 1  # the tiny model; never empty
    adapted = wrap(tiny_mamba(), "sdlora")
    report = adapted.method.select_dimensions(adapted.model)
    d_inner, n_state, layers = 96, 8, 2
    per_mixer = 1 * 2 + 2 * n_state * 1  # A_log (k_c x k_s) + x_proj's B and C columns (2 N x k_c)
    assert report == {"channels": layers, "selected_ssm_entries": layers * per_mixer,
                      "ssm_entries": layers * 3 * d_inner * n_state}
    lora = layers * 8 * (d_inner + 48)  # r (in + out) on each out_proj
    assert adapted.trainable_parameters() == lora + layers * per_mixer
    assert adapted.method.select_dimensions(adapted.model) == report  # a second call changes nothing


def test_save_load_round_trip_after_selection(tmp_path):
    adapted = wrap(tiny_mamba(), "sdlora")
    adapted.method.select_dimensions(adapted.model)
    perturb(adapted)
    adapted.save(tmp_path / "a")
    loaded = load_adapter(tiny_mamba(), tmp_path / "a")
    ids = random_ids(1, 30)
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, loaded(ids).logits)


def test_an_adapter_saved_in_the_old_layout_fails_with_one_clear_error(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    directory = wrap(tiny_mamba(), "sdlora").save(tmp_path / "a")
    config = json.loads((directory / "adapter_config.json").read_text())
    config["longctx"]["recipe"].update(alpha=16.0, dropout=0.0, insertion="every-qv")  # the old recipe
    (directory / "adapter_config.json").write_text(json.dumps(config))
    old = {k: v for k, v in load_file(directory / "adapter_model.safetensors").items() if k.startswith("sdlora.")}
    old |= {"base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight": torch.zeros(8, 48),
            "sdlora.0.delta_D": torch.zeros(96)}
    save_file(old, directory / "adapter_model.safetensors")
    with pytest.raises(LongctxError, match="earlier layout.*retrain"):
        load_adapter(tiny_mamba(), directory)


def test_mismatched_base_is_refused(tmp_path):
    wrap(tiny_mamba(), "sdlora").save(tmp_path / "a")
    with pytest.raises(LongctxError, match="base"):
        load_adapter(tiny_mamba(seed=3), tmp_path / "a")


def test_llama_bases_are_refused():
    from conftest import tiny_llama

    with pytest.raises(LongctxError, match="sdlora tunes the SSM of Mamba models"):
        wrap(tiny_llama(), "sdlora")


@pytest.fixture(scope="module")
def mamba_base(tmp_path_factory):
    """The tiny Mamba saved as a base directory, with the tiny tokenizer."""
    from conftest import save_tiny_base

    base = save_tiny_base(tmp_path_factory.mktemp("tiny-mamba"))
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (base / name).unlink(missing_ok=True)
    tiny_mamba().save_pretrained(base)
    return base


def _params_trainable(base, capsys) -> int:
    """`longctx params --base BASE --method sdlora` (the CLI's entry point, in this process): its
    trainable figure."""
    import re

    from longctx import cli

    capsys.readouterr()
    assert cli.main(["params", "--base", str(base), "--method", "sdlora"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    cells = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip())))
    assert cells["method"] == "sdlora"
    return int(cells["trainable"].replace(",", ""))


def test_params_reports_what_trains_after_selection(mamba_base, capsys):
    """The CLI's figure is the post-warm-up count (selected entries + LoRA), not the warm-up's."""
    adapted = wrap(tiny_mamba(), "sdlora")
    warm_up = adapted.trainable_parameters()  # all of A_log + LoRA
    model = adapted.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(2):
        ids = random_ids(2, 16, seed=i)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    adapted.method.select_dimensions(model)
    selected = adapted.trainable_parameters()
    assert selected < warm_up
    assert _params_trainable(mamba_base, capsys) == selected


@pytest.mark.slow
def test_train_runs_the_warm_up_selects_and_logs_it(tmp_path, mamba_base, capsys):
    import json

    from longctx.training.config import TrainConfig
    from longctx.training.train import train_adapter

    cfg = TrainConfig(method="sdlora", task="passkey", train_length=256, out=str(tmp_path / "run"),
                      base=str(mamba_base), steps=3, batch_size=2, n_validation=1, eval_every=3)
    train_adapter(cfg, progress=False)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["selection"]["selected_ssm_entries"] == 2 * (1 * 2 + 2 * 8 * 1)
    assert log["trainable_parameters"] == _params_trainable(mamba_base, capsys)  # what `longctx params` reports
    loaded = load_adapter(tiny_mamba(), tmp_path / "run" / "adapter")
    assert loaded.trainable_parameters() == log["trainable_parameters"]
