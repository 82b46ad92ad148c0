"""N SAEs from one activation pass vs N separate runs (each collecting its own activations), side by side.

The forward passes should be paid once; the SAEs' own training is the irreducible part. Both arms train
the same SAEs (same corpus, options and seed) on SmolLM2; the held-out explained variance is printed
to show they are the same SAEs.

    python benchmarks/sae_training.py --layers 3,9,15,21 --sites mlp.out,resid.post --tokens 20000
"""

from __future__ import annotations

import argparse
from pathlib import Path
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="3,9,15,21")
    ap.add_argument("--sites", default="mlp.out,resid.post")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--generate", type=int, default=None, help="generated sequences (default: the default corpus, cached)")
    args = ap.parse_args()

    from kscope.config import parse_layers, parse_list
    from kscope.model.loading import load_model
    from kscope.model.sites import Site
    from kscope.units.corpus import CorpusConfig, build_corpus, collect_activations
    from kscope.units.provision import obtain_saes
    from kscope.units.training import TrainSAEConfig

    lm = load_model()
    sites = [Site(L, k) for L in parse_layers(args.layers) for k in parse_list(args.sites)]
    tcfg = TrainSAEConfig(max_tokens=args.tokens, epochs=1)
    ccfg = CorpusConfig() if args.generate is None else CorpusConfig(generate=args.generate)
    build_corpus(lm, ccfg)  # generate (and cache) the text first: neither arm pays for it
    train_texts, _ = build_corpus(lm, ccfg).split()
    t = time.perf_counter()
    collect_activations(lm, sites, train_texts, args.tokens)
    one_pass_collect = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        t = time.perf_counter()
        together = obtain_saes(lm, sites, tcfg, ccfg, out_dirs={s: Path(a) / s.name for s in sites})  # text from the cache
        t_together = time.perf_counter() - t
        t = time.perf_counter()
        apart = {s: obtain_saes(lm, [s], tcfg, ccfg, out_dirs={s: Path(b) / s.name})[s] for s in sites}
        t_apart = time.perf_counter() - t
    print(f"{len(sites)} SAEs ({', '.join(s.name for s in sites)}), {args.tokens} training tokens each, 1 epoch")
    print(f"  one activation pass, trained side by side : {t_together:7.1f} s")
    print(f"  {len(sites)} separate runs                       : {t_apart:7.1f} s")
    print(f"  speed-up                                  : {t_apart / t_together:.2f}x  "
          f"(collecting all sites' activations once takes {one_pass_collect:.1f} s)")
    for s in sites:
        ev1, ev2 = together[s][1].stats["explained_variance"], apart[s][1].stats["explained_variance"]
        print(f"  {s.name:14} held-out explained variance: together {ev1:.3f}, apart {ev2:.3f}")


if __name__ == "__main__":
    main()
