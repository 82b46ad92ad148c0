"""``kscope sweep``: where do features beat neurons? Layers x sites, with random controls and paired verdicts.

For every layer and site (``mlp.out``, ``resid.post``): each known fact's top units are chosen by IG
(kscope's default; ``--method atp`` or ``atp-ig`` too) or by activation at the last token (the
paper, as it is summarised); their ΔProb under suppression / enhancement is measured with the SAE
error term kept (kscope's default) or with the site replaced by the SAE reconstruction (the paper's
protocol, as summarised); random units of each kind at the same k are the control, every unit of the
kind suppressed the positive control. Units are chosen on half of each fact's paraphrases and measured on
the other half (``--no-holdout``: on the same ones, as the paper does). Per fact the
paired difference features − neurons gives a verdict per cell: features better, neurons better, or
no difference (95 % interval of the mean difference excludes 0 or not). The top units' sign-oriented
interpretability score and their monosemanticity AUROC are compared the same way. A width sweep at
one layer trains SAEs of several widths.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from kscope.analyses.autointerp import InterpretConfig, TokenExplainer, interpretability_score, record_many
from kscope.analyses.monosemanticity import auroc
from kscope.config import Config, nested, option, parse_layers
from kscope.errors import KscopeError
from kscope.facts import Fact, FactConfig, holdout_option, prepare_facts, split_prompts, splittable
from kscope.io import check_writable
from kscope.locate.attribution import AttributionConfig, coarse_select, prompt_scores, rank_units, refine_select
from kscope.locate.objectives import fact_objective
from kscope.model.hooks import hooked
from kscope.model.loading import ModelConfig, load_model
from kscope.model.prefix import PrefixRunner
from kscope.model.readout import last_token_activations
from kscope.model.sites import Site, n_layers
from kscope.parallel import ParallelConfig, fact_keys, fact_task, map_facts
from kscope.plots import pyplot, save_figure
from kscope.progress import make_progress
from kscope.results import Result
from kscope.stats import Interval, mean_ci, paired_test, relative_change
from kscope.units.base import Units, enhance, suppress
from kscope.units.corpus import CorpusConfig, build_corpus
from kscope.units.provision import SAEInfo, neuron_units, obtain_saes
from kscope.units.sae import check_release, feature_units, load_sae
from kscope.units.training import TrainSAEConfig

MEASURES = ("delta", "interpret", "monosemanticity")


@dataclass
class SweepConfig(Config):
    """Neurons vs SAE features across layers and sites: ΔProb against random units, interpretability, monosemanticity,
    and a paired verdict per layer and site."""

    model: ModelConfig = nested(ModelConfig)
    facts: FactConfig = nested(FactConfig, max_facts=60)
    layers: list[int] = option(help="Layers: 0-27:3 (every third), 10-14, 12 ...", factory=lambda: list(range(0, 28, 3)),
                               parse=parse_layers, min=0)
    sites: list[str] = option(help="Feature sites.", factory=lambda: ["mlp.out", "resid.post"], choices=("mlp.out", "resid.post"),
                              label="site kind", unique=True)
    selection: list[str] = option(help="How each fact's top units are chosen: 'ig' (attribution, --method) and/or 'activation' "
                                       "(largest activation at the last token, >= --tau x the fact's max).", factory=lambda: ["ig"],
                                  choices=("ig", "activation"), label="selection protocol", unique=True)
    ablation: list[str] = option(help="How features are ablated: 'error' (SAE error term kept) and/or 'reconstruction' (the site "
                                      "replaced by the SAE's reconstruction, error dropped).", factory=lambda: ["error"],
                                 choices=("error", "reconstruction"), label="ablation protocol", unique=True)
    holdout: bool = holdout_option()
    tau: float = option(0.5, "Activation selection: eligible units fire at >= tau x the fact's strongest unit.", min=0.0, max=1.0)
    ks: list[int] = option(help="Numbers of top units intervened on.", factory=lambda: [1, 5, 10], min=1, unique=True)
    random_draws: int = option(3, "Random unit sets of each size per fact (the control).", min=1)
    measures: list[str] = option(help="What to measure.", factory=lambda: list(MEASURES), choices=MEASURES, label="measure", unique=True)
    is_units: int = option(1, "Top units per fact whose interpretability score is taken.", min=1)
    mono_units: int = option(3, "Top units per fact tested for monosemanticity.", min=1)
    n_unrelated: int = option(24, "Unrelated prompts per fact (monosemanticity).", min=1)
    widths: list[int] = option(help="SAE widths (x site width) for the width sweep at --width-layer; empty: none.", factory=list,
                               min=1, unique=True, allow_empty=True)
    width_layer: int = option(12, "Layer of the width sweep.", min=0)
    sae_release: str | None = option(None, "SAELens pretrained release (e.g. gemma-scope-2b-pt-res-canonical); needs the hub.")
    sae_id: str = option("layer_{layer}/width_16k/canonical", "SAE id within the release; {layer} is filled in.")
    sae_dirs: str | None = option(None, "Local SAEs instead of training: a pattern with {layer} and {site}, e.g. saes/L{layer}-{site}.")
    sae_train: TrainSAEConfig = nested(TrainSAEConfig, prefix="sae-")
    corpus: CorpusConfig = nested(CorpusConfig)
    attribution: AttributionConfig = nested(AttributionConfig, steps=10)
    interpret: InterpretConfig = nested(InterpretConfig, prefix="is-", hide=("llm_url", "llm_model"))  # the token explainer only
    parallel: ParallelConfig = nested(ParallelConfig)
    seed: int = option(0, "Seed of the random controls and samples.", flag="sweep-seed")
    out_dir: str = option("runs/sweep", "Directory for sweep.json and the figures.", output="dir")

    def validate(self) -> None:
        if self.facts.facts is not None and not Path(self.facts.facts).exists():
            raise KscopeError(f"fact source {self.facts.facts} does not exist")
        if self.sae_release and self.sae_dirs:
            raise KscopeError("give --sae-release or --sae-dirs, not both")
        if self.sae_release:
            check_release(self.sae_release)
        check_writable(self.out_dir, self.reads(), directory=True, writes=["sweep.json", "sweep.png"])

    def reads(self) -> list[str]:
        dirs = [self.sae_dirs.format(layer=L, site=s) for L in self.layers for s in self.sites] if self.sae_dirs else []
        return super().reads() + dirs


@dataclass
class KindStats:
    """One unit kind in one cell: ΔProb (mean over facts, 95 % CI) per op and k."""

    delta: dict[str, dict[int, Interval]] = field(default_factory=dict)


@dataclass
class Verdict:
    """Paired comparison over facts of two kinds: the mean difference (a - b) with its interval, and what it says."""

    diff: Interval
    t_p: float | None
    wilcoxon_p: float | None
    says: str  # "features better", "neurons better", "no difference"


@dataclass
class Cell:
    """One layer x site x protocol: neurons, features, random units of each kind; verdicts."""

    layer: int
    site: str
    selection: str
    ablation: str
    neuron: KindStats
    feature: KindStats
    random_neuron: KindStats
    random_feature: KindStats
    verdicts: dict[str, dict[int, Verdict]] = field(default_factory=dict)  # op -> k -> features vs neurons
    vs_random: dict[str, dict[str, dict[int, Verdict]]] = field(default_factory=dict)  # kind -> op -> k -> top vs random
    recon_only: Interval | None = None  # ΔProb of the reconstruction with nothing suppressed
    all_neuron: Interval | None = None  # positive control: every neuron of the layer suppressed
    all_feature: Interval | None = None  # positive control: every feature suppressed (under this cell's ablation)


@dataclass
class QualityCell:
    """Interpretability score and monosemanticity AUROC of the top units of one layer x site."""

    layer: int
    site: str
    is_neuron: Interval | None = None
    is_feature: Interval | None = None
    is_verdict: Verdict | None = None
    auroc_neuron: Interval | None = None
    auroc_feature: Interval | None = None
    auroc_verdict: Verdict | None = None


@dataclass
class WidthPoint:
    site: str
    expansion: int
    n_features: int
    explained_variance: float | None
    delta: dict[str, dict[int, Interval]]
    random_delta: dict[str, dict[int, Interval]] | None = None  # random features of this SAE at the same k
    all_delta: Interval | None = None  # positive control: every feature suppressed


@dataclass
class SweepResult(Result):
    """Every layer x site x protocol cell, the quality cells, the width sweep, the SAEs used."""

    kind = "sweep"

    model: str
    n_facts: int
    facts: str
    layers: list[int]
    sites: list[str]
    cells: list[Cell]
    quality: list[QualityCell]
    widths: list[WidthPoint]
    saes: dict[str, SAEInfo]
    config: dict
    seconds: dict[str, float]
    kscope_version: str = ""
    failed: list[dict] = field(default_factory=list)
    workers: dict[str, dict] = field(default_factory=dict)
    resumed: int = 0


def verdict(feat: Sequence[float], neur: Sequence[float], higher_is_better: bool, names=("features", "neurons")) -> Verdict:
    """Paired verdict from per-fact values of two kinds: better when the 95 % interval of the mean difference excludes 0."""
    t = paired_test(feat, neur)
    d = t["diff"]
    says = "no difference"
    if d.lo is not None and d.hi is not None and d.lo == d.lo:
        if (d.lo > 0) == higher_is_better and (d.lo > 0 or d.hi < 0):
            says = f"{names[0]} better"
        elif d.lo > 0 or d.hi < 0:
            says = f"{names[1]} better"
    nan = lambda v: None if v != v else v  # noqa: E731
    return Verdict(d, nan(t["t_p"]), nan(t["wilcoxon_p"]), says)


def _edit(units: Units, op: Callable, mode: str):
    """A site edit: ``op`` on the unit activations, error term kept (``error``) or dropped (``reconstruction``)."""
    if mode == "error":
        return units.edit_fn(op)
    return lambda x: units.decode(op(units.encode(x))).to(x.dtype)


def _rowwise(units: Units, ops: Sequence[Callable], mode: str, n: int):
    """An edit that applies ``ops[i]`` to rows ``[i n, (i + 1) n)``: many conditions in one batched forward."""
    fns = [_edit(units, op, mode) for op in ops]

    def edit(x):
        return torch.cat([fn(x[i * n : (i + 1) * n]) for i, fn in enumerate(fns)])

    return edit


@torch.no_grad()
def condition_probs(lm, fact: Fact, units: Units, ops: Sequence[Callable], mode: str) -> np.ndarray:
    """``P(answer)`` ``[n_ops, n_prompts]`` with each op applied at the positions the answer is read from (the
    prompt's last token on); one prefix run per prompt, all conditions as rows of one pass."""
    obj = fact_objective(fact)
    out = np.zeros((len(ops), len(fact.prompts)))
    for j, prompt in enumerate(fact.prompts):
        runner = PrefixRunner(lm.model, lm.tokenizer(prompt).input_ids)
        with hooked(lm.model, {units.site: _rowwise(units, ops, mode, 1)}):
            logits = runner.logits(len(ops), obj.continuation)
        v = obj.value(logits.view(len(ops), obj.length, -1))
        out[:, j] = (v if obj.kind == "prob" else v.exp()).float().cpu().numpy()
    return out


def activation_ranking(acts: torch.Tensor, neurons: bool, tau: float, k: int) -> list[int]:
    """Top ``k`` units by mean activation over a fact's prompts (``acts`` ``[n_prompts, n_units]``; neurons by
    magnitude, they fire with either sign); units below ``tau`` x the strongest come last."""
    a = acts.float().mean(0)
    a = a.abs() if neurons else a
    order = torch.argsort(a, descending=True).tolist()
    eligible = [i for i in order if a[i] >= tau * a[order[0]] and a[i] > 0]
    return (eligible + [i for i in order if i not in set(eligible)])[:k]


def _sets(cfg: SweepConfig, lm, progress) -> tuple[dict[int, Units], dict[tuple[int, str], Units], dict[str, SAEInfo]]:
    neurons = {L: neuron_units(lm, L) for L in cfg.layers}
    sites = [Site(L, s) for L in cfg.layers for s in cfg.sites]
    feats, infos = {}, {}
    if cfg.sae_release:
        for site in sites:
            sae = load_sae(cfg.sae_release, cfg.model.device, cfg.sae_id.format(layer=site.layer))
            feats[(site.layer, site.kind)] = feature_units(lm.model, sae, site)
            infos[site.name] = SAEInfo(site.name, f"{cfg.sae_release}/{cfg.sae_id.format(layer=site.layer)}", "release")
        return neurons, feats, infos
    given = {s: cfg.sae_dirs.format(layer=s.layer, site=s.kind) for s in sites} if cfg.sae_dirs else None
    got = obtain_saes(lm, sites, cfg.sae_train, cfg.corpus, cfg.model.device, cfg.model.cache_dir, progress, given)
    for site in sites:
        feats[(site.layer, site.kind)] = feature_units(lm.model, got[site][0], site)
        infos[site.name] = got[site][1]
    return neurons, feats, infos


def _rank(scores: torch.Tensor, acfg: AttributionConfig, k: int) -> list[int]:
    return rank_units(scores, refine_select(coarse_select(scores, acfg.coarse_threshold), acfg.refine_frac), k)


@dataclass
class _SweepContext:
    lm: object
    set_list: list  # (name, units)
    cfg: "SweepConfig"


def _sweep_context(cfg: "SweepConfig", sae_paths: dict[str, str]) -> _SweepContext:
    """A worker's model and unit sets (SAEs loaded from their directories, or the release)."""
    lm = load_model(cfg.model)
    set_list = [(f"{L}/neurons", neuron_units(lm, L)) for L in cfg.layers]
    for L in cfg.layers:
        for s in cfg.sites:
            site = Site(L, s)
            sae = load_sae(cfg.sae_release, cfg.model.device, cfg.sae_id.format(layer=L)) if cfg.sae_release else \
                load_sae(sae_paths[site.name], cfg.model.device)
            set_list.append((f"{L}/{s}", feature_units(lm.model, sae, site)))
    return _SweepContext(lm, set_list, cfg)


def _key(c: tuple) -> str:
    return "|".join(map(str, c))


def _sweep_fact(ctx: _SweepContext, fact: Fact) -> dict:
    """One fact: its ranked units per set and protocol, and every ΔProb condition (random controls seeded by the fact)."""
    cfg, lm, set_list = ctx.cfg, ctx.lm, ctx.set_list
    units_only = [u for _, u in set_list]
    n_rank = max(max(cfg.ks), cfg.mono_units, cfg.is_units)
    select, fact = split_prompts(fact, cfg.holdout)  # ``fact`` keeps only the prompts ΔProb is measured on
    ranks: dict[str, list[list[int]]] = {}
    if "ig" in cfg.selection:
        scores, _ = prompt_scores(lm, select.prompts, fact_objective(fact), units_only, cfg.attribution.steps, cfg.attribution.batch_size,
                                  cfg.attribution.method, cfg.attribution.shortlist, cfg.attribution.max_memory)
        ranks["ig"] = [_rank(s, cfg.attribution, n_rank) for s in scores]
    if "activation" in cfg.selection:
        acts = last_token_activations(lm, units_only, select.prompts)
        ranks["activation"] = [activation_ranking(a, u.kind == "neuron", cfg.tau, n_rank) for a, u in zip(acts, units_only)]
    delta: dict[str, dict[str, float]] = {}
    if "delta" in cfg.measures:
        rng = random.Random(f"{cfg.seed}:{fact.uid}")
        clean = condition_probs(lm, fact, units_only[0], [lambda v: v], "error")[0]
        for proto in ranks:
            for mode in cfg.ablation:
                for s, (name, u) in enumerate(set_list):
                    if mode == "reconstruction" and u.kind == "neuron":
                        continue  # neurons have no reconstruction: the 'error' numbers serve
                    delta[f"{proto}|{mode}|{name}"] = _measure(lm, fact, u, ranks[proto][s], cfg, rng, mode, clean)
    return {"ranks": ranks, "delta": delta}


def _conds(ks: Sequence[int]) -> list[tuple[str, int]]:
    """The ΔProb conditions: suppress and enhance at every k."""
    return [(op, k) for op in ("suppress", "enhance") for k in ks]


def _measure(lm, fact: Fact, u: Units, top: Sequence[int], cfg: SweepConfig, rng: random.Random, mode: str,
             clean: np.ndarray) -> dict[str, float]:
    """ΔProb of one unit set on one fact, as JSON keys: the top-k ops, the mean of ``cfg.random_draws`` random sets per
    op and k (the control), every unit suppressed (``all``, the positive control) and, under reconstruction
    ablation, the reconstruction alone (``recon``). All conditions are rows of one batched pass per prompt."""
    conds = _conds(cfg.ks)
    ops = [suppress(top[:k]) if op == "suppress" else enhance(top[:k]) for op, k in conds]
    draws = [(op, rng.sample(range(u.n_units), k)) for _ in range(cfg.random_draws) for op, k in conds]
    ops += [suppress(r) if op == "suppress" else enhance(r) for op, r in draws]
    ops.append(suppress(range(u.n_units)))
    if mode == "reconstruction":
        ops.append(lambda v: v)
    rel = relative_change(condition_probs(lm, fact, u, ops, mode), clean[None]).mean(1)
    n = len(conds)
    row = {_key(c): float(rel[j]) for j, c in enumerate(conds)}
    row.update({_key(("random",) + c): float(np.mean([rel[n + d * n + j] for d in range(cfg.random_draws)])) for j, c in enumerate(conds)})
    row["all"] = float(rel[n + cfg.random_draws * n])
    if mode == "reconstruction":
        row["recon"] = float(rel[-1])
    return row


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """The sweep; writes ``<out_dir>/sweep.json`` and its figures. The per-fact work (ranking, ΔProb) runs here
    or on Ray workers; interpretability and monosemanticity of the chosen units run here."""
    from kscope import __version__

    cfg.validate()
    cfg.parallel.validate()
    t0 = time.time()
    seconds: dict[str, float] = {}
    loaded = cfg.facts.load()
    lm = load_model(cfg.model)
    bad = [L for L in [*cfg.layers, *([cfg.width_layer] if cfg.widths else [])] if L >= n_layers(lm.model)]
    if bad:
        raise KscopeError(f"unknown layer {bad[0]}: the model has layers 0..{n_layers(lm.model) - 1}")
    with make_progress() as progress:
        facts, _ = prepare_facts(lm, cfg.facts, loaded, progress)
        if cfg.holdout:
            facts = splittable(facts)
        t = time.time()
        neurons, feats, infos = _sets(cfg, lm, progress)
        seconds["saes"] = time.time() - t
        set_list: list[tuple[str, Units]] = [(f"{L}/neurons", u) for L, u in neurons.items()] + \
                                            [(f"{L}/{s}", u) for (L, s), u in feats.items()]
        t = time.time()
        task = fact_task(cfg.parallel, _sweep_fact, _SweepContext(lm, set_list, cfg), _sweep_context,
                         (cfg, {n: i.path for n, i in infos.items()}))
        keys = fact_keys(facts)
        fp = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "parallel")} | {"facts": keys,
                                                                                          "saes": {n: i.key or i.path for n, i in infos.items()}}
        outcome = map_facts(task, facts, keys, cfg.parallel, Path(cfg.out_dir) / "sweep.json", fp, progress, "facts (ranking, ΔProb)")
        kept = [i for i, r in enumerate(outcome.rows) if r is not None]
        facts = [facts[i] for i in kept]
        rows = [outcome.rows[i] for i in kept]
        if not rows:
            raise KscopeError(f"every fact failed: {outcome.failed[0]['error'] if outcome.failed else 'no facts'}")
        seconds["per_fact"] = time.time() - t
        protos = list(rows[0]["ranks"])
        ranks = {p: [r["ranks"][p] for r in rows] for p in protos}
        cells: list[Cell] = []
        if "delta" in cfg.measures:
            for proto in protos:
                for mode in cfg.ablation:
                    for L in cfg.layers:
                        nrows = [_unkey(r["delta"][f"{proto}|error|{L}/neurons"]) for r in rows]
                        for site in cfg.sites:
                            frows = [_unkey(r["delta"][f"{proto}|{mode}|{L}/{site}"]) for r in rows]
                            cells.append(_cell(L, site, proto, mode, nrows, frows, cfg.ks))
        t = time.time()
        quality: list[QualityCell] = []
        if {"interpret", "monosemanticity"} & set(cfg.measures):
            measured = [split_prompts(f, cfg.holdout)[1] for f in facts]
            prompts = [p for f in measured for p in f.prompts]
            owner = [i for i, f in enumerate(measured) for _ in f.prompts]
            last_acts = last_token_activations(lm, [u for _, u in set_list], prompts, progress) if "monosemanticity" in cfg.measures else None
            quality = _quality(cfg, lm, facts, set_list, ranks["ig" if "ig" in ranks else "activation"], last_acts, owner, progress,
                               random.Random(cfg.seed))
        seconds["quality"] = time.time() - t
        t = time.time()
        widths = _width_sweep(cfg, lm, facts, progress) if cfg.widths else []
        seconds["widths"] = time.time() - t
    seconds["total"] = time.time() - t0
    result = SweepResult(lm.name, len(facts), cfg.facts.facts or "built-in", list(cfg.layers), list(cfg.sites), cells, quality, widths,
                         infos, asdict(cfg), seconds, __version__, outcome.failed, outcome.per_worker, outcome.resumed)
    out = Path(cfg.out_dir)
    plot_sweep(result, out / "sweep.png")
    result.save(out / "sweep.json")
    return result


