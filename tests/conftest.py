"""Shared fixtures: tiny Llama models built locally from a config (no downloads)."""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (the README's `-n 2`) each worker gets its share of the cores, as the local
# executor's workers do, and so do the processes the tests start (they inherit the environment):
# two workers of two threads each on two cores made compute-bound tests up to 17x slower
# (measured: 10.5 s -> 183 s).
from longctx.sweep.executors import local_worker_env  # noqa: E402  (no side effects; torch not imported)

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.update(local_worker_env(0, _WORKERS, visible_gpus=[]))

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

METHODS = ["base", "dense", "lora", "ssmlora", "ssmlora-scan", "lora-xs"]
# Methods whose chunked run must equal the unchunked run (design §5).
EXACT_UNDER_CHUNKING = ["base", "dense", "lora", "ssmlora-scan", "lora-xs"]
# Name filter of each method's own (trainable) parameters.
OWN_PARAMS = {"base": None, "dense": "", "lora": "lora_", "ssmlora": "ssmlora_", "ssmlora-scan": "scan_", "lora-xs": "lora_xs_"}
VOCAB = 300


def tiny_llama(seed: int = 0, layers: int = 4, max_positions: int = 512):
    """A random 4-layer Llama (d=64, GQA) in eval mode; same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_mamba(seed: int = 0):
    """A random 2-layer Mamba (d=48, state 8) in eval mode; same seed, same weights."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=VOCAB, hidden_size=48, state_size=8, num_hidden_layers=2, conv_kernel=4,
                         expand=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return MambaForCausalLM(config).eval()


def perturb(adapted, seed: int = 1, scale: float = 0.05) -> None:
    """Give an adapter random non-zero weights, so it no longer equals its base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapted.model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p))


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids() -> torch.Tensor:
    return random_ids(2, 96)


def save_tiny_base(directory, seed: int = 0, max_positions: int = 512):
    """A tiny Llama plus a byte-level BPE tokenizer (≤ VOCAB entries), saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The grass is green. The sky is blue. The pass key is 12345."] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    tiny_llama(seed, max_positions=max_positions).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def save_char_tokenizer(directory):
    """A character-level tokenizer (one token per character), saved in HF format."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def char_tokenizer_dir(tmp_path_factory):
    return save_char_tokenizer(tmp_path_factory.mktemp("char-tok"))


@pytest.fixture(scope="session")
def tokenizers(char_tokenizer_dir):
    """The two tokenizers every length property is checked with: embedded BPE and characters."""
    from transformers import AutoTokenizer

    from longctx.engine.settings import default_base_path

    return {"bpe": AutoTokenizer.from_pretrained(default_base_path()),
            "char": AutoTokenizer.from_pretrained(char_tokenizer_dir)}


# The small sweep both the local and the cluster executors are tested on: 2 methods x 2 lengths.
SWEEP_SMOKE = {"methods": ["base", "lora"], "tasks": ["passkey"], "lengths": [256, 320], "train_length": 256,
               "train_steps": 2, "batch_size": 2, "num_samples": 1, "chunk_size": 128}


def built_once_per_run(tmp_path_factory, name: str, build) -> Path:
    """A directory `build(directory)` fills once per test run, shared by the xdist workers (under
    `-n 2` a session fixture would otherwise be built once per worker): the first worker builds it
    under a lock, the others wait and reuse it. A failed build is not reused: each worker retries."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    root = tmp_path_factory.getbasetemp().parent / f"shared-{run_id}" if run_id else tmp_path_factory.getbasetemp()
    root.mkdir(exist_ok=True)
    directory, marker = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not marker.exists():
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir()
            build(directory)
            marker.touch()
    return directory


def _sigkill_then_finish(tmp: Path) -> None:
    """`SWEEP_SMOKE` in `tmp/out`, SIGKILLed (with its child) at four moments, then finished."""
    config = tmp / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SWEEP_SMOKE, "out": str(tmp / "out")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "longctx.cli", "sweep", str(config), "--quiet"]
    root = Path(__file__).resolve().parent.parent
    for delay in (2.0, 6.0, 10.0, 14.0):
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its child evaluation, mid-flight
        proc.wait()
    final = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]


@pytest.fixture(scope="session")
def sigkilled_local_sweep(tmp_path_factory):
    """`SWEEP_SMOKE` run locally, SIGKILLed (with its child) at four moments and finished by a last
    run: the results directory, built once per test run. `test_run` checks it as a crash test;
    `test_cluster` uses its table as the local run's (the sweep is deterministic, so it must equal
    an uninterrupted run's)."""
    tmp = built_once_per_run(tmp_path_factory, "sigkilled-smoke", _sigkill_then_finish)
    return {"config": tmp / "sweep.yaml", "out": tmp / "out"}
