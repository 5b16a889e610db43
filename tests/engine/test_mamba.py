"""Mamba bases chunk-wise: transformers' own cache restarts the SSM scan at every multi-token
chunk (shown here), longctx carries the state, and chunked = unchunked."""
from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_mamba

from longctx.core.resources import task_dir
from longctx.engine.runner import chunked_forward, greedy_generate


def _logprobs(logits, ids, keep):
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, K, V)
    return logprobs.gather(-1, ids[:, keep + 1, None])[..., 0]  # (B, K)


def test_transformers_alone_forgets_the_ssm_state_between_chunks():
    model, ids = tiny_mamba(), random_ids(1, 64)
    with torch.no_grad():
        whole = model(ids).logits[:, 32:]
        first = model(ids[:, :32], use_cache=True)
        from longctx.engine.hf_internals import mamba_cache_keyword

        cache = first.cache if hasattr(first, "cache") else first.cache_params
        second = model(ids[:, 32:], use_cache=True, **{mamba_cache_keyword(): cache}).logits
    assert (whole - second).abs().max() > 1e-3  # the gap longctx closes


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 45, 99])
def test_chunked_equals_unchunked(chunk_size):
    model, ids = tiny_mamba(), random_ids(2, 100)
    keep = torch.arange(0, 99)
    with torch.no_grad():
        reference = model(ids).logits[:, :99]  # (B, 99, V)
    out = chunked_forward(model, ids, chunk_size=chunk_size, keep=keep)
    assert out.n_chunks == -(-100 // chunk_size)
    assert torch.allclose(_logprobs(out.logits, ids, keep), _logprobs(reference, ids, keep), atol=1e-4)


def test_greedy_text_after_a_chunked_prefill_matches_the_unchunked_one():
    model, ids = tiny_mamba(), random_ids(1, 90)
    whole = greedy_generate(model, ids, max_new_tokens=12)
    chunked = greedy_generate(model, ids, max_new_tokens=12, chunk_size=25)
    reference = ids
    for _ in range(12):  # plain loop without any cache
        with torch.no_grad():
            nxt = model(reference).logits[:, -1].argmax(-1, keepdim=True)
        reference = torch.cat([reference, nxt], dim=1)
    assert whole.tolist() == chunked.tolist() == reference[:, 90:].tolist()


def test_parallel_scan_equals_the_reference_loop_in_training():
    """`use_parallel_scan` (transformers' mambapy path, what longctx trains Mamba with on CPU)
    gives the reference loop's loss and gradients."""
    pytest.importorskip("mambapy")
    from longctx.engine.mamba import use_parallel_scan

    ids = random_ids(2, 77)  # not a power of two: pscan pads
    results = []
    for parallel in (False, True):
        model = tiny_mamba().train()
        if parallel:
            use_parallel_scan(model)
        assert all(m.use_mambapy == parallel for m in model.modules() if hasattr(m, "use_mambapy"))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loop_loss, loop_grads), (scan_loss, scan_grads) = results
    assert torch.allclose(loop_loss, scan_loss, atol=1e-5)
    for a, b in zip(loop_grads, scan_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [64, 100])
def test_embedded_mamba_base_chunked_equals_unchunked(chunk_size):
    from longctx.engine.bases import load_base

    model, tok = load_base("longctx-tiny-mamba")
    assert all(m.use_mambapy for m in model.modules() if hasattr(m, "use_mambapy"))
    text = "The grass is green. The sky is blue. The pass key is 48213. Remember it. " * 12
    ids = tok(text, return_tensors="pt").input_ids[:, :300]  # (1, 300)
    keep = torch.arange(0, 299)
    with torch.no_grad():
        reference = model(ids).logits[:, :299]
    out = chunked_forward(model, ids, chunk_size=chunk_size, keep=keep)
    assert torch.allclose(_logprobs(out.logits, ids, keep), _logprobs(reference, ids, keep), atol=1e-4)
    assert greedy_generate(model, ids, 8).tolist() == greedy_generate(model, ids, 8, chunk_size=chunk_size).tolist()


def test_mamba_has_no_position_limit():
    from longctx.engine.family import check_length, position_limit

    model = tiny_mamba()
    assert position_limit(model) is None
    check_length(model, 10**6)  # no error


@pytest.mark.parametrize("method, targets", [("lora", ("in_proj", "x_proj")),
                                             ("ssmlora-scan", ("in_proj", "x_proj", "out_proj")),
                                             ("lora-xs", ("in_proj", "x_proj", "out_proj"))])
