"""The embedded base: committed assets load offline, match their manifest, and the recipe is
deterministic and reproduces what it claims."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from longctx.errors import LongctxError
from longctx.models import default_base_path
from longctx.pretrain import evaluate_capability, pretrain


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_base_path()
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_committed_base_loads_and_matches_its_manifest(tiny):
    path, model, tok = tiny
    manifest = json.loads((path / "manifest.json").read_text())
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == manifest["model_sha256"]
    assert model.config.max_position_embeddings >= 2048
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert (path / "model.safetensors").stat().st_size <= 10 * 2**20


def test_tokenizer_splits_digits_and_round_trips(tiny):
    _, _, tok = tiny
    ids = tok("code 48213", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert [p.strip() for p in pieces[-5:]] == list("48213")
    text = "The sky is blue. Zwölf Boxkämpfer — 12 345!\n\tdef f(x): return x"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_manifest_reports_the_bases_measured_capability(tiny):
    path, model, tok = tiny
    manifest = json.loads((path / "manifest.json").read_text())
    assert evaluate_capability(model, tok, n=30) == manifest["capability"]  # same probes, same scores
    assert manifest["final_loss"] < 0.5 * torch.log(torch.tensor(float(len(tok)))).item()  # far below uniform


def test_recipe_is_deterministic(tmp_path):
    first = pretrain(tmp_path / "a", steps=3, seq_len=64, progress=False)
    second = pretrain(tmp_path / "b", steps=3, seq_len=64, progress=False)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left


def test_unknown_architecture_is_refused(tmp_path):
    with pytest.raises(LongctxError, match="unknown architecture 'rwkv'; valid choices: llama"):
        pretrain(tmp_path / "x", arch="rwkv")
    assert not (tmp_path / "x").exists()
