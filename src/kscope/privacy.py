"""The privacy jobs: ``build`` (make PrivacyParaRel and inject it) and ``erase`` (locate privacy units,
apply each editor, measure Rel / Gen / Loc / ΔPPL / exposure, restore)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from kscope.attribution import coarse_select, prompt_scores, rank_units, refine_select
from kscope.prefix import continuation_nlls
from kscope.editors import RuntimeFeatureEdit, WeightEdit, depn_mask, feature_edit_mask
from kscope.errors import KscopeError
from kscope.facts import Fact, FactConfig, filter_known, load_facts, resolve_targets
from kscope.inject import check_new_dir, facts_from_manifest, finetune, greedy_matches, memorised, read_manifest, save_model_dir
from kscope.io import write_json
from kscope.models import ModelConfig, load_model
from kscope.pipeline import CorpusConfig, cached_generation, sae_corpus, unit_sets_for_layers
from kscope.privacy_data import NUMBER_LIKE, PrivacyConfig, build_private_facts
from kscope.privacy_metrics import erased_fraction, exposure, perplexity, relative_ppl_change, unchanged_fraction
from kscope.progress import make_progress
from kscope.sae import TrainSAEConfig
from kscope.scoring import PromptBatch, last_logits
from kscope.sites import check_layer, down_proj_weight
from kscope.units import Units

METHODS = ("feature-edit", "depn", "kn-erase", "runtime-feature")


def build(model_cfg: ModelConfig, cfg: PrivacyConfig, out_dir: str) -> dict:
    """Make the private facts, fine-tune them into the model, save to ``out_dir`` with a manifest."""
    check_new_dir(out_dir)  # before the fine-tune, not after it
    facts = build_private_facts(cfg)
    t0 = time.time()
    lm = load_model(model_cfg)
    with make_progress() as progress:
        losses = finetune(lm, facts, cfg, progress)
    mem = memorised(lm, facts)
    n_top1 = sum(r["top1_edit"] >= 0.5 for r in mem)
    n_exact = sum(r["exact_edit"] >= 0.5 for r in mem)
    manifest = {
        "base_model": model_cfg.model,
        "config": asdict(cfg),
        "facts": [f.to_dict() for f in facts],
        "memorised": mem,
        "summary": {"n_facts": len(facts), "memorised_top1": n_top1, "memorised_exact": n_exact,
                    "losses": losses, "seconds": time.time() - t0},
    }
    save_model_dir(lm, out_dir, manifest)
    return manifest


@dataclass
class EraseConfig:
    """Locate privacy units and compare erasure methods at matched budgets."""

    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Editors to compare."})
    layer: int = field(default=12, metadata={"help": "Layer whose neurons / SAE features are edited."})
    feature_site: str = field(default="mlp.out", metadata={"help": "SAE site kind (its decoder must live in the down projection's output space)."})
    sae: str | None = field(default=None, metadata={"help": "SAE directory; default: the base model's cached/trained SAE."})
    n_erase: int | None = field(default=None, metadata={"help": "Private facts to erase (default: half of the memorised ones; the rest test locality)."})
    neurons: int = field(default=20, metadata={"help": "Edit budget in neurons; weight budget = neurons x d_model for every weight editor."})
    features: int = field(default=10, metadata={"help": "Features located for FeatureEdit / runtime edit."})
    steps: int = field(default=10, metadata={"help": "IG steps."})
    depn_threshold: float = field(default=0.1, metadata={"help": "DEPN: per-prompt selection at >= t x max score."})
    unrelated: str | None = field(default=None, metadata={"help": "ParaRel dir / fact file for locality (default: built-in facts)."})
    max_unrelated: int = field(default=40, metadata={"help": "Known unrelated facts for locality."})
    ppl_texts: int = field(default=24, metadata={"help": "Generated held-out texts for perplexity."})

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise KscopeError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
        if self.neurons < 1 or self.features < 1:
            raise KscopeError("budgets must be >= 1")


def _ig_matrices(lm, facts: Sequence[Fact], unit_sets: Sequence[Units], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Per unit set, IG scores ``[n_prompts, n_units]`` over all edit prompts of ``facts``, and each row's fact index."""
    per_fact = [prompt_scores(lm, f.prompts, f.target_id, unit_sets, steps)[0] for f in facts]
    owner = [i for i, f in enumerate(facts) for _ in f.prompts]
    return [torch.cat([m[j] for m in per_fact]) for j in range(len(unit_sets))], owner


