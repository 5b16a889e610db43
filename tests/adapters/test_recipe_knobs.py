"""Every setting that changes what an adapter is, is a recipe field: stated in its method's YAML,
validated, saved with the adapter, part of the sweep's adapter key, and an adapter saved before
the field existed loads with the value it was made with."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import perturb, random_ids, tiny_llama, tiny_mamba
from safetensors.torch import load_file

from longctx.adapters import load_adapter, load_recipe, wrap
from longctx.adapters.recipe import METHOD_FIELDS
from longctx.adapters.sdlora import n_trained
from longctx.core.errors import LongctxError
from longctx.core.resources import recipe_dir
from longctx.sweep.group import Group
from longctx.sweep.run import group_adapter_key, parse_config
from longctx.training.config import TrainConfig
from longctx.training.train import train_adapter

# (method, field, the value adapters were made with before it was a field, another valid value)
KNOBS = [("sdlora", "channel_freeze", 0.99, 0.9), ("sdlora", "state_freeze", 0.75, 0.5),
         ("sdlora", "selection_warmup_steps", 10, 2), ("lora-xs", "r_init_std", 1e-5, 1e-3),
         ("ssmlora-scan", "max_timescale", 4096.0, 64.0)]
IDS = [f"{method}.{name}" for method, name, _, _ in KNOBS]
ROOT = Path(__file__).resolve().parents[2]


def test_every_method_field_is_tested_here():
    assert sorted(name for _, name, _, _ in KNOBS) == sorted(METHOD_FIELDS)


@pytest.mark.parametrize("method, name, legacy, other", KNOBS, ids=IDS)
def test_the_methods_yaml_states_the_value_adapters_were_made_with(method, name, legacy, other):
    recipe = load_recipe(method)
    assert getattr(recipe, name) == legacy == METHOD_FIELDS[name].legacy
    assert recipe.to_dict()[name] == legacy  # saved with the adapter and hashed into its keys
    assert name in yaml.safe_load((recipe_dir() / f"{method}.yaml").read_text())
    for unrelated in ("lora", "ssmlora", "dense"):  # other methods neither carry nor accept it
        assert name not in load_recipe(unrelated).to_dict()


def _key(method: str, overrides: dict | None = None) -> str:
    cfg = parse_config({"methods": [method], "tasks": ["passkey"], "lengths": [256],
                        "base": "longctx-tiny-mamba" if method == "sdlora" else "longctx-tiny",
                        "recipe_overrides": {method: overrides} if overrides is not None else {}})
    return group_adapter_key(cfg, Group(seed=0, method=method, task="passkey", chunk_size=None), base_id="fixed")


def _recipes_with(tmp_path: Path, method: str, name: str, value) -> Path:
    """A copy of the recipe folder with `name: value` in `method`'s YAML."""
    folder = tmp_path / "recipes"
    folder.mkdir(exist_ok=True)
    for path in (recipe_dir()).glob("*.yaml"):
        (folder / path.name).write_text(path.read_text())
    values = yaml.safe_load((folder / f"{method}.yaml").read_text())
    (folder / f"{method}.yaml").write_text(yaml.safe_dump({**values, name: value}))
    return folder


@pytest.mark.parametrize("method, name, legacy, other", KNOBS, ids=IDS)
def test_the_sweep_retrains_when_a_knob_changes_and_reuses_when_it_does_not(method, name, legacy, other,
                                                                            tmp_path, monkeypatch):
    import longctx.adapters.recipe  # where load_recipe reads the recipe folder from

    original = _key(method)
    assert _key(method, {name: other}) != original  # overridden in the sweep: a new adapter directory
    monkeypatch.setattr(longctx.adapters.recipe, "recipe_dir", lambda: _recipes_with(tmp_path, method, name, legacy))
    assert _key(method) == original  # the same recipe: the same key, the adapter is reused
    monkeypatch.setattr(longctx.adapters.recipe, "recipe_dir", lambda: _recipes_with(tmp_path, method, name, other))
    assert _key(method) != original  # the recipe's own value edited: retrained too


def test_r_init_std_scales_lora_xs_s_initial_r():
    def r(**overrides):
        adapted = wrap(tiny_llama(), "lora-xs", seed=3, **overrides)
        return torch.cat([p.detach().flatten() for p in adapted.model.parameters() if p.requires_grad])

    default, wide = r(), r(r_init_std=1e-3)
    torch.testing.assert_close(wide, 100 * default, rtol=1e-5, atol=0)  # the same draw, 100x the std
    assert not r(r_init_std=0.0).any()  # 0: R starts at zero, the base exactly


def test_max_timescale_sets_the_longest_initial_time_scale_of_ssmlora_scan():
    for longest in (4096.0, 64.0):
        kwargs = {} if longest == 4096.0 else {"max_timescale": longest}
        tau = [m.scan_log_tau.detach().exp() for m in wrap(tiny_llama(), "ssmlora-scan", **kwargs).model.modules()
               if hasattr(m, "scan_log_tau")]
        expected = torch.logspace(0.0, math.log10(longest), 8)
        assert tau and all(torch.allclose(t, expected, rtol=1e-5) for t in tau)


