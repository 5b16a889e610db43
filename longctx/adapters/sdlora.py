"""`sdlora`: SDLoRA (Galim et al., 2024, "Parameter-Efficient Fine-Tuning of State Space Models")
for Mamba bases — LoRA (through PEFT) on the mixer's linear projections plus Selective
Dimension tuning of the SSM: a short warm-up trains every entry of A_log (D×N) and D (D), then
the channels with the largest updates, and within each of them the states with the largest
updates, are selected; only those entries train afterwards, the rest stay the base's.

The SSM parameters are re-expressed as base + delta: each mixer's A_log and D become tensors
recomputed before every forward from frozen base buffers and trainable `sdlora_delta_*`
parameters (full-size during warm-up, only the selected entries after `select_dimensions`), so
an unselected entry cannot move, whatever the optimiser's state. Deltas start at zero: a fresh
adapter equals its base. The deltas, and A_log / D as recomputed, are float32 on a bf16/fp16
base (the scan reads them as float32 anyway), so a small update is not lost to rounding.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from longctx.adapters.base import AdapterMethod, Recipe, adapter_dtype
from longctx.adapters.lora import Lora
from longctx.adapters.state import StateBinding
from longctx.errors import LongctxError

CHANNEL_FRACTION = 0.25  # of the D channels of each mixer, selected after warm-up
STATE_FRACTION = 0.25  # of the N states of each selected channel
WARMUP_STEPS = 10


def _mixers(model: nn.Module) -> list[nn.Module]:
    from transformers.models.mamba.modeling_mamba import MambaMixer

    return [m for m in model.modules() if isinstance(m, MambaMixer)]


def _ssm_params(mixer: nn.Module) -> tuple[Tensor, Tensor]:
    """(A_log, D) of the mixer as they enter the scan: base + delta (full or at the selection)."""
    dtype = mixer.sdlora_delta_A.dtype  # float32 on a bf16/fp16 base
    a, d = mixer.sdlora_A_base.to(dtype, copy=True), mixer.sdlora_D_base.to(dtype, copy=True)  # (D, N), (D,)
    if hasattr(mixer, "sdlora_channels"):
        rows = mixer.sdlora_channels[:, None]  # (k_c, 1)
        a = a.index_put((rows, mixer.sdlora_states), mixer.sdlora_delta_A, accumulate=True)  # (k_c, k_s) entries
        d = d.index_put((mixer.sdlora_channels,), mixer.sdlora_delta_D, accumulate=True)
    else:
        a, d = a + mixer.sdlora_delta_A, d + mixer.sdlora_delta_D
    return a, d


def _refresh(mixer: nn.Module, args: Any) -> None:
    mixer.A_log, mixer.D = _ssm_params(mixer)


def _install(mixer: nn.Module) -> None:
    """Swap the mixer's A_log / D parameters for base buffers + zero deltas."""
    a, d = mixer.A_log.detach().clone(), mixer.D.detach().clone()
    del mixer._parameters["A_log"], mixer._parameters["D"]
    mixer.register_buffer("sdlora_A_base", a)
    mixer.register_buffer("sdlora_D_base", d)
    dtype = adapter_dtype(a.dtype)
    mixer.sdlora_delta_A = nn.Parameter(torch.zeros_like(a, dtype=dtype))  # (D, N)
    mixer.sdlora_delta_D = nn.Parameter(torch.zeros_like(d, dtype=dtype))  # (D,)
    mixer.A_log, mixer.D = a.to(dtype, copy=True), d.to(dtype, copy=True)
    mixer.register_forward_pre_hook(_refresh)


def _select(mixer: nn.Module, channels: Tensor | None = None, states: Tensor | None = None) -> int:
    """Keep only the selected entries' deltas (chosen by update magnitude unless given)."""
    full_a, full_d = mixer.sdlora_delta_A.detach(), mixer.sdlora_delta_D.detach()  # (D, N), (D,)
    if channels is None:
        k_c = max(1, round(CHANNEL_FRACTION * full_a.shape[0]))
        k_s = max(1, round(STATE_FRACTION * full_a.shape[1]))
        score = full_a.abs().sum(1) + full_d.abs()  # (D,)
        channels = score.topk(k_c).indices.sort().values  # (k_c,)
        states = full_a[channels].abs().topk(k_s, dim=1).indices.sort(dim=1).values  # (k_c, k_s)
    mixer.register_buffer("sdlora_channels", channels.to(torch.long))
    mixer.register_buffer("sdlora_states", states.to(torch.long))
    mixer.sdlora_delta_A = nn.Parameter(full_a[channels[:, None], states].clone())  # (k_c, k_s)
    mixer.sdlora_delta_D = nn.Parameter(full_d[channels].clone())  # (k_c,)
    return states.numel() + channels.numel()


class SDLoRA(AdapterMethod):
    name = "sdlora"
    families = ("mamba",)

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        mixers = _mixers(model)
        if not mixers:
            raise LongctxError(f"sdlora tunes the SSM of Mamba models; this is a {model.config.model_type!r} "
                               f"model (use lora, lora-xs, ssmlora or ssmlora-scan)")
        peft_model, points = Lora().apply(model, recipe, binding)
        for mixer in _mixers(peft_model):
            _install(mixer)
        return peft_model, points + [f"{len(mixers)} SSMs (A_log, D): selective dimensions"]

    def select_dimensions(self, model: nn.Module) -> dict[str, int]:
        """After warm-up: keep the largest-update channels/states; returns what was selected."""
        selected = sum(_select(m) for m in _mixers(model) if not hasattr(m, "sdlora_channels"))
        total = sum(m.sdlora_A_base.numel() + m.sdlora_D_base.numel() for m in _mixers(model))
        return {"selected_ssm_entries": selected, "ssm_entries": total}

    def weights(self, model: nn.Module) -> dict[str, Tensor]:
        out = Lora().weights(model)
        for i, m in enumerate(_mixers(model)):
            out[f"sdlora.{i}.delta_A"], out[f"sdlora.{i}.delta_D"] = m.sdlora_delta_A.detach(), m.sdlora_delta_D.detach()
            if hasattr(m, "sdlora_channels"):
                out[f"sdlora.{i}.channels"], out[f"sdlora.{i}.states"] = m.sdlora_channels, m.sdlora_states
        return out

    def load_weights(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        for i, m in enumerate(_mixers(model)):
            if f"sdlora.{i}.channels" in weights and not hasattr(m, "sdlora_channels"):
                _select(m, weights[f"sdlora.{i}.channels"], weights[f"sdlora.{i}.states"])
        Lora().load_weights(model, {k: v for k, v in weights.items() if not k.startswith("sdlora.")})
        with torch.no_grad():
            for i, m in enumerate(_mixers(model)):
                for name in ("delta_A", "delta_D"):
                    key, own = f"sdlora.{i}.{name}", getattr(m, f"sdlora_{name}")
                    if key not in weights or weights[key].shape != own.shape:
                        raise LongctxError(f"adapter tensor {key!r} is missing or has the wrong shape")
                    own.copy_(weights[key])
