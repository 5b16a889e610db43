"""P1: peak memory of one log-likelihood request, `ssmlora` chunked vs lm-eval's `hf` model, on a
benchmark-sized random Llama (32K vocabulary); target ≤ 0.25×.

Each side runs in its own child process (clean peaks: CPU resident-set high-water mark reset
before the request, or the CUDA allocator's peak). `hf` computes logits for every position
(N × 32K floats, then their log-softmax); `ssmlora` keeps the continuation's logits only and
carries a preallocated KV cache through chunks. Pick the longest length `hf` fits on the machine.
`--base smollm2-135m` (or any base name / directory) measures a real checkpoint instead.
Usage: python benchmarks/p1_memory_vs_hf.py [--length 32768] [--chunk-size 2048] [--device cpu] [--base NAME]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_llama  # noqa: E402

TARGET = 0.25
CONTINUATION = 8


def save_model(directory: Path, layers: int, hidden: int) -> None:
    from transformers import AutoTokenizer

    from longctx.engine.settings import default_base_path

    bench_llama(layers=layers, hidden=hidden, attn="sdpa").save_pretrained(directory)
    AutoTokenizer.from_pretrained(default_base_path()).save_pretrained(directory)


def child(side: str, directory: str, length: int, chunk_size: int, device: str) -> dict:
    import torch

    from longctx.engine.measure import TimedRegion

    if side == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=directory, device=device, batch_size=1, dtype="float32")
    else:
        from longctx.lmeval.model import SsmloraLM

        lm = SsmloraLM(pretrained=directory, method="ssmlora", chunk_size=chunk_size, device=device)
    ids = torch.randint(10, 4000, (length,), generator=torch.Generator().manual_seed(0)).tolist()  # in every vocab
    request = (("context", "continuation"), ids[:-CONTINUATION], ids[-CONTINUATION:])
    with TimedRegion(device) as region:
        ((logprob, _),) = lm._loglikelihood_tokens([request], disable_tqdm=True)
    return {"peak": region.peak_bytes, "delta": region.delta_bytes, "method": region.method,
            "seconds": region.seconds, "logprob": logprob}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base", default=None, help="a real base (e.g. smollm2-135m) instead of the random model")
    parser.add_argument("--child", choices=["hf", "ssmlora"])
    parser.add_argument("--dir")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.length, args.chunk_size, args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            from longctx.engine.settings import resolve_base

            tmp = resolve_base(args.base)  # hf loads the same directory (a GGUF base: its dequantised cache)
        else:
            save_model(Path(tmp), args.layers, args.hidden)
        out = {}
        for side in ("hf", "ssmlora"):
            cmd = [sys.executable, __file__, "--child", side, "--dir", tmp, "--length", str(args.length),
                   "--chunk-size", str(args.chunk_size), "--device", args.device]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{side} child failed:\n{run.stderr[-3000:]}")
            out[side] = json.loads(run.stdout.strip().splitlines()[-1])
    hf, ours = out["hf"], out["ssmlora"]
    mib = 2 ** 20
    model = args.base or f"Llama {args.layers} layers d={args.hidden} 32K vocab"
    print(f"P1: {args.length} tokens, {model}, {args.device} ({hf['method']}); ssmlora chunk {args.chunk_size}")
    print(f"  hf      peak {hf['peak'] / mib:9.1f} MiB (request's own {hf['delta'] / mib:9.1f} MiB)  {hf['seconds']:.1f} s")
    print(f"  ssmlora peak {ours['peak'] / mib:9.1f} MiB (request's own {ours['delta'] / mib:9.1f} MiB)  {ours['seconds']:.1f} s")
    print(f"  log-probs: hf {hf['logprob']:.4f}  ssmlora {ours['logprob']:.4f} (zero-initialised adapter)")
    ratio = ours["peak"] / hf["peak"]
    print(f"  peak ratio {ratio:.3f}x  (target <= {TARGET}x) {'PASS' if ratio <= TARGET else 'MISS'}; "
          f"request's own memory {ours['delta'] / max(hf['delta'], 1):.3f}x")


if __name__ == "__main__":
    main()
