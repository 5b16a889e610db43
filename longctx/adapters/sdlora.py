"""`sdlora`: SDLoRA / Sparse Dimension Tuning (Galim et al., 2024, "Parameter-Efficient Fine-Tuning
of State Space Models"; code github.com/furiosa-ai/ssm-peft, `mamba_ssm_peft/peft/sd_lora.py`) for
Mamba bases, in the reference's configuration (`cfg/peft/sd_lora/500it/n0.75_d0.99.json`):

- LoRA (r=8, alpha=8, dropout 0.1: `W x + (alpha/r) B A dropout(x)`) on every mixer's out_proj
  (the recipe's `insertion`), built from PEFT's own LoRA layer class as the reference does;
- selective dimension tuning of the SSM. A warm-up trains every entry of A_log (D×N) as a delta
  (and the LoRA); then, per mixer, the 1% of channels with the largest summed squared A_log
  update, and in each of them the 25% of states with the largest squared update, are selected
  (the recipe's `channel_freeze` 0.99 and `state_freeze` 0.75: the fractions frozen).
  Afterwards only these train: A_log at the selected (channel, state) entries, and the selected
  channels' input columns of x_proj's B and C rows (all N states). D, dt and everything else
  stay the base's. A = -exp(A_log_base + ΔA) as the scan reads it.
- the warm-up's updates are discarded: selection resets every trainable tensor (LoRA A/B, the
  deltas) to its pre-warm-up value, as the reference re-creates the model for the real run.

The SSM deltas are re-expressed as base + delta: A_log is recomputed before every forward from
a frozen base buffer and `sdlora_delta_A` (full-size during warm-up, the selected entries after
`select_dimensions`); x_proj gains `x[..., channels] @ [ΔB; ΔC]ᵀ` on its B and C outputs, i.e.
x_proj's weight plus ΔB/ΔC at the selected columns. An unselected entry cannot move, whatever
the optimiser's state. Deltas start at zero and LoRA B at zero: a fresh adapter equals its base.
Deltas and LoRA weights are float32 on a bf16/fp16 base (`adapter_dtype`).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.adapters.base import AdapterMethod, adapter_dtype
from longctx.adapters.insertion import replace_modules, resolve_points
from longctx.adapters.peft_seam import ADAPTER_NAME, lora_config, lora_layers, lora_linear, lora_pair
from longctx.adapters.recipe import Recipe
from longctx.core.errors import LongctxError
from longctx.engine.hf_internals import mamba_mixers
from longctx.engine.state import StateBinding

# The fractions frozen by the selection (the recipe's `channel_freeze`, `state_freeze`) are the
# reference's `num_freeze` (sd_lora.py `_parse_dims`: int(round(fraction * size)) frozen, the rest
# trained); `longctx train` runs `selection_warmup_steps` optimiser steps before selecting.


def n_trained(size: int, freeze: float) -> int:
    """How many of `size` dimensions train when a fraction `freeze` is frozen (the reference's
    rounding), at least one (the reference asserts a non-empty selection)."""
    return max(1, size - int(round(freeze * size)))


def _a_log(mixer: nn.Module) -> Tensor:
    """A_log as it enters the scan: base + delta (everywhere, or at the selected entries). (D, N)"""
    delta = mixer.sdlora_delta_A
    a = mixer.sdlora_A_base.to(delta.dtype, copy=True)  # float32 on a bf16/fp16 base
    if hasattr(mixer, "sdlora_channels"):
        return a.index_put((mixer.sdlora_channels[:, None], mixer.sdlora_states), delta, accumulate=True)
    return a + delta


def _refresh(mixer: nn.Module, args: Any) -> None:
    mixer.A_log = _a_log(mixer)


def _x_proj_delta(mixer: nn.Module, module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
    """Forward hook of x_proj: add ΔB/ΔC at the selected input columns, (…, D) -> (…, R + 2N)."""
    if not hasattr(mixer, "sdlora_channels"):
        return None  # warm-up: x_proj is the base's
    delta = torch.cat([mixer.sdlora_delta_B, mixer.sdlora_delta_C])  # (2N, k_c)
    extra = args[0][..., mixer.sdlora_channels].to(delta.dtype) @ delta.T  # (…, 2N)
    return (out.to(delta.dtype) + F.pad(extra, (out.shape[-1] - extra.shape[-1], 0))).to(out.dtype)


def _install(mixer: nn.Module, recipe: Recipe) -> None:
    """Swap the mixer's A_log parameter for a base buffer + a zero delta; hook x_proj; keep the
    recipe's freeze fractions for `select_dimensions`."""
    mixer.sdlora_freeze = (recipe.channel_freeze, recipe.state_freeze)
    a = mixer.A_log.detach().clone()
    del mixer._parameters["A_log"]
    mixer.register_buffer("sdlora_A_base", a)
    mixer.sdlora_delta_A = nn.Parameter(torch.zeros_like(a, dtype=adapter_dtype(a.dtype)))  # (D, N)
    mixer.A_log = _a_log(mixer)
    mixer.register_forward_pre_hook(_refresh)
    mixer.x_proj.register_forward_hook(functools.partial(_x_proj_delta, mixer))