def depn_select(scores: torch.Tensor, threshold: float, n: int) -> list[int]:
    """DEPN aggregator: units selected (>= t x max) on the most prompts, ties by mean score; top ``n``."""
    sel = coarse_select(scores, threshold).float()
    freq, mean = sel.mean(0), scores.mean(0)
    order = sorted(range(scores.shape[1]), key=lambda i: (-float(freq[i]), -float(mean[i])))
    return [i for i in order if freq[i] > 0][:n] or order[:n]


def kn_select(scores: torch.Tensor, owner: Sequence[int], n: int, t: float = 0.2, p: float = 0.5) -> list[int]:
    """Dai et al.: refined neurons of each fact (coarse t, shared by >= p of its prompts), pooled and
    ranked by mean score; filled up to ``n`` with each fact's next-best units."""
    owner_t = torch.as_tensor(owner)
    per_fact = []
    for i in sorted(set(owner)):
        s = scores[owner_t == i]
        per_fact.append(rank_units(s, refine_select(coarse_select(s, t), p), n))
    out: list[int] = []
    for depth in range(n):
        for ranked in per_fact:
            if depth < len(ranked) and ranked[depth] not in out:
                out.append(ranked[depth])
    return out[:n]


def _produced(lm, facts: Sequence[Fact], which: str) -> list[list[bool]]:
    return [greedy_matches(lm, getattr(f, which), f.object) for f in facts]


@torch.no_grad()
def _top1(lm, facts: Sequence[Fact]) -> list[int]:
    """Top-1 next token after every prompt of ``facts``."""
    prompts = [p for f in facts for p in f.prompts]
    preds: list[int] = []
    for s in range(0, len(prompts), 32):
        b = PromptBatch.from_texts(lm.tokenizer, prompts[s : s + 32], lm.device)
        preds.extend(last_logits(lm.model, b).argmax(-1).tolist())
    return preds


