"""Shared fixtures: tiny Llama models built locally from a config (no downloads)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

METHODS = ["base", "dense", "lora", "ssmlora", "ssmlora-scan", "lora-xs"]
# Methods whose chunked run must equal the unchunked run (SPEC §5).
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

    from longctx.models import default_base_path

    return {"bpe": AutoTokenizer.from_pretrained(default_base_path()),
            "char": AutoTokenizer.from_pretrained(char_tokenizer_dir)}