def _insert_lora(model: nn.Module, recipe: Recipe) -> list[str]:
    """PEFT's LoRA layer on each insertion point, built directly as the reference builds it
    (PEFT's injection refuses out_proj on Mamba: see the class docstring)."""
    points = list(resolve_points(model, recipe.insertion))
    config = lora_config(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                        target_modules=sorted({p.rsplit(".", 1)[-1] for p in points}), bias="none")

    def build(name: str, layer: nn.Linear) -> nn.Module:
        lora = lora_linear(layer, config)
        dtype = adapter_dtype(layer.weight.dtype)
        for part in (lora.lora_A[ADAPTER_NAME], lora.lora_B[ADAPTER_NAME]):
            part.to(dtype)  # PEFT casts them to the base's dtype; float32 as PEFT's autocast_adapter_dtype
        # the pre-warm-up values, restored by `select_dimensions` (buffers: they move with the module)
        lora.register_buffer("sdlora_initial_A", lora.lora_A[ADAPTER_NAME].weight.detach().clone(), persistent=False)
        lora.register_buffer("sdlora_initial_B", lora.lora_B[ADAPTER_NAME].weight.detach().clone(), persistent=False)
        return lora

    replace_modules(model, points, build)
    return points


def _select(mixer: nn.Module, channels: Tensor, states: Tensor) -> None:
    """Keep only the selected entries trainable, as fresh zero deltas: A_log at (channel, state),
    x_proj's B and C rows at the selected input columns."""
    n_state, dtype, device = mixer.sdlora_A_base.shape[1], mixer.sdlora_delta_A.dtype, mixer.sdlora_A_base.device
    mixer.register_buffer("sdlora_channels", channels.to(device=device, dtype=torch.long))  # (k_c,)
    mixer.register_buffer("sdlora_states", states.to(device=device, dtype=torch.long))  # (k_c, k_s)
    mixer.sdlora_delta_A = nn.Parameter(torch.zeros(states.shape, dtype=dtype, device=device))  # (k_c, k_s)
    mixer.sdlora_delta_B = nn.Parameter(torch.zeros(n_state, len(channels), dtype=dtype, device=device))  # (N, k_c)
    mixer.sdlora_delta_C = nn.Parameter(torch.zeros(n_state, len(channels), dtype=dtype, device=device))  # (N, k_c)


def _choose(mixer: nn.Module, from_updates: bool) -> tuple[Tensor, Tensor]:
    """(channels (k_c,), states (k_c, k_s)), sorted: by the warm-up's squared A_log update (the
    reference's `get_importances`: summed over states for channels, per channel for states), or
    the first k_c / k_s indices (same sizes, no data: for parameter counts)."""
    n_channel, n_state = mixer.sdlora_A_base.shape
    channel_freeze, state_freeze = mixer.sdlora_freeze
    k_c, k_s = n_trained(n_channel, channel_freeze), n_trained(n_state, state_freeze)
    device = mixer.sdlora_A_base.device
    if not from_updates:
        return torch.arange(k_c, device=device), torch.arange(k_s, device=device).repeat(k_c, 1)
    update = mixer.sdlora_delta_A.detach().float().square()  # (D, N)
    channels = update.sum(1).topk(k_c).indices.sort().values  # (k_c,)
    states = update[channels].topk(k_s, dim=1).indices.sort(dim=1).values  # (k_c, k_s)
    return channels, states