def _unkey(row: dict) -> dict:
    """JSON keys back to the tuples ``_cell`` reads: ``suppress|5`` -> ``("suppress", 5)``, ``random|suppress|5`` too."""
    out = {}
    for k, v in row.items():
        if k in ("recon", "all"):
            out[k] = v
            continue
        parts = k.split("|")
        out[tuple(parts[:-1]) + (int(parts[-1]),)] = v
    return out


def _interval_dict(rows: list[dict], conds) -> dict[str, dict[int, Interval]]:
    out: dict[str, dict[int, Interval]] = {}
    for op, k in conds:
        out.setdefault(op, {})[k] = mean_ci([r[(op, k)] for r in rows])
    return out


def _random_rows(rows: list[dict], conds) -> list[dict]:
    """Each row's random-control values under the keys ``_interval_dict`` reads."""
    return [{c: r[("random",) + c] for c in conds} for r in rows]


def _cell(L: int, site: str, proto: str, mode: str, nrows: list[dict], frows: list[dict], ks: Sequence[int]) -> Cell:
    conds = _conds(ks)
    rand = lambda rows: _random_rows(rows, conds)  # noqa: E731
    cell = Cell(L, site, proto, mode, KindStats(_interval_dict(nrows, conds)), KindStats(_interval_dict(frows, conds)),
                KindStats(_interval_dict(rand(nrows), conds)), KindStats(_interval_dict(rand(frows), conds)))
    for op, k in conds:
        stronger = op == "enhance"  # suppress: more negative moves the answer more; enhance: more positive
        f, n = [r[(op, k)] for r in frows], [r[(op, k)] for r in nrows]
        cell.verdicts.setdefault(op, {})[k] = verdict(f if stronger else [-v for v in f], n if stronger else [-v for v in n], True)
        for kind, rows in (("feature", frows), ("neuron", nrows)):
            top, rnd = [r[(op, k)] for r in rows], [r[("random", op, k)] for r in rows]
            s = 1 if stronger else -1
            cell.vs_random.setdefault(kind, {}).setdefault(op, {})[k] = verdict([s * v for v in top], [s * v for v in rnd], True,
                                                                                ("top units", "random units"))
    if mode == "reconstruction":
        cell.recon_only = mean_ci([r["recon"] for r in frows])
    if all("all" in r for r in nrows + frows):
        cell.all_neuron, cell.all_feature = mean_ci([r["all"] for r in nrows]), mean_ci([r["all"] for r in frows])
    return cell


