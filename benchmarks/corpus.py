"""SAE corpus sampling: kscope's KV-cache sampler against transformers' ``generate``, same model, batch and length.

Both sample top-k 50 then top-p 0.95 (``generate``'s defaults with ``top_p=0.95``) from the default model,
one batch of ``--rows`` openings and ``--tokens`` new tokens each, in the same process, alternating, best of
``--reps``. FLOPs are counted once per method with torch's ``FlopCounterMode`` (matmuls and attention) and
divided by the time for the share of this machine's best square fp32 matmul FLOP/s.

    python benchmarks/corpus.py --rows 256 --tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution import matmul_flops  # noqa: E402

from kscope.model.loading import load_model  # noqa: E402
from kscope.model.sampling import sample  # noqa: E402


def run_generate(lm, ids, n):
    torch.manual_seed(0)
    return lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=lm.tokenizer.pad_token_id)


def run_kscope(lm, ids, n):
    return sample(lm.model, ids, n, torch.Generator().manual_seed(0))  # no eos: every row runs all n tokens, as above


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from torch.utils.flop_counter import FlopCounterMode

    lm = load_model()
    ids = torch.tensor([lm.tokenizer("The").input_ids] * args.rows)
    peak = matmul_flops()
    methods = {"generate": run_generate, "kscope": run_kscope}
    flops, best = {}, {m: float("inf") for m in methods}
    for name, fn in methods.items():
        with FlopCounterMode(display=False) as counter:
            fn(lm, ids[:8], 8)
        flops[name] = counter.get_total_flops() / (8 * 8)  # per new token, at a short length
        fn(lm, ids[:8], 4)  # warm-up
    for _ in range(args.reps):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn(lm, ids, args.tokens)
            best[name] = min(best[name], time.perf_counter() - t)
    n_tok = args.rows * args.tokens
    print(f"SAE corpus sampling, {lm.name}, {args.rows} rows x {args.tokens} new tokens, top-k 50 + top-p 0.95, "
          f"{torch.get_num_threads()} threads, matmul peak {peak / 1e9:.0f} GFLOP/s")
    for name in methods:
        rate = n_tok / best[name]
        print(f"  {name:9s}: {rate:7.1f} tokens/s ({best[name]:6.1f} s)  {best['generate'] / best[name]:4.2f}x generate  "
              f"{flops[name] / 1e9:.2f} GFLOP/token -> {100 * flops[name] * rate / peak:3.0f}% of matmul peak")


if __name__ == "__main__":
    os.environ.setdefault("KSCOPE_QUIET", "1")
    main()