@torch.no_grad()
def _ppl(lm, texts: Sequence[str]) -> float:
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([lm.tokenizer(t).input_ids[:64]], device=lm.device)
        if ids.shape[1] < 2:
            continue
        out = lm.model(input_ids=ids, labels=ids, use_cache=False)
        nll += float(out.loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return perplexity(nll, n)


@torch.no_grad()
def _exposures(lm, facts: Sequence[Fact]) -> list[float]:
    """Exposure of number-like secrets ``555-0ddd`` among all 900 candidates of that format."""
    out = []
    cands = [f"555-0{d}" for d in range(100, 1000)]
    for f in facts:
        if f.relation not in NUMBER_LIKE:
            continue
        prompt = f.prompts[0]
        rows = [lm.tokenizer(prompt + " " + c).input_ids for c in cands]
        nlls = continuation_nlls(lm.model, len(lm.tokenizer(prompt).input_ids), rows)
        out.append(exposure(nlls[cands.index(f.object)], nlls))
    return out


def _observe(lm, erase: Sequence[Fact], keep: Sequence[Fact], unrelated: Sequence[Fact], ppl_texts) -> dict:
    """What the editors are judged on, for the model as it is now."""
    return {"rel": _produced(lm, erase, "prompts"), "gen": _produced(lm, erase, "heldout_prompts"),
            "top1_unrelated": _top1(lm, unrelated), "top1_keep": _top1(lm, keep), "ppl": _ppl(lm, ppl_texts),
            "exposure": _exposures(lm, erase)}


def _compare(base: dict, now: dict) -> dict:
    """Rel / Gen / Loc / ΔPPL / exposure of observations ``now`` against the unedited ``base``."""
    loc_pararel = unchanged_fraction(base["top1_unrelated"], now["top1_unrelated"])
    loc_private = unchanged_fraction(base["top1_keep"], now["top1_keep"])
    exp = now["exposure"]
    return {"rel": erased_fraction(base["rel"], now["rel"]), "gen": erased_fraction(base["gen"], now["gen"]),
            "loc_pararel": loc_pararel, "loc_private": loc_private,
            "loc": float(np.nanmean([loc_pararel, loc_private])), "ppl": now["ppl"],
            "delta_ppl": relative_ppl_change(base["ppl"], now["ppl"]), "exposure": float(np.mean(exp)) if exp else None}


def erase(model_dir: str, cfg: EraseConfig, out: str, device: str = "cpu", cache_dir: str | None = None,
          tcfg: TrainSAEConfig | None = None) -> dict:
    """Compare the editors on a privacy model made by ``build``. Writes ``out`` (JSON); never changes ``model_dir``."""
    cfg.validate()
    manifest = read_manifest(model_dir)
    t0 = time.time()
    lm = load_model(ModelConfig(model=model_dir, device=device, cache_dir=cache_dir))
    check_layer(lm.model, cfg.layer)
    private = resolve_targets(facts_from_manifest(manifest), lm.tokenizer, "first")
    mem = {r["uid"]: r for r in manifest["memorised"]}
    known = [f for f in private if mem.get(f.uid, {}).get("exact_edit", 0) >= 0.5]
    if not known:
        raise KscopeError("no memorised private facts in this model (exact greedy match on >= half the edit prompts); "
                          "build with more --epochs or a higher --lr")
    n_erase = cfg.n_erase or max(1, len(known) // 2)
    erase_set, keep = known[:n_erase], known[n_erase:]
    base_lm_name = manifest.get("base_model", "smollm2")
    with make_progress() as progress:
        unrelated = filter_known(lm, load_facts(cfg.unrelated), FactConfig(max_facts=cfg.max_unrelated, min_known_prompts=1))
        tcfg = tcfg or TrainSAEConfig()
        base_lm = None
        if cfg.sae is None:  # SAE of the base model (trained once, cached); the fine-tune barely moves activations
            base_lm = load_model(ModelConfig(model=base_lm_name, device=device, cache_dir=cache_dir))
            base_lm.name = base_lm_name
        src = base_lm or lm
        (neurons, feats), = unit_sets_for_layers(
            src, [cfg.layer], cfg.feature_site, [cfg.sae] if cfg.sae else None, tcfg,
            lambda: sae_corpus(src, private, tcfg, CorpusConfig(), progress), device, cache_dir, progress)
        ppl_texts = cached_generation(src, TrainSAEConfig(generate=cfg.ppl_texts, seed=1234), progress, cache_dir)
        del base_lm  # neuron units depend only on the site's shape, shared by base and fine-tuned model
        (n_scores, f_scores), n_owner = _ig_matrices(lm, erase_set, [neurons, feats], cfg.steps)
        W = down_proj_weight(lm.model, cfg.layer)
        budget = cfg.neurons * W.shape[0]
        chosen_feats = depn_select(f_scores, cfg.depn_threshold, cfg.features)
        located = {
            "depn": depn_select(n_scores, cfg.depn_threshold, cfg.neurons),
            "kn-erase": kn_select(n_scores, n_owner, cfg.neurons),
            "feature-edit": chosen_feats,
            "runtime-feature": chosen_feats,
        }
        base = _observe(lm, erase_set, keep, unrelated, ppl_texts)
        clean_state = down_proj_weight(lm.model, cfg.layer).clone()
        rows = {"none": {**_compare(base, base), "units": [], "n_weights": 0}}
        task = progress.add_task("editors", total=len(cfg.methods))
        for m in cfg.methods:
            if m == "runtime-feature":
                editor = RuntimeFeatureEdit(feats, located[m])
                n_w = 0
            else:
                mask = depn_mask(W, located[m]) if m in ("depn", "kn-erase") else feature_edit_mask(W, feats.decoder[located[m]].detach(), budget=budget)
                editor = WeightEdit(m, cfg.layer, mask, located[m])
                n_w = editor.n_weights
            with editor.applied(lm.model):
                row = _compare(base, _observe(lm, erase_set, keep, unrelated, ppl_texts))
            if not torch.equal(down_proj_weight(lm.model, cfg.layer), clean_state):
                raise RuntimeError(f"{m}: restore was not exact")
            rows[m] = {**row, "units": [int(u) for u in located[m]], "n_weights": n_w}
            progress.advance(task)
    result = {
        "model_dir": str(model_dir), "base_model": base_lm_name, "layer": cfg.layer, "config": asdict(cfg),
        "n_erased": len(erase_set), "n_kept_private": len(keep), "n_unrelated": len(unrelated),
        "weight_budget": budget, "methods": rows, "seconds": time.time() - t0,
    }
    write_json(out, result)
    return result