def _quality(cfg, lm, facts, set_list, ranks, last_acts, owner, progress, rng) -> list[QualityCell]:
    out = []
    by_name = {name: s for s, (name, _) in enumerate(set_list)}
    is_scores: dict[int, list[float]] = {}
    if "interpret" in cfg.measures:
        _, texts = build_corpus(lm, cfg.corpus, progress, cfg.model.cache_dir).split()  # held-out texts: no SAE saw them
        picks = [list(dict.fromkeys(u for i in range(len(facts)) for u in ranks[i][s][: cfg.is_units])) for s in range(len(set_list))]
        records = record_many(lm, [(u, picks[s]) for s, (_, u) in enumerate(set_list)], texts, cfg.interpret, progress)
        task = progress.add_task("interpretability", total=len(set_list))
        for s, rec in enumerate(records):
            col = {u: c for c, u in enumerate(picks[s])}
            score = {u: interpretability_score(rec, c, TokenExplainer(cfg.interpret.explanation_tokens), cfg.interpret)["score"]
                     for u, c in col.items()}
            is_scores[s] = [float(np.mean([score[u] for u in ranks[i][s][: cfg.is_units]])) for i in range(len(facts))]
            progress.advance(task)
    au: dict[int, list[float]] = {}
    if "monosemanticity" in cfg.measures and len(facts) > 1:
        owner_t = torch.as_tensor(owner)
        for s in range(len(set_list)):
            vals = []
            for i, f in enumerate(facts):
                others = [j for j, o in enumerate(owner) if facts[o].object != f.object and facts[o].subject != f.subject]
                if not others:
                    vals.append(float("nan"))
                    continue
                unrel = rng.sample(others, min(cfg.n_unrelated, len(others)))
                rel = torch.nonzero(owner_t == i).flatten().tolist()
                a = last_acts[s]
                per_unit = []
                for u in ranks[i][s][: cfg.mono_units]:
                    r, n = a[rel, u].float().numpy(), a[unrel, u].float().numpy()
                    sign = -1.0 if r.mean() < 0 else 1.0
                    per_unit.append(auroc(sign * r, sign * n))
                vals.append(float(np.mean(per_unit)))
            au[s] = vals
    for L in cfg.layers:
        ns = by_name[f"{L}/neurons"]
        for site in cfg.sites:
            fs = by_name[f"{L}/{site}"]
            q = QualityCell(L, site)
            if is_scores:
                q.is_neuron, q.is_feature = mean_ci(is_scores[ns]), mean_ci(is_scores[fs])
                q.is_verdict = verdict(is_scores[fs], is_scores[ns], True)
            if au:
                q.auroc_neuron, q.auroc_feature = mean_ci(au[ns]), mean_ci(au[fs])
                q.auroc_verdict = verdict(au[fs], au[ns], True)
            out.append(q)
    return out