def test_adapters_on_mamba_projections_chunk_exactly(method, targets):
    from conftest import perturb

    from longctx.adapters import wrap

    adapted = wrap(tiny_mamba(), method, insertion=targets)
    perturb(adapted)
    assert {p.rsplit(".", 1)[-1] for p in adapted.insertion_points} == set(targets)
    assert len(adapted.insertion_points) == 2 * len(targets)  # every layer
    base_out = chunked_forward(tiny_mamba(), random_ids(1, 20)).logits
    assert (chunked_forward(adapted, random_ids(1, 20)).logits - base_out).abs().max() > 1e-4  # adapters act
    ids, keep = random_ids(1, 80), torch.arange(0, 79)
    whole = chunked_forward(adapted, ids, keep=keep)
    chunked = chunked_forward(adapted, ids, chunk_size=23, keep=keep)
    assert torch.allclose(_logprobs(whole.logits, ids, keep), _logprobs(chunked.logits, ids, keep), atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "ssmlora", "ssmlora-scan", "lora-xs", "sdlora", "dense"])
def test_training_forward_honours_adapters_and_never_takes_the_fused_kernel(method, monkeypatch):
    """The fused training kernel reads x_proj/out_proj weights directly (bypassing adapters); an
    adapted Mamba must train through the unfused path, equal to its eval-mode forward."""
    from conftest import perturb
    from transformers.models.mamba import modeling_mamba

    from longctx.adapters import wrap

    def fused(*args, **kwargs):
        raise AssertionError("the fused kernel path was taken")

    monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", fused)
    options = ({} if method == "dense" else {"dropout": 0.0} if method == "sdlora"  # its recipe: dropout 0.1
               else {"insertion": ("in_proj", "x_proj"), "dropout": 0.0})
    adapted = wrap(tiny_mamba(), method, **options)
    perturb(adapted)
    ids = random_ids(2, 40)
    with torch.no_grad():
        evaluated = adapted.model(input_ids=ids).logits  # (B, T, V)
    adapted.model.train()
    trained = adapted.model(input_ids=ids, labels=ids)
    assert torch.allclose(trained.logits, evaluated, atol=1e-5)  # adapters act in training too
    trained.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method, targets, message", [
    ("lora", ("q_proj",), "matched no module of this mamba model.*in_proj"),
    ("ssmlora-scan", ("dt_proj",), "'dt_proj' cannot be adapted.*silently ignored"),
    ("lora", ("out_proj",), "PEFT refused this LoRA placement.*out_proj"),
])
def test_an_invalid_mamba_target_fails_loudly(method, targets, message):
    from longctx.adapters import wrap
    from longctx.core.errors import LongctxError

    with pytest.raises(LongctxError, match=message):
        wrap(tiny_mamba(), method, insertion=targets)


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    from conftest import save_tiny_base

    directory = save_tiny_base(tmp_path_factory.mktemp("tiny-mamba"))  # tokenizer (and a llama we replace)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (directory / name).unlink(missing_ok=True)
    tiny_mamba().save_pretrained(directory)
    return directory


def test_ssmlora_model_type_on_mamba_has_no_2048_fallback_and_chunks(mamba_dir):
    from lm_eval.api.instance import Instance

    from longctx.lmeval.model import SsmloraLM

    context = "The grass is green. " * 600
    requests = [Instance("loglikelihood", {"max_length": 3000}, (context, " The sky"), 0)]
    whole = SsmloraLM(pretrained=str(mamba_dir), method="base")
    chunked = SsmloraLM(pretrained=str(mamba_dir), method="ssmlora-scan", chunk_size=300)
    assert whole.position_limit is None and whole.max_length > 10**6  # lm-eval's 2048 default not applied
    (a, _), (b, _) = whole.loglikelihood(requests)[0], chunked.loglikelihood(requests)[0]
    assert abs(a - b) < 1e-3  # fresh adapter = base; chunked = unchunked
    record = chunked.log.records[0]
    assert record.input_tokens > 2048 and record.chunks == -(-record.input_tokens // 300)
    assert chunked.get_model_info()["longctx"]["per_length"]["3000"]["peak_memory_bytes"] > 0


@pytest.mark.slow
def test_stock_lm_eval_runs_sdlora_on_the_embedded_mamba_base_chunked(tmp_path):
    import glob
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "ssmlora", "--model_args",
                          "pretrained=longctx-tiny-mamba,method=sdlora,chunk_size=128", "--tasks", "longctx_passkey",
                          "--include_path", str(task_dir()), "--metadata", '{"max_seq_lengths":[300,600]}',
                          "--limit", "2", "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (results,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    info = json.loads(Path(results).read_text())["config"]["longctx"]
    assert info["method"] == "sdlora" and info["position_limit"] is None
    assert info["attention"] == {"implementation": None}  # Mamba has none to record
    assert set(info["per_length"]) == {"300", "600"}
    assert info["per_length"]["600"]["chunks"] >= 5 and info["per_length"]["600"]["peak_memory_bytes"] > 0
