"""SDLoRA on Mamba: the shared adapter invariants, selection by update magnitude, and unselected
SSM entries that an optimiser step cannot move."""
from __future__ import annotations

import pytest
import torch

from conftest import perturb, random_ids
from longctx.adapters import load_adapter, wrap
from longctx.errors import LongctxError
from test_mamba import tiny_mamba


def _ssm(model):
    from longctx.adapters.sdlora import _mixers, _ssm_params

    return [tuple(t.detach().clone() for t in _ssm_params(m)) for m in _mixers(model)]


def test_fresh_adapter_equals_base_and_only_its_parameters_train():
    ids = random_ids(1, 30)
    adapted = wrap(tiny_mamba(), "sdlora")
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, tiny_mamba()(ids).logits)
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "sdlora_delta" in n for n in names)


def test_selection_keeps_the_largest_updates_and_unselected_entries_never_move():
    adapted = wrap(tiny_mamba(), "sdlora")
    model = adapted.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = random_ids(2, 24)
    for _ in range(3):  # warm-up: every entry trains
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    from longctx.adapters.sdlora import _mixers

    scores = [(m.sdlora_delta_A.detach().abs().sum(1) + m.sdlora_delta_D.detach().abs()) for m in _mixers(model)]
    report = adapted.method.select_dimensions(model)
    for score, mixer in zip(scores, _mixers(model)):  # the selected channels have the largest updates
        chosen = torch.zeros_like(score, dtype=torch.bool)
        chosen[mixer.sdlora_channels] = True
        assert score[chosen].min() >= score[~chosen].max()
    d_inner, n_state = 96, 8
    per_mixer = (d_inner // 4) * (n_state // 4) + d_inner // 4
    assert report == {"selected_ssm_entries": 2 * per_mixer, "ssm_entries": 2 * (d_inner * n_state + d_inner)}
    before = _ssm(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model(ids, labels=ids).loss.backward()
    opt.step()
    after = _ssm(model)

    for (a0, d0), (a1, d1), mixer in zip(before, after, _mixers(model)):
        chosen = torch.zeros_like(a0, dtype=torch.bool)
        chosen[mixer.sdlora_channels[:, None], mixer.sdlora_states] = True
        assert torch.equal(a0[~chosen], a1[~chosen])  # unselected A_log entries unchanged
        assert not torch.equal(a0[chosen], a1[chosen])  # the selected ones train
        keep = torch.zeros_like(d0, dtype=torch.bool)
        keep[mixer.sdlora_channels] = True
        assert torch.equal(d0[~keep], d1[~keep])


def test_save_load_round_trip_after_selection(tmp_path):
    adapted = wrap(tiny_mamba(), "sdlora")
    adapted.method.select_dimensions(adapted.model)
    perturb(adapted)
    adapted.save(tmp_path / "a")
    loaded = load_adapter(tiny_mamba(), tmp_path / "a")
    ids = random_ids(1, 30)
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, loaded(ids).logits)


def test_mismatched_base_is_refused(tmp_path):
    wrap(tiny_mamba(), "sdlora").save(tmp_path / "a")
    with pytest.raises(LongctxError, match="base"):
        load_adapter(tiny_mamba(seed=3), tmp_path / "a")


def test_llama_bases_are_refused():
    from conftest import tiny_llama

    with pytest.raises(LongctxError, match="sdlora tunes the SSM of Mamba models"):
        wrap(tiny_llama(), "sdlora")


@pytest.mark.slow
def test_train_runs_the_warm_up_selects_and_logs_it(tmp_path):
    import json

    from longctx.train import TrainConfig, train_adapter
    from conftest import save_tiny_base

    base = save_tiny_base(tmp_path / "base")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (base / name).unlink(missing_ok=True)
    tiny_mamba().save_pretrained(base)
    cfg = TrainConfig(method="sdlora", task="passkey", train_length=256, out=str(tmp_path / "run"), base=str(base),
                      steps=3, batch_size=2, n_validation=1, eval_every=3)
    train_adapter(cfg, progress=False)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["selection"]["selected_ssm_entries"] == 2 * (24 * 2 + 24)
    loaded = load_adapter(tiny_mamba(), tmp_path / "run" / "adapter")
    assert loaded.trainable_parameters() > 0
