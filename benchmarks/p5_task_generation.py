"""P5: generating niah_single examples with longctx's generator vs lm-eval's RULER generator
(`niah_single_1`: repeated-noise haystack, word keys, number values), same tokenizer, lengths
and sample count; target ≥ 10× faster. Best of three runs after a warm-up, each side.

RULER's generator needs `pip install wonderwords nltk` (not a longctx dependency).
Usage: python benchmarks/p5_task_generation.py [--lengths 4096 16384] [--samples 100]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time  # noqa: E402

TARGET = 10.0


def ours(tokenizer, length: int, samples: int) -> float:
    """Best of 3 (after a warm-up) seconds for `samples` examples at `length`."""
    from longctx.tasks import generate

    return best_time(lambda: generate("niah_single", tokenizer, length, samples, haystack="noise"), device="cpu")


def ruler(tokenizer, length: int, samples: int) -> float:
    from lm_eval.tasks.ruler.niah_utils import TEMPLATE
    from lm_eval.tasks.ruler.prepare_niah import generate_samples, get_haystack

    return best_time(lambda: generate_samples(
        get_haystack(type_haystack="repeat"), max_seq_length=length, template=TEMPLATE, type_haystack="repeat",
        type_needle_k="words", type_needle_v="numbers", num_samples=samples, TOKENIZER=tokenizer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from longctx.engine.settings import default_base_path

    tokenizer = AutoTokenizer.from_pretrained(default_base_path())
    print(f"P5: {args.samples} niah_single examples per length, tokenizer longctx-tiny (BPE, {len(tokenizer)})")
    for length in args.lengths:
        a, b = ours(tokenizer, length, args.samples), ruler(tokenizer, length, args.samples)
        verdict = "PASS" if b / a >= TARGET else "MISS"
        print(f"  L={length:>6}: longctx {a:7.2f} s   RULER {b:7.2f} s   speed-up {b / a:6.1f}x  "
              f"(target >= {TARGET:.0f}x) {verdict}")


if __name__ == "__main__":
    main()
