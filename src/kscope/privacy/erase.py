"""``privacy erase``: locate privacy units, apply each editor, measure Rel / Gen / Loc / ΔPPL / exposure, restore."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from kscope.config import Config, nested, option, require
from kscope.errors import KscopeError
from kscope.facts import Fact, FactConfig, filter_known, load_facts, resolve_targets
from kscope.io import check_writable
from kscope.locate.attribution import prompt_scores
from kscope.model.loading import ModelConfig, load_model
from kscope.model.prefix import continuation_nlls
from kscope.model.readout import PromptBatch, last_logits
from kscope.model.sites import check_layer, down_proj_weight
from kscope.privacy.dataset import NUMBER_LIKE
from kscope.privacy.editors import RuntimeFeatureEdit, WeightEdit, depn_mask, feature_edit_mask
from kscope.privacy.inject import greedy_matches, read_manifest
from kscope.privacy.metrics import erased_fraction, exposure, perplexity, relative_ppl_change, unchanged_fraction
from kscope.privacy.select import depn_select, kn_select
from kscope.progress import make_progress
from kscope.results import Result
from kscope.units.base import Units
from kscope.units.corpus import CorpusConfig, cached_generation, sae_corpus
from kscope.units.provision import unit_sets_for_layers
from kscope.units.training import TrainSAEConfig

METHODS = ("feature-edit", "depn", "kn-erase", "runtime-feature")


@dataclass
class EraseConfig(Config):
    """Locate privacy units and compare erasure methods at matched budgets."""

    methods: list[str] = option(help="Editors to compare.", factory=lambda: list(METHODS), flag="method", choices=METHODS, label="method")
    layer: int = option(12, "Layer whose neurons / SAE features are edited.", min=0)
    feature_site: str = option("mlp.out", "SAE site kind (its decoder must live in the down projection's output space).", flag="site",
                               choices=("mlp.out",), label="site kind")
    sae: str | None = option(None, "SAE directory; default: the base model's cached/trained SAE.")
    n_erase: int | None = option(None, "Private facts to erase (default: half of the memorised ones; the rest test locality).", min=1)
    neurons: int = option(20, "Edit budget in neurons; weight budget = neurons x d_model for every weight editor.", min=1)
    features: int = option(10, "Features located for FeatureEdit / runtime edit.", min=1)
    steps: int = option(10, "IG steps.", min=1)
    depn_threshold: float = option(0.1, "DEPN: per-prompt selection at >= t x max score.", min=0.0, max=1.0)
    unrelated: str | None = option(None, "ParaRel dir / fact file for locality (default: built-in facts).")
    max_unrelated: int = option(40, "Known unrelated facts for locality.", min=1)
    ppl_texts: int = option(24, "Generated held-out texts for perplexity.", min=1)


@dataclass
class EraseJob(Config):
    """Locate privacy neurons/features and compare erasure editors: Rel, Gen, Loc, ΔPPL, exposure at matched budgets."""

    model_dir: str | None = option(help="A directory made by `kscope privacy build`.", required=True)
    erase: EraseConfig = nested(EraseConfig)
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1 ...")
    cache_dir: str | None = option(None, "Cache for the default model and SAEs (default $KSCOPE_CACHE or ~/.cache/kscope).")
    sae_train: TrainSAEConfig = nested(TrainSAEConfig, prefix="sae-")
    out: str = option("runs/privacy.json", "JSON results.")


@dataclass
class MethodRow:
    rel: float | None
    gen: float | None
    loc_pararel: float | None
    loc_private: float | None
    loc: float | None
    ppl: float
    delta_ppl: float
    exposure: float | None
    units: list[int]
    n_weights: int


@dataclass
class EraseResult(Result):
    """Each editor's Rel / Gen / Loc / ΔPPL / exposure on a privacy model."""

    kind = "privacy-erase"

    model_dir: str
    base_model: str
    layer: int
    config: dict
    n_erased: int
    n_kept_private: int
    n_unrelated: int
    weight_budget: int
    methods: dict[str, MethodRow]
    seconds: float


def _ig_matrices(lm, facts: Sequence[Fact], unit_sets: Sequence[Units], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Per unit set, IG scores ``[n_prompts, n_units]`` over all edit prompts of ``facts``, and each row's fact index."""
    per_fact = [prompt_scores(lm, f.prompts, f.target_id, unit_sets, steps)[0] for f in facts]
    owner = [i for i, f in enumerate(facts) for _ in f.prompts]
    return [torch.cat([m[j] for m in per_fact]) for j in range(len(unit_sets))], owner


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


def erase(job: EraseJob) -> EraseResult:
    """Compare the editors on a privacy model made by ``build``. Writes ``job.out`` (JSON); never changes the model dir."""
    cfg, model_dir, device, cache_dir, tcfg, out = job.erase, job.model_dir, job.device, job.cache_dir, job.sae_train, job.out
    require(model_dir, "--model-dir")
    check_writable(out, inputs=[model_dir])
    manifest = read_manifest(model_dir)
    t0 = time.time()
    lm = load_model(ModelConfig(model=model_dir, device=device, cache_dir=cache_dir))
    check_layer(lm.model, cfg.layer)
    private = resolve_targets(manifest.private_facts(), lm.tokenizer, "first")
    mem = {r.uid: r.exact_edit for r in manifest.memorised}
    known = [f for f in private if mem.get(f.uid, 0) >= 0.5]
    if not known:
        raise KscopeError("no memorised private facts in this model (exact greedy match on >= half the edit prompts); "
                          "build with more --epochs or a higher --lr")
    n_erase = cfg.n_erase or max(1, len(known) // 2)
    erase_set, keep = known[:n_erase], known[n_erase:]
    base_lm_name = manifest.base_model
    with make_progress() as progress:
        unrelated = filter_known(lm, load_facts(cfg.unrelated), FactConfig(max_facts=cfg.max_unrelated, min_known_prompts=1))
        base_lm = None
        if cfg.sae is None:  # SAE of the base model (trained once, cached); the fine-tune barely moves activations
            base_lm = load_model(ModelConfig(model=base_lm_name, device=device, cache_dir=cache_dir))
            base_lm.name = base_lm_name
        src = base_lm or lm
        ((neurons, feats),), _ = unit_sets_for_layers(
            src, [cfg.layer], cfg.feature_site, [cfg.sae] if cfg.sae else None, tcfg,
            lambda: sae_corpus(src, private, tcfg, CorpusConfig(), progress), device, cache_dir, progress)
        ppl_texts = cached_generation(src, cfg.ppl_texts, 64, 1234, progress, cache_dir)
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
        rows = {"none": MethodRow(**_compare(base, base), units=[], n_weights=0)}
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
            rows[m] = MethodRow(**row, units=[int(u) for u in located[m]], n_weights=n_w)
            progress.advance(task)
    result = EraseResult(str(model_dir), base_lm_name, cfg.layer, asdict(cfg), len(erase_set), len(keep), len(unrelated),
                         budget, rows, time.time() - t0)
    result.save(out)
    return result
