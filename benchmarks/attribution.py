"""Neuron attribution over all layers: kscope's IG and AtP vs the `knowledge-neurons` library's IG.

Same randomly initialised GPT-2-small-sized model (weights do not change the cost), same facts and
paraphrase prompts, same steps and layers, same site (the library attributes GPT-2's ``c_fc`` output,
kscope's ``mlp.pre``) and the same Riemann points (``linspace``). The library runs ``--batch-size``
steps per pass, one layer and one prompt at a time; kscope's IG runs all layers' steps in one pass per
prompt; kscope's AtP runs a fact's prompts as one batch (one forward, one backward). Each method runs
in its own subprocess (so peak memory is its own), alternating twice; the best time of each is used.
Each times its facts after one untimed warm-up fact, then counts the first fact's FLOPs with torch's
``FlopCounterMode`` (matmuls and attention), for achieved FLOP/s against this machine's best
square-matmul FLOP/s. Also: kscope on the default SmolLM2 model (neurons over all
layers; SAE features at layer 12 if an SAE is cached).

    pip install --no-deps knowledge-neurons einops   # einops comes with sae-lens already
    python benchmarks/attribution.py --facts 4 --prompts 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def facts(n: int, prompts: int):
    """The first ``n`` built-in facts with their first ``prompts`` paraphrases each."""
    from kscope.facts import builtin_facts

    return [(f.prompts[:prompts], f.object) for f in builtin_facts()[:n]]


def gpt2_dir(tmp: Path, n_layer: int) -> Path:
    """A random GPT-2-small-shaped model with the SmolLM2 tokenizer (no hub needed)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kscope.model.loading import resolve_model_path

    out = tmp / "gpt2-random"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=768, n_layer=n_layer, n_head=12,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def attributor(method: str, model, tok, steps: int, batch: int):
    """``fn(prompts, obj) -> scores [n_prompts, n_sets, n_units]`` for one method (a fact's prompts)."""
    L = model.config.num_hidden_layers
    if method == "library":
        from knowledge_neurons import KnowledgeNeurons

        kn = KnowledgeNeurons(model, tok, model_type="gpt2", device="cpu")
        return lambda prompts, obj: torch.stack([kn.get_scores(p, " " + obj, batch_size=batch, steps=steps, pbar=False)
                                                 for p in prompts])

    from kscope.facts import answer_token
    from kscope.locate.attribution import attribution_patching, integrated_gradients_many
    from kscope.model.prefix import PrefixRunner
    from kscope.model.sites import Site, site_dim
    from kscope.units.base import NeuronUnits

    kind = "mlp.pre" if method in ("kscope", "kscope-atp", "kscope-atp-mid") else "mlp.neurons"
    unit_sets = [NeuronUnits(Site(l, kind), site_dim(model, Site(l, kind))) for l in range(L)]
    if method == "kscope-features":
        from kscope.model.loading import wrap
        from kscope.units.provision import find_cached_sae
        from kscope.units.sae import feature_units, load_sae

        d = find_cached_sae(wrap(model, tok, "smollm2"), Site(12, "mlp.out"))
        if d is None:
            raise SystemExit("no cached SAE at 12/mlp.out for smollm2: run `kscope compare` or `kscope train-sae` first")
        unit_sets = [feature_units(model, load_sae(str(d)))]
    rule = "linspace" if method == "kscope" else "right"

    def fn(prompts, obj):
        target, _ = answer_token(tok, obj)
        ids = [tok(p).input_ids for p in prompts]
        if method.endswith("atp") or method == "kscope-atp-neurons":  # one batched pass for the fact's prompts
            return torch.stack([s for s, _ in attribution_patching(model, ids, unit_sets, target)], 1)
        if "atp-mid" in method:  # IG with one midpoint step: one forward and one backward per prompt
            return torch.stack([torch.stack([r[0] for r in integrated_gradients_many(PrefixRunner(model, i), unit_sets, target, 1, "midpoint")])
                                for i in ids])
        return torch.stack([torch.stack([r[0] for r in integrated_gradients_many(PrefixRunner(model, i), unit_sets, target, steps, rule)])
                            for i in ids])

    return fn


