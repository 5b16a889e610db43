"""Fidelity: `--model ssmlora,method=base` (chunked and unchunked) against lm-eval's `hf` on one base.

Greedy generations on longctx_passkey_gen, longctx_niah_single_gen and RULER's niah_single_1, and
log-likelihoods on longctx_passkey, at the given lengths (the whole request fits in each): prints,
per task and model, how many answers are identical and the largest log-likelihood difference.
For a GGUF base `hf` loads the GGUF itself (dequantised by transformers), ssmlora the cached
conversion. RULER needs `wonderwords` and `nltk` (nltk's punkt_tab: only an empty stand-in is made,
niah_single_1 never tokenizes sentences).
Usage: python benchmarks/fidelity_vs_hf.py --base smollm2-135m --lengths 8192 --chunk-size 2048
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

GEN_TASKS = ("longctx_passkey_gen", "longctx_niah_single_gen", "niah_single_1")


def hf_model(base: str):
    from lm_eval.models.huggingface import HFLM

    from longctx.engine.gguf import REAL_BASES, gguf_path, is_gguf
    from longctx.engine.settings import resolve_base

    if is_gguf(base):
        source = gguf_path(base) if base in REAL_BASES else Path(base)
        return HFLM(pretrained=str(source.parent), gguf_file=source.name, device="cpu", batch_size=1, dtype="float32")
    return HFLM(pretrained=resolve_base(base), device="cpu", batch_size=1, dtype="float32")


def main() -> None:
    import nltk

    from longctx.engine.settings import resolve_base
    from longctx.lmeval.fidelity import agreement, answer, task_requests
    from longctx.lmeval.model import SsmloraLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--lengths", default="8192", help="comma list")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--n", type=int, default=1, help="documents per length and task")
    parser.add_argument("--max-gen-toks", type=int, default=16)
    args = parser.parse_args()
    stand_in = Path(tempfile.mkdtemp()) / "tokenizers" / "punkt_tab"
    stand_in.mkdir(parents=True)
    nltk.data.path.insert(0, str(stand_in.parent.parent))
    lengths = [int(x) for x in args.lengths.split(",")]
    tokenizer = resolve_base(args.base)
    models = {"hf": hf_model(args.base), "ssmlora": SsmloraLM(pretrained=args.base, method="base"),
              f"ssmlora chunk {args.chunk_size}": SsmloraLM(pretrained=args.base, method="base",
                                                            chunk_size=args.chunk_size)}
    print(f"base {args.base}, lengths {lengths}, n {args.n} per length, generation budget {args.max_gen_toks}")
    for task in (*GEN_TASKS, "longctx_passkey"):
        requests = task_requests(task, tokenizer, lengths, args.n, args.max_gen_toks)
        answers = {}
        for name, lm in models.items():
            start = time.perf_counter()
            answers[name] = answer(lm, requests)
            print(f"  {task:26} {name:20} {time.perf_counter() - start:7.1f} s", flush=True)
        for name in list(models)[1:]:
            print(f"  {task:26} {name} vs hf: {agreement(requests, answers[name], answers['hf'])}", flush=True)


if __name__ == "__main__":
    main()
