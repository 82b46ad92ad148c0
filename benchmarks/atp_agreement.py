"""How far does attribution patching change which units are found? AtP (and atp-ig) against IG on SmolLM2.

For each known fact and each unit set (neurons at several layers; SAE features at the same layers when
cached SAEs exist): the top-10 units each method picks (the same selection rule: Dai et al.'s refined
set, then mean score), their overlap, the Spearman correlation of the mean scores, and the real test:
ΔP(answer) when each method's top-10 are suppressed. Also the time per fact of each method.

    python benchmarks/atp_agreement.py --layers 6,12,18,24                      # built-in facts
    python benchmarks/atp_agreement.py --facts ../shared/pararel --max-facts 60
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", default=None)
    ap.add_argument("--max-facts", type=int, default=33)
    ap.add_argument("--layers", default="6,12,18,24")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()

    from kscope.config import parse_layers
    from kscope.facts import FactConfig, prepare_facts
    from kscope.locate.attribution import AttributionConfig, attribute_fact
    from kscope.locate.delta_prob import DeltaProbConfig, fact_delta_prob
    from kscope.model.loading import load_model
    from kscope.model.sites import Site
    from kscope.units.provision import find_cached_sae, neuron_units
    from kscope.units.sae import feature_units, load_sae

    torch.set_num_threads(torch.get_num_threads())
    lm = load_model()
    facts, _ = prepare_facts(lm, FactConfig(facts=args.facts, max_facts=args.max_facts))
    sets = []
    for L in parse_layers(args.layers):
        sets.append((f"{L}/neurons", neuron_units(lm, L)))
        d = find_cached_sae(lm, Site(L, "mlp.out"))
        if d is not None:
            sets.append((f"{L}/features", feature_units(lm.model, load_sae(str(d)))))
    units = [u for _, u in sets]
    dcfg = DeltaProbConfig(ks=[args.k], ops=["suppress"])
    methods = ("ig", "atp", "atp-ig")
    secs = {m: 0.0 for m in methods}
    rows = {name: {m: {"overlap": [], "rho": [], "dp": []} for m in methods[1:]} | {"ig": {"dp": []}} for name, _ in sets}
    for f in facts:
        tops, scores = {}, {}
        for m in methods:
            t = time.perf_counter()
            atts = attribute_fact(lm, f, units, AttributionConfig(method=m, steps=args.steps, top_k=args.k, shortlist=5 * args.k))
            secs[m] += time.perf_counter() - t
            tops[m] = [a.top[: args.k] for a in atts]
            scores[m] = [a.scores.mean(0) for a in atts]
        for j, (name, u) in enumerate(sets):
            for m in methods:
                rows[name][m]["dp"].append(fact_delta_prob(lm, f, u, tops[m][j], dcfg)["suppress"][args.k])
            for m in methods[1:]:
                rows[name][m]["overlap"].append(len(set(tops[m][j]) & set(tops["ig"][j])) / args.k)
                rows[name][m]["rho"].append(spearmanr(scores[m][j].numpy(), scores["ig"][j].numpy()).statistic)
    out = {"facts": args.facts or "built-in", "n_facts": len(facts), "k": args.k, "steps": args.steps,
           "seconds_per_fact": {m: secs[m] / len(facts) for m in methods}, "sets": {}}
    print(f"AtP vs IG on SmolLM2-135M, {len(facts)} facts ({out['facts']}), top-{args.k}, IG {args.steps} steps")
    print(f"  time per fact, all {len(sets)} unit sets: " + ", ".join(f"{m} {secs[m] / len(facts):.2f} s" for m in methods)
          + f"  (AtP {secs['ig'] / max(secs['atp'], 1e-9):.0f}x faster than IG)")
    print(f"  {'units':16} {'overlap atp':>12} {'rho atp':>8} {'overlap atp-ig':>15} {'ΔP IG':>8} {'ΔP AtP':>8} {'ΔP atp-ig':>10} {'AtP/IG':>7}")
    for name, _ in sets:
        r = rows[name]
        dp = {m: float(np.mean(r[m]["dp"])) for m in methods}
        rec = {"overlap_atp": float(np.mean(r["atp"]["overlap"])), "rho_atp": float(np.nanmean(r["atp"]["rho"])),
               "overlap_atp_ig": float(np.mean(r["atp-ig"]["overlap"])), "dp": dp, "dp_ratio_atp": dp["atp"] / dp["ig"]}
        out["sets"][name] = rec
        print(f"  {name:16} {rec['overlap_atp']:12.2f} {rec['rho_atp']:8.2f} {rec['overlap_atp_ig']:15.2f} {dp['ig']:+8.3f} "
              f"{dp['atp']:+8.3f} {dp['atp-ig']:+10.3f} {rec['dp_ratio_atp']:7.2f}")
    if args.out:
        from kscope.io import write_json

        write_json(args.out, out)


if __name__ == "__main__":
    main()
