"""Chunked training with carried state (`longctx.training.chunked`, `longctx train --chunk-size`).

Invariants, table-driven over methods and both families: the chunked loss of every method exact
under chunking equals the whole-sequence loss (float32 and bf16); the gradient is the one of the
last chunk's own computation given the carried cache and state (checked against the evaluation
path, `runner.chunked_forward`, for the prefix); SSMLoRA's C gets a gradient only when trained in
chunks (the defect of issue 12); a chunked run resumes from its checkpoint to the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longctx.adapters import wrap
from longctx.training.chunked import chunked_training_loss, next_token_targets
from tests.conftest import VOCAB, perturb, tiny_llama

EXACT = [("llama", m) for m in ("dense", "lora", "lora-xs", "ssmlora-scan")] + \
        [("mamba", m) for m in ("lora", "sdlora", "ssmlora-scan")]


def tiny_mamba(seed: int = 0):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                         conv_kernel=4, time_step_rank=4, use_mambapy=True)
    return MambaForCausalLM(config).eval()


def _adapted(family: str, method: str, dtype: torch.dtype = torch.float32):
    from longctx.engine.attention import register

    base = tiny_llama() if family == "llama" else tiny_mamba()
    if family == "llama":
        base.config._attn_implementation = register()
    adapted = wrap(base.to(dtype), method, seed=0)
    perturb(adapted)
    adapted.model.train()
    for module in adapted.model.modules():  # dropout would make two passes differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return adapted


def _batch(lengths=(70, 61), answer: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, N) ids, attention mask and labels: the last `answer` tokens of each row scored."""
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids, mask = torch.zeros(len(lengths), n, dtype=torch.long), torch.zeros(len(lengths), n, dtype=torch.long)
    labels = torch.full((len(lengths), n), -100)
    for i, length in enumerate(lengths):
        ids[i, :length] = torch.randint(3, VOCAB, (length,), generator=gen)
        mask[i, :length] = 1
        labels[i, length - answer:length] = ids[i, length - answer:length]
    return ids, mask, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_next_token_targets_shift_labels_by_one():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    assert next_token_targets(labels).tolist() == [[-100, 7, 8, -100], [5, -100, -100, -100]]