class SDLoRA(AdapterMethod):
    """PEFT's `get_peft_model` refuses LoRA on a Mamba out_proj (peft `tuners_utils.
    _check_lora_target_modules_mamba`): the fused training kernel reads out_proj's weight directly,
    bypassing the adapter. Adapted Mambas never take that kernel here (`longctx.engine.mamba`: training
    runs the unfused path, which calls out_proj), so the reference's placement is kept, building
    PEFT's LoRA layer directly as the reference's tuner does."""

    name = "sdlora"
    families = ("mamba",)

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        mixers = mamba_mixers(model)
        if not mixers:
            raise LongctxError(f"sdlora tunes the SSM of Mamba models; this is a {model.config.model_type!r} "
                               f"model (use lora, lora-xs, ssmlora or ssmlora-scan)")
        points = _insert_lora(model, recipe)
        names = {m: n for n, m in model.named_modules()}
        for mixer in mixers:
            _install(mixer, recipe)
        ssm = [f"{names[m]}.{part}" for m in mixers for part in ("A_log", "x_proj[B,C]")]
        return model, points + ssm

    def select_dimensions(self, model: nn.Module, from_updates: bool = True) -> dict[str, int]:
        """After warm-up: keep the largest-update channels/states, and discard the warm-up's
        updates (every trainable tensor back to its pre-warm-up value). `from_updates=False`
        selects the first indices instead (same sizes: what trains, without training)."""
        fresh = [m for m in mamba_mixers(model) if not hasattr(m, "sdlora_channels")]
        for mixer in fresh:
            _select(mixer, *_choose(mixer, from_updates))
        if fresh:
            with torch.no_grad():
                for layer in lora_layers(model).values():
                    lora_a, lora_b = lora_pair(layer)
                    lora_a.copy_(layer.sdlora_initial_A)
                    lora_b.copy_(layer.sdlora_initial_B)
        mixers = mamba_mixers(model)
        return {"channels": sum(len(m.sdlora_channels) for m in mixers),
                "selected_ssm_entries": sum(m.sdlora_delta_A.numel() + m.sdlora_delta_B.numel()
                                            + m.sdlora_delta_C.numel() for m in mixers),
                "ssm_entries": sum(3 * m.sdlora_A_base.numel() for m in mixers)}  # A_log, x_proj's B and C

    def weights(self, model: nn.Module) -> dict[str, Tensor]:
        out = {}
        for name, layer in lora_layers(model).items():
            out[f"lora.{name}.A"], out[f"lora.{name}.B"] = (p.detach() for p in lora_pair(layer))
        for i, m in enumerate(mamba_mixers(model)):
            out[f"sdlora.{i}.delta_A"] = m.sdlora_delta_A.detach()
            if hasattr(m, "sdlora_channels"):
                out[f"sdlora.{i}.channels"], out[f"sdlora.{i}.states"] = m.sdlora_channels, m.sdlora_states
                out[f"sdlora.{i}.delta_B"] = m.sdlora_delta_B.detach()
                out[f"sdlora.{i}.delta_C"] = m.sdlora_delta_C.detach()
        return out

    def load_weights(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        if any(k.endswith(".delta_D") or not k.startswith(("lora.", "sdlora.")) for k in weights):
            raise LongctxError("this sdlora adapter was saved in the earlier layout (LoRA on in_proj/x_proj, D tuned); "
                               "it cannot be loaded into the reference configuration: retrain it")
        for i, m in enumerate(mamba_mixers(model)):
            if f"sdlora.{i}.channels" in weights and not hasattr(m, "sdlora_channels"):
                _select(m, weights[f"sdlora.{i}.channels"], weights[f"sdlora.{i}.states"])
        own = self.weights(model)
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or unexpected:
            bad = (missing or unexpected)[0]
            raise LongctxError(f"adapter weights do not fit the model: {'missing' if missing else 'unexpected'} "
                               f"tensor {bad!r} ({len(missing)} missing, {len(unexpected)} unexpected)")
        targets = {**{f"lora.{n}.{k}": p for n, layer in lora_layers(model).items()
                      for k, p in zip("AB", lora_pair(layer))},
                   **{f"sdlora.{i}.delta_{k}": getattr(m, f"sdlora_delta_{k}") for i, m in enumerate(mamba_mixers(model))
                      for k in "ABC" if hasattr(m, f"sdlora_delta_{k}")}}
        with torch.no_grad():
            for key, own_tensor in targets.items():
                if weights[key].shape != own_tensor.shape:
                    raise LongctxError(f"adapter tensor {key!r} has shape {tuple(weights[key].shape)}, "
                                       f"the model expects {tuple(own_tensor.shape)}")
                own_tensor.copy_(weights[key])