def _width_sweep(cfg: SweepConfig, lm, facts, progress) -> list[WidthPoint]:
    """At ``width_layer``: SAEs of each width per site (trained together per width), IG-selected top-k features,
    ΔProb of suppressing / enhancing them (error term kept), beside random features and every feature suppressed."""
    from dataclasses import replace

    out = []
    L = cfg.width_layer
    for exp in cfg.widths:
        tcfg = replace(cfg.sae_train, expansion=exp)
        sites = [Site(L, s) for s in cfg.sites]
        got = obtain_saes(lm, sites, tcfg, cfg.corpus, cfg.model.device, cfg.model.cache_dir, progress)
        units = [feature_units(lm.model, got[s][0], s) for s in sites]
        conds = _conds(cfg.ks)
        rows: list[list[dict]] = [[] for _ in sites]
        for f in facts:
            select, f = split_prompts(f, cfg.holdout)
            rng = random.Random(f"{cfg.seed}:width{exp}:{f.uid}")
            scores, _ = prompt_scores(lm, select.prompts, fact_objective(f), units, cfg.attribution.steps, cfg.attribution.batch_size,
                                      cfg.attribution.method, cfg.attribution.shortlist)
            for j, u in enumerate(units):
                top = _rank(scores[j], cfg.attribution, max(cfg.ks))
                clean = condition_probs(lm, f, u, [lambda v: v], "error")[0]
                rows[j].append(_unkey(_measure(lm, f, u, top, cfg, rng, "error", clean)))
        for j, s in enumerate(sites):
            stats = got[s][1].stats or {}
            out.append(WidthPoint(s.kind, exp, units[j].n_units, stats.get("explained_variance"), _interval_dict(rows[j], conds),
                                  _interval_dict(_random_rows(rows[j], conds), conds), mean_ci([r["all"] for r in rows[j]])))
    return out


