"""SDLoRA against an independently written plain-torch Mamba forward with the reference's
semantics (furiosa-ai/ssm-peft `sd_lora.py`): A = -exp(A_log + ΔA at the selected (channel,
state) entries), x_proj's weight + ΔB/ΔC at the selected channels' columns of its B and C rows,
out_proj + (alpha/r)·B·A LoRA, and a selective scan as a plain per-token loop. Also: after
selection only the selected entries can move, and the warm-up's updates are discarded."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids
from conftest import tiny_mamba

from longctx.adapters import wrap


def _adapter_tensors(adapted):
    """Per layer: channels, states, ΔA, ΔB, ΔC, LoRA A, LoRA B (from the saved weights, by name)."""
    w = adapted.method.weights(adapted.model)
    layers = []
    for i in range(adapted.config.num_hidden_layers):
        lora = f"lora.backbone.layers.{i}.mixer.out_proj"
        layers.append({k: w[f"sdlora.{i}.{k}"] for k in ("channels", "states", "delta_A", "delta_B", "delta_C")}
                      | {"lora_A": w[f"{lora}.A"], "lora_B": w[f"{lora}.B"]})
    return layers


def _rms_norm(h, weight, eps):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_logits(base_state, config, adapter, ids, scale):
    """Plain forward of a MambaForCausalLM from its state dict plus SDLoRA tensors: (B, T, V)."""
    d_inner, n, rank = config.intermediate_size, config.state_size, config.time_step_rank
    s = base_state
    h = s["backbone.embeddings.weight"][ids]  # (B, T, H)
    for i, ad in enumerate(adapter):
        p = lambda name: s[f"backbone.layers.{i}.{name}"]
        residual = h
        u = _rms_norm(h, p("norm.weight"), config.layer_norm_epsilon)
        xz = u @ p("mixer.in_proj.weight").T  # (B, T, 2D)
        x, z = xz[..., :d_inner], xz[..., d_inner:]
        k = config.conv_kernel
        padded = F.pad(x, (0, 0, k - 1, 0))  # (B, T + K - 1, D): causal
        w_conv = p("mixer.conv1d.weight")[:, 0]  # (D, K)
        x = sum(padded[:, j:j + x.shape[1]] * w_conv[:, j] for j in range(k)) + p("mixer.conv1d.bias")
        x = F.silu(x)  # (B, T, D)
        w_x = p("mixer.x_proj.weight").clone()  # (R + 2N, D)
        for j, c in enumerate(ad["channels"].tolist()):
            w_x[rank:rank + n, c] += ad["delta_B"][:, j]
            w_x[rank + n:, c] += ad["delta_C"][:, j]
        x_dbl = x @ w_x.T
        dt, b, c = x_dbl[..., :rank], x_dbl[..., rank:rank + n], x_dbl[..., rank + n:]
        dt = F.softplus(dt @ p("mixer.dt_proj.weight").T + p("mixer.dt_proj.bias"))  # (B, T, D)
        a_log = p("mixer.A_log").clone()  # (D, N)
        for j, ch in enumerate(ad["channels"].tolist()):
            for q, st in enumerate(ad["states"][j].tolist()):
                a_log[ch, st] += ad["delta_A"][j, q]
        a = -torch.exp(a_log)
        state = torch.zeros(x.shape[0], d_inner, n, dtype=x.dtype)  # (B, D, N)
        ys = []
        for t in range(x.shape[1]):
            state = torch.exp(dt[:, t, :, None] * a) * state + dt[:, t, :, None] * b[:, t, None, :] * x[:, t, :, None]
            ys.append((state * c[:, t, None, :]).sum(-1) + p("mixer.D") * x[:, t])
        y = torch.stack(ys, 1) * F.silu(z)  # (B, T, D)
        out = y @ p("mixer.out_proj.weight").T + scale * (y @ ad["lora_A"].T) @ ad["lora_B"].T
        h = residual + out
    h = _rms_norm(h, s["backbone.norm_f.weight"], config.layer_norm_epsilon)
    return h @ s["backbone.embeddings.weight"].T  # tied lm_head


def _selected_adapter(dtype=torch.float64, seed=1, **overrides):
    """A double-precision tiny Mamba with SDLoRA, selected after a fake warm-up update, then given
    random non-zero weights everywhere it trains."""
    base = tiny_mamba().to(dtype)
    adapted = wrap(tiny_mamba().to(dtype), "sdlora", **overrides)
    gen = torch.Generator().manual_seed(seed)
    from longctx.engine.hf_internals import mamba_mixers

    with torch.no_grad():
        for m in mamba_mixers(adapted.model):  # a warm-up's A_log update, so that selection has something to rank
            m.sdlora_delta_A.copy_(torch.randn(m.sdlora_delta_A.shape, generator=gen))
        adapted.method.select_dimensions(adapted.model)
        for p in adapted.model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return base, adapted


@pytest.mark.parametrize("overrides", [{}, {"alpha": 16.0}])  # the reference's scale 1, and a scale 2
def test_adapted_logits_equal_the_plain_reference_forward(overrides):
    base, adapted = _selected_adapter(**overrides)
    ids = random_ids(2, 21)
    recipe = adapted.recipe
    expected = {"rank": 8, "alpha": 8.0, "dropout": 0.1, "insertion": ("out_proj",), **overrides}
    assert {k: getattr(recipe, k) for k in expected} == expected
    with torch.no_grad():
        ours = adapted(ids).logits
        ref = reference_logits(base.state_dict(), base.config, _adapter_tensors(adapted), ids,
                               scale=recipe.alpha / recipe.rank)
        plain = base(ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter acts
    # transformers' scan multiplies in float32 and returns float32 logits: float32 rounding only (|logits| < 5)
    assert torch.allclose(ours.double(), ref, atol=2e-6, rtol=0)


def test_chunked_adapted_forward_matches_the_reference():
    from longctx.engine.runner import chunked_forward

    base, adapted = _selected_adapter()
    ids = random_ids(1, 40)
    with torch.no_grad():
        ref = reference_logits(base.state_dict(), base.config, _adapter_tensors(adapted), ids,
                               scale=adapted.recipe.alpha / adapted.recipe.rank)
    keep = torch.arange(0, 40)
    out = chunked_forward(adapted, ids, chunk_size=9, keep=keep).logits  # the carried scan runs in float32
    assert torch.allclose(out.double(), ref[:, keep], atol=5e-6, rtol=0)


def _effective(adapted):
    """Per mixer, probed through the modules: A_log as the scan reads it, x_proj's weight as it acts,
    and every other base tensor."""
    from longctx.adapters.sdlora import _a_log
    from longctx.engine.hf_internals import mamba_mixers

    out = []
    for m in mamba_mixers(adapted.model):
        eye = torch.eye(m.intermediate_size, dtype=m.sdlora_A_base.dtype)
        with torch.no_grad():
            w_x = m.x_proj(eye).T.clone()  # (R + 2N, D): column d = x_proj's response to channel d
        out.append((_a_log(m).detach().clone(), w_x, m.D.detach().clone()))
    return out


def _steps(adapted, n, lr=1e-2, seed=0):
    model = adapted.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for i in range(n):
        ids = random_ids(2, 16, seed=seed + i)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_after_selection_only_the_selected_entries_move():
    from longctx.engine.hf_internals import mamba_mixers

    adapted = wrap(tiny_mamba(), "sdlora")
    _steps(adapted, 2)  # warm-up
    adapted.method.select_dimensions(adapted.model)
    frozen = {n: t.detach().clone() for n, t in adapted.model.state_dict().items()
              if "lora_" not in n and "sdlora_" not in n}
    before = _effective(adapted)
    _steps(adapted, 3, seed=10)
    after = _effective(adapted)
    rank = adapted.config.time_step_rank
    for (a0, x0, d0), (a1, x1, d1), m in zip(before, after, mamba_mixers(adapted.model)):
        chosen = torch.zeros_like(a0, dtype=torch.bool)
        chosen[m.sdlora_channels[:, None], m.sdlora_states] = True
        assert torch.equal(a0[~chosen], a1[~chosen]) and (a0[chosen] != a1[chosen]).all()
        columns = torch.zeros_like(x0, dtype=torch.bool)
        columns[rank:, m.sdlora_channels] = True  # B and C rows, selected input channels; not dt rows
        assert torch.equal(x0[~columns], x1[~columns]) and (x0[columns] != x1[columns]).all()
        assert torch.equal(d0, d1)  # D does not train
    for name, tensor in adapted.model.state_dict().items():  # no base weight moved
        if name in frozen:
            assert torch.equal(frozen[name], tensor), name


def test_warm_up_updates_are_discarded_at_selection():
    from longctx.adapters.peft_seam import lora_layers, lora_pair
    from longctx.engine.hf_internals import mamba_mixers

    adapted = wrap(tiny_mamba(), "sdlora")
    initial = [tuple(p.detach().clone() for p in lora_pair(m)) for m in lora_layers(adapted.model).values()]
    ids = random_ids(1, 30)
    with torch.no_grad():
        fresh = adapted(ids).logits
    _steps(adapted, 3)
    warmed = [m.sdlora_delta_A.detach().float().square() for m in mamba_mixers(adapted.model)]
    assert all(not torch.equal(b, b0) for (_, b), (_, b0) in
               zip([lora_pair(m) for m in lora_layers(adapted.model).values()], initial))  # LoRA B trained
    adapted.method.select_dimensions(adapted.model)
    for layer, (a0, b0) in zip(lora_layers(adapted.model).values(), initial):
        a, b = lora_pair(layer)
        assert torch.equal(a, a0) and torch.equal(b, b0)  # back to the pre-warm-up values
    for m, update in zip(mamba_mixers(adapted.model), warmed):
        assert all(torch.count_nonzero(getattr(m, f"sdlora_delta_{k}")) == 0 for k in "ABC")
        k_c = len(m.sdlora_channels)  # ...but the selection is the warm-up's: largest summed squared update
        assert set(m.sdlora_channels.tolist()) == set(update.sum(1).topk(k_c).indices.tolist())
        picked = update[m.sdlora_channels]  # (k_c, N)
        floor = picked.gather(1, m.sdlora_states).min(1).values  # per channel: smallest selected update
        others = picked.scatter(1, m.sdlora_states, -math.inf).max(1).values
        assert (floor >= others).all()
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, fresh)  # the model is its pre-warm-up self again