@pytest.mark.parametrize("name, value", [("channel_freeze", 0.9), ("state_freeze", 0.5)])
def test_sdlora_selects_the_fractions_its_recipe_leaves_unfrozen(name, value):
    d_inner, n_state, layers = 96, 8, 2
    freeze = {"channel_freeze": 0.99, "state_freeze": 0.75, name: value}
    adapted = wrap(tiny_mamba(), "sdlora", **{name: value})
    report = adapted.method.select_dimensions(adapted.model, from_updates=False)
    k_c, k_s = n_trained(d_inner, freeze["channel_freeze"]), n_trained(n_state, freeze["state_freeze"])
    assert (k_c, k_s) == ((10, 2) if name == "channel_freeze" else (1, 4))
    assert report["channels"] == layers * k_c
    assert report["selected_ssm_entries"] == layers * (k_c * k_s + 2 * n_state * k_c)


def test_selection_warmup_steps_is_how_long_sdlora_warms_up_before_selecting(tmp_path):
    def run(steps: int) -> Path:
        cfg = TrainConfig(method="sdlora", task="passkey", train_length=96, out=str(tmp_path / f"w{steps}"),
                          base="longctx-tiny-mamba", steps=2, batch_size=1, n_validation=1, eval_every=2,
                          overrides={"selection_warmup_steps": steps})
        train_adapter(cfg, progress=False)
        return Path(cfg.out)

    one, two = run(1), run(2)
    assert json.loads((one / "train_log.json").read_text())["selection"]["warmup_steps"] == 1
    assert json.loads((two / "train_log.json").read_text())["selection"]["warmup_steps"] == 2
    first, second = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (one, two))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # another warm-up, another adapter


ADAPTER_CASES = [("sdlora", "channel_freeze", 0.9), ("lora-xs", "r_init_std", 1e-3),
                 ("ssmlora-scan", "max_timescale", 64.0)]


def _build(method: str, **overrides):
    adapted = wrap(tiny_mamba() if method == "sdlora" else tiny_llama(), method, **overrides)
    if method == "sdlora":
        adapted.method.select_dimensions(adapted.model, from_updates=False)
    perturb(adapted)
    return adapted


def _logits(adapted, ids):
    with torch.no_grad():
        return adapted(input_ids=ids).logits


@pytest.mark.parametrize("method, name, value", ADAPTER_CASES)
def test_a_knob_is_saved_with_the_adapter_and_loaded_back(method, name, value, tmp_path):
    adapted = _build(method, **{name: value})
    adapted.save(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["longctx"]["recipe"]
    assert saved[name] == value
    loaded = load_adapter(tiny_mamba() if method == "sdlora" else tiny_llama(), tmp_path / "a")
    assert getattr(loaded.recipe, name) == value
    ids = random_ids(1, 24)
    assert torch.equal(_logits(loaded, ids), _logits(adapted, ids))


@pytest.mark.parametrize("method, name, value", ADAPTER_CASES)
def test_an_adapter_saved_before_the_field_existed_loads_with_the_old_value(method, name, value, tmp_path):
    adapted = _build(method)
    directory = adapted.save(tmp_path / "old")
    config = json.loads((directory / "adapter_config.json").read_text())
    for field in METHOD_FIELDS:
        config["longctx"]["recipe"].pop(field, None)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    loaded = load_adapter(tiny_mamba() if method == "sdlora" else tiny_llama(), directory)
    assert getattr(loaded.recipe, name) == METHOD_FIELDS[name].legacy
    ids = random_ids(1, 24)
    assert torch.equal(_logits(loaded, ids), _logits(adapted, ids))


@pytest.mark.parametrize("method, name, value, message", [
    ("sdlora", "channel_freeze", 1.0, "recipe field channel_freeze must be a fraction in [0, 1), got 1.0"),
    ("sdlora", "channel_freeze", "0.9", "recipe field channel_freeze must be a fraction in [0, 1), got '0.9'"),
    ("sdlora", "state_freeze", -0.1, "recipe field state_freeze must be a fraction in [0, 1), got -0.1"),
    ("sdlora", "selection_warmup_steps", 0, "recipe field selection_warmup_steps must be a positive integer, got 0"),
    ("sdlora", "selection_warmup_steps", 2.5, "must be a positive integer, got 2.5"),
    ("sdlora", "selection_warmup_steps", True, "must be a positive integer, got True"),
    ("lora-xs", "r_init_std", -1e-5, "recipe field r_init_std must be a finite number >= 0, got -1e-05"),
    ("lora-xs", "r_init_std", float("nan"), "recipe field r_init_std must be a finite number >= 0, got nan"),
    ("ssmlora-scan", "max_timescale", 0.5, "recipe field max_timescale must be a finite number >= 1, got 0.5"),
    ("ssmlora-scan", "max_timescale", float("inf"), "must be a finite number >= 1, got inf"),
    ("lora", "channel_freeze", 0.5, "recipe field channel_freeze is a setting of method sdlora, not of 'lora'"),
    ("ssmlora", "max_timescale", 64.0, "recipe field max_timescale is a setting of method ssmlora-scan, not of "
                                       "'ssmlora'"),
])
def test_an_invalid_knob_is_one_line_naming_the_value_and_what_is_valid(method, name, value, message):
    with pytest.raises(LongctxError) as err:
        load_recipe(method, {name: value})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_sweep_command_refuses_an_invalid_knob_before_running_anything(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"methods": ["lora-xs"], "tasks": ["passkey"], "lengths": [256],
                                      "recipe_overrides": {"lora-xs": {"r_init_std": -1.0}},
                                      "out": str(tmp_path / "out")}))
    run = subprocess.run([sys.executable, "-m", "longctx.cli", "sweep", str(config), "--quiet"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 2
    assert run.stderr == "longctx: error: recipe field r_init_std must be a finite number >= 0, got -1.0\n"
    assert not (tmp_path / "out").exists()