def worker(method: str, model_dir: str, n_facts: int, n_prompts: int, steps: int, batch: int) -> dict:
    """Time ``method`` on ``n_facts`` facts after one untimed warm-up fact; then count its FLOPs on the first fact."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.requires_grad_(False)
    fs = facts(n_facts, n_prompts)
    attribute = attributor(method, model, tok, steps, batch)
    base_rss = rss_mb()
    attribute(*fs[0])
    t0 = time.perf_counter()
    first_scores = [attribute(*f) for f in fs][0]
    secs = time.perf_counter() - t0
    peak = rss_mb()
    with FlopCounterMode(display=False) as counter:  # the first fact's prompts: FLOPs barely vary between facts
        attribute(*fs[0])
    return {"method": method, "seconds": secs, "facts_per_s": len(fs) / secs, "prompts_per_s": sum(len(p) for p, _ in fs) / secs,
            "peak_rss_mb": peak,
            "model_rss_mb": base_rss, "flops_per_prompt": counter.get_total_flops() / len(fs[0][0]), "first_scores": first_scores.flatten().tolist()}


def matmul_flops(sizes=(1024, 2048, 4096), reps: int = 5) -> float:
    """This machine's torch fp32 matmul FLOP/s: the best of square products of several sizes."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def run(method: str, model_dir: Path, args) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", method, "--model-dir", str(model_dir), "--facts", str(args.facts), "--prompts", str(args.prompts),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=5, help="paraphrases per fact (the built-in facts have 5)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20, help="the library's IG steps per pass")
    ap.add_argument("--layers", type=int, default=12, help="GPT-2 layers")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker")
    ap.add_argument("--model-dir")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.facts, args.prompts, args.steps, args.batch_size)))
        return
    from scipy.stats import spearmanr

    from kscope.model.loading import resolve_model_path

    peak = matmul_flops()
    with tempfile.TemporaryDirectory() as tmp:
        mdir = gpt2_dir(Path(tmp), args.layers)
        res: dict[str, list] = {"kscope": [], "library": [], "kscope-atp": [], "kscope-atp-mid": []}
        for _ in range(args.rounds):
            for m in res:
                res[m].append(run(m, mdir, args))
    best = {m: min(r, key=lambda x: x["seconds"]) for m, r in res.items()}
    k, lib, atp, mid = best["kscope"], best["library"], best["kscope-atp"], best["kscope-atp-mid"]
    rho = spearmanr(k["first_scores"], lib["first_scores"]).statistic
    rho_atp = spearmanr(atp["first_scores"], lib["first_scores"]).statistic
    rho_mid = spearmanr(mid["first_scores"], lib["first_scores"]).statistic
    smol = resolve_model_path("smollm2")
    s_n = run("kscope-neurons", Path(smol), args)
    s_a = run("kscope-atp-neurons", Path(smol), args)
    s_m = run("kscope-atp-mid-neurons", Path(smol), args)
    try:
        s_f = run("kscope-features", Path(smol), args)
    except SystemExit as e:
        s_f = {"prompts_per_s": float("nan"), "peak_rss_mb": float("nan"), "note": str(e)[:200]}
    print(f"Neuron attribution, all {args.layers} layers of a random GPT-2 (d=768), {args.facts} facts x {args.prompts} prompts, "
          f"IG {args.steps} steps, library batch {args.batch_size} (kscope IG: all layers' steps in one pass; AtP: a fact's prompts "
          f"in one pass), {torch.get_num_threads()} threads")
    for name, r in (("kscope IG", k), ("library", lib), ("kscope AtP", atp), ("atp-mid", mid)):
        rate = r["flops_per_prompt"] * r["prompts_per_s"]
        print(f"  {name:10} : {r['prompts_per_s']:7.3f} prompts/s ({r['seconds']:6.2f} s)  {r['prompts_per_s'] / lib['prompts_per_s']:6.1f}x the library  "
              f"{r['flops_per_prompt'] / 1e9:6.1f} GFLOP/prompt at {rate / 1e9:5.1f} GFLOP/s = {100 * rate / peak:3.0f}% of matmul peak "
              f"{peak / 1e9:.0f} GFLOP/s  peak RSS {r['peak_rss_mb']:.0f} MB (model loaded {r['model_rss_mb']:.0f} MB)")
    print(f"  score rank correlation with the library (first fact, all layers): kscope IG {rho:.4f}, AtP {rho_atp:.4f}, "
          f"atp-mid {rho_mid:.4f}")
    print(f"SmolLM2-135M, neurons of all 30 layers: IG {s_n['prompts_per_s']:.3f} prompts/s, {s_n['flops_per_prompt'] / 1e9:.1f} GFLOP/prompt "
          f"({s_n['flops_per_prompt'] * s_n['prompts_per_s'] / peak:.0%} of matmul peak, peak RSS {s_n['peak_rss_mb']:.0f} MB); "
          f"AtP {s_a['prompts_per_s']:.2f} prompts/s, {s_a['flops_per_prompt'] / 1e9:.2f} GFLOP/prompt "
          f"({s_a['prompts_per_s'] / s_n['prompts_per_s']:.0f}x IG, peak RSS {s_a['peak_rss_mb']:.0f} MB); "
          f"atp-mid {s_m['prompts_per_s']:.2f} prompts/s, {s_m['flops_per_prompt'] / 1e9:.2f} GFLOP/prompt "
          f"({s_m['prompts_per_s'] / s_n['prompts_per_s']:.0f}x IG); "
          f"SAE features at layer 12 (IG): {s_f['prompts_per_s']:.3f} prompts/s" + (f" ({s_f['note']})" if "note" in s_f else ""))

if __name__ == "__main__":
    main()
