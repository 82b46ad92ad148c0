"""How far do attribution shortcuts change which units are found? AtP, atp-mid and atp-ig against IG on SmolLM2.

For each known fact and each unit set (neurons at several layers; SAE features at the same layers when
cached SAEs exist): the top-10 units each method picks (the same selection rule: Dai et al.'s refined
set, then mean score), their overlap, the Spearman correlation of the mean scores, and the real test:
ΔP(answer) when each method's top-10 are suppressed. Also the time per fact of each method.

    python benchmarks/atp_agreement.py --layers 6,12,18,24                      # built-in facts
    python benchmarks/atp_agreement.py --facts ../shared/pararel --max-facts 60
    python benchmarks/atp_agreement.py --facts ../shared/pararel --max-facts 60 --layers 6,12 --ref-steps 40  # IG's own ceiling
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
    ap.add_argument("--methods", default="atp,atp-mid,atp-ig", help="shortcuts compared with IG")
    ap.add_argument("--ref-steps", type=int, default=0,
                    help="also run IG with this many steps: its top-k overlap with --steps IG is the ceiling AtP can be held to")
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
    methods = ("ig", *[m for m in args.methods.split(",") if m != "ig"]) + (("ig-ref",) if args.ref_steps else ())
    secs = {m: 0.0 for m in methods}
    rows = {name: {m: {"overlap": [], "rho": [], "dp": []} for m in methods} for name, _ in sets}
    for f in facts:
        tops, scores = {}, {}
        for m in methods:
            t = time.perf_counter()
            steps = args.ref_steps if m == "ig-ref" else args.steps
            atts = attribute_fact(lm, f, units, AttributionConfig(method=m.removesuffix("-ref"), steps=steps, top_k=args.k,
                                                                  shortlist=5 * args.k))
            secs[m] += time.perf_counter() - t
            tops[m] = [a.top[: args.k] for a in atts]
            scores[m] = [a.scores.mean(0) for a in atts]
        for j, (name, u) in enumerate(sets):
            for m in methods:
                rows[name][m]["dp"].append(fact_delta_prob(lm, f, u, tops[m][j], dcfg)["suppress"][args.k])
                rows[name][m]["overlap"].append(len(set(tops[m][j]) & set(tops["ig"][j])) / args.k)
                rows[name][m]["rho"].append(spearmanr(scores[m][j].numpy(), scores["ig"][j].numpy()).statistic)
    others = methods[1:]
    out = {"facts": args.facts or "built-in", "n_facts": len(facts), "k": args.k, "steps": args.steps, "ref_steps": args.ref_steps,
           "seconds_per_fact": {m: secs[m] / len(facts) for m in methods}, "sets": {}}
    name_of = {"ig-ref": f"IG{args.ref_steps}"}
    print(f"Attribution shortcuts vs IG ({args.steps} steps) on SmolLM2-135M, {len(facts)} facts ({out['facts']}), top-{args.k}")
    print(f"  time per fact, all {len(sets)} unit sets: " + ", ".join(f"{name_of.get(m, m)} {secs[m] / len(facts):.2f} s" for m in methods))
    head = "".join(f" {'overlap ' + name_of.get(m, m):>15}" for m in others) + "".join(f" {'rho ' + name_of.get(m, m):>11}" for m in others)
    head += "".join(f" {'ΔP ' + name_of.get(m, m):>10}" for m in methods) + "".join(f" {name_of.get(m, m) + '/IG':>10}" for m in others)
    print(f"  {'units':14}{head}")
    for name, _ in sets:
        r = rows[name]
        rec = {m: {"overlap": float(np.mean(r[m]["overlap"])), "rho": float(np.nanmean(r[m]["rho"])), "dp": float(np.mean(r[m]["dp"]))}
               for m in methods}
        for m in others:
            rec[m]["dp_ratio"] = rec[m]["dp"] / rec["ig"]["dp"]
        out["sets"][name] = rec
        print(f"  {name:14}" + "".join(f" {rec[m]['overlap']:15.2f}" for m in others) + "".join(f" {rec[m]['rho']:11.2f}" for m in others)
              + "".join(f" {rec[m]['dp']:+10.3f}" for m in methods) + "".join(f" {rec[m]['dp_ratio']:10.2f}" for m in others))
    if args.out:
        from kscope.io import write_json

        write_json(args.out, out)


if __name__ == "__main__":
    main()