@pytest.mark.parametrize("family, method", EXACT)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_chunked_loss_equals_whole_sequence_loss(family, method, dtype, tol):
    adapted = _adapted(family, method, dtype)
    ids, mask, labels = _batch()
    whole = adapted.model(input_ids=ids, attention_mask=mask, labels=labels).loss.float()
    parts = []
    total = chunked_training_loss(adapted, ids, labels, 16, lambda loss: parts.append(loss.detach()))
    scored = {int(t) // 16 for t in (next_token_targets(labels) != -100).nonzero()[:, 1]}
    assert len(parts) == len(scored) == 2  # only the chunks holding answers are back-propagated
    assert torch.isfinite(total) and abs(total.item() - whole.item()) <= tol * max(1.0, abs(whole.item()))


@pytest.mark.parametrize("family, method", EXACT[:3] + [("llama", "ssmlora"), ("mamba", "ssmlora")])
def test_gradient_is_the_last_chunks_given_the_carried_prefix(family, method):
    """Truncation at chunk boundaries: the gradient equals that of the scored chunk alone, run as a
    plain forward after the evaluation path has prefilled the (detached) cache and state."""
    from longctx.engine.runner import chunked_forward, forward_chunk

    adapted = _adapted(family, method)
    ids, _, labels = _batch(lengths=(64, 64))
    adapted.model.zero_grad()
    chunked_training_loss(adapted, ids, labels, 16, lambda loss: loss.backward())
    got = _grads(adapted.model)
    adapted.model.zero_grad()
    prefix = chunked_forward(adapted, ids[:, :48], chunk_size=16, reserve=16)  # no autograd
    with adapted.bind(prefix.state):
        out = forward_chunk(adapted.model, ids[:, 48:], None, torch.arange(48, 64)[None], prefix.cache, 0)
    targets = next_token_targets(labels)[:, 48:]
    torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    want = _grads(adapted.model)
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_ssmlora_transition_matrix_trains_only_in_chunks(family):
    """With the default `sparse-qv` preset every point has its own key: whole-sequence training feeds
    it a zero state, so C's gradient is exactly 0; in chunks it sees the carried state."""
    adapted = _adapted(family, "ssmlora")
    ids, mask, labels = _batch()
    adapted.model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    whole = [p.grad for n, p in adapted.model.named_parameters() if n.endswith("ssmlora_C")]
    assert whole and all(g is None or not g.any() for g in whole)
    adapted.model.zero_grad()
    chunked_training_loss(adapted, ids, labels, 16, lambda loss: loss.backward())
    chunked = [p.grad for n, p in adapted.model.named_parameters() if n.endswith("ssmlora_C")]
    assert all(g is not None and g.abs().max() > 0 for g in chunked)


@pytest.mark.parametrize("native", [True, False])
def test_no_repeated_cache_in_the_differentiable_attention(monkeypatch, native):
    """Chunked training attends over the cache without repeating its K/V for grouped-query heads,
    forward and backward: at most a chunk's own K/V, and nothing where the kernel groups heads."""
    import longctx.engine.kernels as kernels

    monkeypatch.setattr(kernels, "groups_natively", lambda name, device, dtype, head_dim: native)
    adapted = _adapted("llama", "lora")
    repeated = []
    original = kernels.repeat_kv
    monkeypatch.setattr(kernels, "repeat_kv", lambda x, g: repeated.append(x.shape[2]) or original(x, g))
    ids, _, labels = _batch(lengths=(64, 64))
    chunked_training_loss(adapted, ids, labels, 16, lambda loss: loss.backward())
    assert max(repeated, default=0) <= 16  # at most one chunk's own K/V, never the cache's
    assert bool(repeated) is not native


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_chunked_training_trains_ssmlora_C_and_whole_sequences_do_not(tmp_path):
    """The issue's reproducer, smaller (`longctx train --method ssmlora` is this TrainConfig): whole
    sequences leave every C at 0; `chunk_size` moves every C. Both logs record the chunk size."""
    from longctx.training.config import TrainConfig
    from longctx.training.train import train_adapter

    for name, chunk in (("whole", None), ("chunked", 32)):
        train_adapter(TrainConfig(method="ssmlora", task="passkey", train_length=96, out=str(tmp_path / name),
                                  steps=6, batch_size=2, n_validation=1, eval_every=6, chunk_size=chunk),
                      progress=False)
    whole = [v for k, v in _weights(tmp_path / "whole").items() if k.endswith("ssmlora_C")]
    chunked = [v for k, v in _weights(tmp_path / "chunked").items() if k.endswith("ssmlora_C")]
    assert len(whole) == len(chunked) == 4
    assert all(not c.any() for c in whole) and all(c.abs().max() > 0 for c in chunked)
    logs = {name: json.loads((tmp_path / name / "train_log.json").read_text()) for name in ("whole", "chunked")}
    assert logs["chunked"]["config"]["chunk_size"] == 32 and logs["whole"]["config"]["chunk_size"] is None


@pytest.mark.slow
def test_chunked_training_resumes_mid_run_to_the_same_weights(tmp_path, monkeypatch):
    """A chunked run killed after its step-2 checkpoint and run again ends where an uninterrupted
    run ends."""
    import longctx.training.train as train

    def config(out: Path) -> train.TrainConfig:
        return train.TrainConfig(method="ssmlora-scan", task="passkey", train_length=96, out=str(out), steps=4,
                                 batch_size=2, n_validation=1, eval_every=4, chunk_size=32)

    train.train_adapter(config(tmp_path / "straight"), progress=False)

    class Killed(Exception):
        pass

    from transformers import TrainerCallback

    class KillAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Killed

    original = train._validation_callback
    monkeypatch.setattr(train, "_validation_callback", lambda *a: KillAtStep3())
    with pytest.raises(Killed):
        train.train_adapter(config(tmp_path / "resumed"), progress=False)
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "resumed" / "adapter").exists()
    monkeypatch.setattr(train, "_validation_callback", original)
    train.train_adapter(config(tmp_path / "resumed"), progress=False)
    log = json.loads((tmp_path / "resumed" / "train_log.json").read_text())
    assert log["resumed_from"].endswith("checkpoint-2")
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def test_cli_refuses_a_bad_chunk_size_in_one_line(tmp_path, capsys):
    from longctx.cli import main

    code = main(["train", "--method", "lora", "--task", "passkey", "--train-length", "96",
                 "--out", str(tmp_path / "bad"), "--quiet", "--chunk-size", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "chunk_size" in err and "0" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