def plot_sweep(result: SweepResult, path) -> None:
    """Each measure against layer: one line per unit kind and site, 95 % bands; random units dashed or dotted, every
    unit suppressed (the positive control) dash-dotted."""
    plt = pyplot()
    cells = [c for c in result.cells if c.selection == result.config["selection"][0] and c.ablation == "error"]
    k = max(result.config["ks"])
    panels = [("suppress", f"ΔP(answer), top-{k} suppressed"), ("enhance", f"ΔP(answer), top-{k} enhanced")]
    n_extra = (1 if any(q.is_feature for q in result.quality) else 0) + (1 if any(q.auroc_feature for q in result.quality) else 0)
    fig, axes = plt.subplots(1, len(panels) + n_extra + (1 if result.widths else 0), figsize=(5 * (len(panels) + n_extra + 1), 4),
                             squeeze=False)
    axes = axes[0]
    colors = {"neuron": "#e6550d", "mlp.out": "#3182bd", "resid.post": "#31a354"}

    def line(ax, xs, ivs, color, label, style="-"):
        m = [iv.mean if iv and iv.mean is not None else np.nan for iv in ivs]
        lo = [iv.lo if iv and iv.lo is not None else np.nan for iv in ivs]
        hi = [iv.hi if iv and iv.hi is not None else np.nan for iv in ivs]
        ax.plot(xs, m, style, marker="o", color=color, label=label, ms=3)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.12)

    for ax, (op, title) in zip(axes, panels):
        site0 = result.sites[0]
        nc = sorted((c for c in cells if c.site == site0), key=lambda c: c.layer)
        xs = [c.layer for c in nc]
        line(ax, xs, [c.neuron.delta[op][k] for c in nc], colors["neuron"], "neurons")
        line(ax, xs, [c.random_neuron.delta[op][k] for c in nc], colors["neuron"], "random neurons", "--")
        if op == "suppress" and all(c.all_neuron for c in nc):  # the positive control
            line(ax, xs, [c.all_neuron for c in nc], colors["neuron"], "all neurons", "-.")
        for site in result.sites:
            sc = sorted((c for c in cells if c.site == site), key=lambda c: c.layer)
            line(ax, [c.layer for c in sc], [c.feature.delta[op][k] for c in sc], colors.get(site, "k"), f"features {site}")
            line(ax, [c.layer for c in sc], [c.random_feature.delta[op][k] for c in sc], colors.get(site, "k"), f"random {site}", ":")
            if op == "suppress" and all(c.all_feature for c in sc):
                line(ax, [c.layer for c in sc], [c.all_feature for c in sc], colors.get(site, "k"), f"all {site}", "-.")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("layer")
        ax.set_title(title)
    axes[0].legend(fontsize=6)
    i = len(panels)
    for attr, title in (("is", "interpretability score"), ("auroc", "monosemanticity AUROC")):
        qs = [q for q in result.quality if getattr(q, f"{attr}_feature") is not None]
        if not qs:
            continue
        ax = axes[i]
        i += 1
        site0 = result.sites[0]
        q0 = sorted((q for q in qs if q.site == site0), key=lambda q: q.layer)
        line(ax, [q.layer for q in q0], [getattr(q, f"{attr}_neuron") for q in q0], colors["neuron"], "neurons")
        for site in result.sites:
            qq = sorted((q for q in qs if q.site == site), key=lambda q: q.layer)
            line(ax, [q.layer for q in qq], [getattr(q, f"{attr}_feature") for q in qq], colors.get(site, "k"), f"features {site}")
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.legend(fontsize=6)
    if result.widths:
        ax = axes[i]
        for site in result.sites:
            pts = sorted((w for w in result.widths if w.site == site), key=lambda w: w.expansion)
            line(ax, [w.expansion for w in pts], [w.delta["suppress"][k] for w in pts], colors.get(site, "k"), f"features {site}")
            if all(w.random_delta for w in pts):
                line(ax, [w.expansion for w in pts], [w.random_delta["suppress"][k] for w in pts], colors.get(site, "k"),
                     f"random {site}", ":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("SAE width (x site width)")
        ax.set_title(f"top-{k} suppressed vs width, layer {result.config['width_layer']}")
        ax.legend(fontsize=6)
    fig.suptitle(f"{result.model}: neurons vs features, {result.n_facts} facts ({result.facts})")
    save_figure(fig, path)
