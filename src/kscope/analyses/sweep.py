"""``kscope sweep``: where do features beat neurons, and beat what else at their own site? Layers x sites, with
random and matched random controls, same-site baselines and Holm-adjusted verdicts.

For every layer and site (``mlp.out``, ``resid.post``): each known fact's top units are chosen by IG (kscope's
default; ``--method atp`` or ``atp-ig`` too) or by activation at the last token (the paper, as it is summarised),
for the layer's MLP neurons, the site's SAE features and the same-site baselines (the site's basis, PCA and random
directions). Their top-k are suppressed and enhanced, every set by one rule: about its units' corpus mean codes, where
IG starts too (``--ablate-to``, ``locate.edits``); features with the SAE error term kept, or with the site replaced by
the SAE reconstruction, then measured against the reconstruction alone (``locate.conditions``); beside random
units of each kind, random active units matched on contribution norm, and every unit suppressed. Units are chosen
on some of each fact's prompts and measured on the others (ParaRel: on disjoint templates of the relation;
``--no-holdout``: the same prompts, as the paper does). Cells, verdicts and statistics are in ``analyses.cells``,
interpretability and monosemanticity in ``analyses.quality``, the figure in ``analyses.sweep_plot``; each verdict judges
suppress and enhance apart (``analyses.verdicts``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from kscope.analyses.autointerp import InterpretConfig
from kscope.analyses.cells import Cell, adjust_tables, build_cell
from kscope.analyses.monosemanticity import orientation_note
from kscope.analyses.quality import QualityCell, interpretability, monosemanticity, quality_cells
from kscope.analyses.sweep_plot import plot_sweep
from kscope.config import MAX_EXPANSION, Config, nested, option, parse_layers
from kscope.errors import KscopeError
from kscope.facts import Fact, FactConfig, holdout_option, prepare_facts, split_kind, split_prompts, splittable
from kscope.outputs import journal_path
from kscope.locate.attribution import AttributionConfig, coarse_select, prompt_scores, rank_units, refine_select
from kscope.locate.conditions import CONTROLLED, SetEffects, SetJob, SetSummary, measure_sets, summarize_effects
from kscope.locate.delta_prob import DeltaProbConfig
from kscope.locate.edits import EditConfig, collateral_panel
from kscope.locate.objectives import fact_objective
from kscope.model.loading import ModelConfig, load_model
from kscope.model.readout import last_token_activations
from kscope.model.sites import Site, n_layers
from kscope.parallel import ParallelConfig, fact_keys, fact_task, map_facts
from kscope.progress import make_progress
from kscope.results import Result, decode, encode
from kscope.units.base import Units
from kscope.units.corpus import CorpusConfig
from kscope.units.means import apply_centres, edit_centres
from kscope.units.provision import BaselineConfig, SAEInfo, neuron_units, obtain_saes, site_baselines
from kscope.units.sae import check_release, feature_units, load_sae
from kscope.units.training import TrainSAEConfig

MEASURES = ("delta", "interpret", "monosemanticity")


@dataclass
class SweepConfig(Config):
    """Neurons vs SAE features vs same-site baselines across layers and sites: log P'/P of the top-k against random and
    matched random units, interpretability, monosemanticity, and Holm-adjusted verdicts per layer and site."""

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
                                      "replaced by the SAE's reconstruction, error dropped; effects measured against the "
                                      "reconstruction alone).", factory=lambda: ["error"],
                                 choices=("error", "reconstruction"), label="ablation protocol", unique=True)
    holdout: bool = holdout_option()
    tau: float = option(0.5, "Activation selection: eligible units fire at >= tau x the fact's strongest unit.", min=0.0, max=1.0)
    delta_prob: DeltaProbConfig = nested(DeltaProbConfig, hide=("ops", "positions", "seed"), random_draws=3, matched_draws=3)
    edits: EditConfig = nested(EditConfig)  # collateral: measured for the first selection protocol only
    baselines: BaselineConfig = nested(BaselineConfig)
    measures: list[str] = option(help="What to measure.", factory=lambda: list(MEASURES), choices=MEASURES, label="measure", unique=True)
    is_units: int = option(1, "Top units per fact whose interpretability score is taken (each distinct unit counted once).", min=1)
    mono_units: int = option(3, "Top units per fact tested for monosemanticity.", min=1)
    n_unrelated: int = option(24, "Unrelated prompts per fact (monosemanticity): its measured templates filled with other "
                                  "subjects of its relation.", min=1)
    widths: list[int] = option(help="SAE widths (x site width) for the width sweep at --width-layer; empty: none.", factory=list,
                               min=1, max=MAX_EXPANSION, unique=True, allow_empty=True)
    width_layer: int = option(12, "Layer of the width sweep.", min=0)
    sae_release: str | None = option(None, "SAELens pretrained release (e.g. gemma-scope-2b-pt-res-canonical); needs the hub.")
    sae_id: str = option("layer_{layer}/width_16k/canonical", "SAE id within the release; {layer} is filled in.")
    sae_dirs: str | None = option(None, "Local SAEs instead of training: a pattern with {layer} and {site}, e.g. saes/L{layer}-{site}.")
    sae_train: TrainSAEConfig = nested(TrainSAEConfig, prefix="sae-")
    corpus: CorpusConfig = nested(CorpusConfig)
    attribution: AttributionConfig = nested(AttributionConfig, steps=10)
    interpret: InterpretConfig = nested(InterpretConfig, prefix="is-", hide=("llm_url", "llm_model"))  # the token explainer only
    parallel: ParallelConfig = nested(ParallelConfig)
    seed: int = option(0, "Seed of the random controls and the samples.", flag="sweep-seed")
    out_dir: str = option("runs/sweep", "Directory for sweep.json and the figures.", output="dir")

    def validate(self) -> None:
        if self.facts.facts is not None and not Path(self.facts.facts).exists():
            raise KscopeError(f"fact source {self.facts.facts} does not exist")
        if self.sae_release and self.sae_dirs:
            raise KscopeError("give --sae-release or --sae-dirs, not both")
        if self.sae_release:
            check_release(self.sae_release)
        self.check_writes()
        self.parallel.validate()

    def written_inside(self) -> list[str]:
        return ["sweep.json", "sweep.png", journal_path("sweep.json").name]

    def reads(self) -> list[str]:
        dirs = [self.sae_dirs.format(layer=L, site=s) for L in self.layers for s in self.sites] if self.sae_dirs else []
        return super().reads() + dirs


@dataclass
class WidthPoint:
    """The site's top-k features (IG, error term kept) of an SAE of one width, with their controls."""

    site: str
    expansion: int
    n_features: int
    explained_variance: float | None
    effects: SetSummary


@dataclass
class SweepResult(Result):
    """Every layer x site x protocol cell, the quality cells, the width sweep, the SAEs used."""

    kind = "sweep"
    version = 4  # 4: the cells' marginal intervals are CR2 (were the cluster bootstrap)
    min_version = 3
    min_version_why = "verdicts on suppress and enhance combined and a cluster bootstrap (before issue 34); run the sweep again"

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
    split: str = ""  # how prompts were split between selection and measurement (facts.split_kind)
    n_relations: int = 0  # clusters of the intervals and verdicts
    orientation: str = ""  # which prompts orient each unit for monosemanticity
    per_fact: dict[str, dict[str, float | None]] = field(default_factory=dict)  # uid -> set name -> ΔP/P (``fact_effects``)


def set_name(units: Units) -> str:
    """``<layer>/<site kind>/<unit kind>``: a unit set's key in per-fact rows."""
    return f"{units.site.name}/{units.kind}"


def activation_ranking(acts: torch.Tensor, signed: bool, tau: float, k: int) -> list[int]:
    """Top ``k`` units by mean activation over a fact's prompts (``acts`` ``[n_prompts, n_units]``; ``signed`` units, such
    as neurons and baseline directions, by magnitude); units below ``tau`` x the strongest come last."""
    a = acts.float().mean(0)
    a = a.abs() if signed else a
    order = torch.argsort(a, descending=True).tolist()
    eligible = [i for i in order if a[i] >= tau * a[order[0]] and a[i] > 0]
    return (eligible + [i for i in order if i not in set(eligible)])[:k]


def _feature_sets(cfg: SweepConfig, lm, progress) -> tuple[list[Units], dict[str, SAEInfo]]:
    sites = [Site(L, s) for L in cfg.layers for s in cfg.sites]
    if cfg.sae_release:
        ids = {s: cfg.sae_id.format(layer=s.layer) for s in sites}
        return ([feature_units(lm.model, load_sae(cfg.sae_release, cfg.model.device, ids[s]), s) for s in sites],
                {s.name: SAEInfo(s.name, f"{cfg.sae_release}/{ids[s]}", "release") for s in sites})
    given = {s: cfg.sae_dirs.format(layer=s.layer, site=s.kind) for s in sites} if cfg.sae_dirs else None
    got = obtain_saes(lm, sites, cfg.sae_train, cfg.corpus, cfg.model.device, cfg.model.cache_dir, progress, given)
    return [feature_units(lm.model, got[s][0], s) for s in sites], {s.name: got[s][1] for s in sites}


def _rank(scores: torch.Tensor, acfg: AttributionConfig, k: int) -> list[int]:
    return rank_units(scores, refine_select(coarse_select(scores, acfg.coarse_threshold), acfg.refine_frac), k)


@dataclass
class _SweepContext:
    lm: object
    sets: list[Units]
    cfg: SweepConfig
    pool: list[Fact] = field(default_factory=list)  # every fact's measurement view: the collateral panels' source


def _sweep_context(cfg: SweepConfig, sae_paths: dict[str, str], baselines: list[Units], means: dict[str, object] | None = None,
                   pool: list[Fact] | None = None) -> _SweepContext:
    """A worker's model and unit sets (SAEs loaded from their directories or the release; the fitted baselines given),
    each set's mean codes (the centre of its edits, by ``Units.label``) and the collateral pool."""
    lm = load_model(cfg.model)
    feats = []
    for L in cfg.layers:
        for s in cfg.sites:
            site = Site(L, s)
            sae = load_sae(cfg.sae_release, cfg.model.device, cfg.sae_id.format(layer=L)) if cfg.sae_release else \
                load_sae(sae_paths[site.name], cfg.model.device)
            feats.append(feature_units(lm.model, sae, site))
    sets = [neuron_units(lm, L) for L in cfg.layers] + feats + list(baselines)
    apply_centres(sets, means)
    return _SweepContext(lm, sets, cfg, pool or [])


def _sweep_fact(ctx: _SweepContext, fact: Fact) -> dict:
    """One fact: its ranked units per set and protocol, and every condition of every set (one batch of passes)."""
    cfg, lm, sets = ctx.cfg, ctx.lm, ctx.sets
    n_rank = max(max(cfg.delta_prob.ks), cfg.mono_units, cfg.is_units)
    select, fact = split_prompts(fact, cfg.holdout)  # ``fact`` keeps only the prompts effects are measured on
    ranks: dict[str, list[list[int]]] = {}
    if "ig" in cfg.selection:
        a = cfg.attribution
        scores, _ = prompt_scores(lm, select.prompts, fact_objective(fact), sets, a.steps, a.batch_size, a.method, a.shortlist, a.max_memory)
        ranks["ig"] = [_rank(s, a, n_rank) for s in scores]
    if "activation" in cfg.selection:
        acts = last_token_activations(lm, sets, select.prompts)
        ranks["activation"] = [activation_ranking(a, u.signed, cfg.tau, n_rank) for a, u in zip(acts, sets)]
    effects: dict[str, dict] = {}
    if "delta" in cfg.measures:
        for proto, ranked in ranks.items():
            keys, jobs = [], []
            for mode in cfg.ablation:
                for u, top in zip(sets, ranked):
                    if mode == "error" or u.kind == "feature":  # the other sets have no error term: 'error' serves
                        keys.append(f"{proto}|{mode}|{set_name(u)}")
                        jobs.append(SetJob(u, top, mode, u.kind in CONTROLLED, set_name(u)))
            # collateral for the first protocol only: it repeats every top-k edit on the panel's prompts
            panel = collateral_panel(fact, ctx.pool, cfg.edits.collateral, cfg.seed) if proto == cfg.selection[0] else []
            effects |= {k: encode(e) for k, e in zip(keys, measure_sets(lm, fact, jobs, cfg.delta_prob, cfg.seed, panel=panel))}
    return {"ranks": ranks, "effects": effects}


def _cells(cfg: SweepConfig, rows: list[dict], clusters: list[str], baseline_kinds: list[str]) -> list[Cell]:
    """Every protocol x layer x site cell from the per-fact rows, Holm-adjusted per verdict table."""
    def col(proto, mode, name):
        return [decode(SetEffects, r["effects"][f"{proto}|{mode}|{name}"]) for r in rows]

    cells = []
    for proto in rows[0]["ranks"]:
        for mode in cfg.ablation:
            for L in cfg.layers:
                neurons = col(proto, "error", f"{L}/mlp.neurons/neuron")
                for site in cfg.sites:
                    units = {"neuron": neurons, "feature": col(proto, mode, f"{L}/{site}/feature")}
                    units.update({k: col(proto, "error", f"{L}/{site}/{k}") for k in baseline_kinds})
                    cells.append(build_cell(L, site, proto, mode, units, clusters, cfg.delta_prob.ks))
    adjust_tables(cells)
    return cells


def fact_effects(cfg: SweepConfig, facts: list[Fact], rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per fact uid, ``set_name`` -> ΔP/P (``rel``) on its measured prompts with the set's top units (largest k)
    suppressed, for the first selection protocol and the error ablation (what every set but features has): the fact
    page's heat map (``app.explorer.sweep_per_fact``). None where ΔP/P is undefined."""
    k = max(cfg.delta_prob.ks)
    prefix = f"{cfg.selection[0]}|{'error' if 'error' in cfg.ablation else cfg.ablation[0]}|"
    out: dict[str, dict[str, float | None]] = {}
    for f, r in zip(facts, rows):
        got = {}
        for key, enc in r["effects"].items():
            if key.startswith(prefix):
                v = decode(SetEffects, enc).top["suppress"][k].rel
                got[key[len(prefix):]] = None if v is None or v != v else float(v)
        if got:
            out[f.uid] = got
    return out


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """The sweep; writes ``<out_dir>/sweep.json`` and its figures. The per-fact work (ranking, effects) runs here
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
        facts, _ = prepare_facts(lm, cfg.facts, loaded, progress, cfg.holdout)
        if cfg.holdout:
            facts = splittable(facts)
        t = time.time()
        feats, infos = _feature_sets(cfg, lm, progress)
        seconds["saes"] = time.time() - t
        t = time.time()
        got = site_baselines(lm, [Site(L, s) for L in cfg.layers for s in cfg.sites], cfg.baselines, cfg.corpus,
                             cfg.sae_train.outlier_factor, cfg.model.cache_dir, progress)
        baselines = [u for units in got.values() for u in units]
        seconds["baselines"] = time.time() - t
        sets = [neuron_units(lm, L) for L in cfg.layers] + feats + baselines
        t = time.time()
        means = edit_centres(cfg.edits.ablate_to, lm, sets, cfg.baselines.fit_tokens, cfg.corpus, cfg.sae_train.outlier_factor,
                             cfg.model.cache_dir, progress)
        seconds["means"] = time.time() - t
        pool = [split_prompts(f, cfg.holdout)[1] for f in facts]
        t = time.time()
        task = fact_task(cfg.parallel, _sweep_fact, _SweepContext(lm, sets, cfg, pool), _sweep_context,
                         (cfg, {n: i.path for n, i in infos.items()}, baselines, means, pool))
        keys = fact_keys(facts)
        fp = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "parallel")} | {"facts": keys,
                                                                                          "saes": {n: i.key or i.path for n, i in infos.items()}}
        outcome = map_facts(task, facts, keys, cfg.parallel, Path(cfg.out_dir) / "sweep.json", fp, progress, "facts (ranking, effects)")
        kept = [i for i, r in enumerate(outcome.rows) if r is not None]
        facts = [facts[i] for i in kept]
        rows = [outcome.rows[i] for i in kept]
        if not rows:
            raise KscopeError(f"every fact failed: {outcome.failed[0]['error'] if outcome.failed else 'no facts'}")
        seconds["per_fact"] = time.time() - t
        clusters = [f.relation for f in facts]
        cells = _cells(cfg, rows, clusters, list(cfg.baselines.baselines)) if "delta" in cfg.measures else []
        t = time.time()
        quality = _quality(cfg, lm, facts, sets, rows, clusters, progress)
        seconds["quality"] = time.time() - t
        t = time.time()
        widths = _width_sweep(cfg, lm, facts, clusters, progress) if cfg.widths else []
        seconds["widths"] = time.time() - t
    seconds["total"] = time.time() - t0
    result = SweepResult(lm.name, len(facts), cfg.facts.facts or "built-in", list(cfg.layers), list(cfg.sites), cells, quality, widths,
                         infos, asdict(cfg), seconds, __version__, outcome.failed, outcome.per_worker, outcome.resumed,
                         split_kind(facts, cfg.holdout), len(set(clusters)), orientation_note(cfg.holdout),
                         fact_effects(cfg, facts, rows))
    out = Path(cfg.out_dir)
    plot_sweep(result, out / "sweep.png")
    result.save(out / "sweep.json")
    return result


def _quality(cfg: SweepConfig, lm, facts: list[Fact], sets: list[Units], rows: list[dict], clusters: list[str],
             progress) -> list[QualityCell]:
    """Interpretability and monosemanticity of the top neurons and features (IG's ranking if it ran)."""
    if not {"interpret", "monosemanticity"} & set(cfg.measures):
        return []
    proto = "ig" if "ig" in rows[0]["ranks"] else "activation"
    idx = [s for s, u in enumerate(sets) if u.kind in CONTROLLED]
    qsets = [sets[s] for s in idx]
    ranks = [[r["ranks"][proto][s] for s in idx] for r in rows]
    is_scores = aurocs = None
    if "interpret" in cfg.measures:
        is_scores = interpretability(lm, qsets, ranks, cfg.is_units, cfg.interpret, cfg.corpus, cfg.model.cache_dir, progress,
                                     [f.uid for f in facts])
    if "monosemanticity" in cfg.measures and len(facts) > 1:
        views = [split_prompts(f, cfg.holdout) for f in facts]
        aurocs = monosemanticity(lm, qsets, [m for _, m in views], [s for s, _ in views], ranks, cfg.mono_units, cfg.n_unrelated,
                                 cfg.seed, progress)
    index = {set_name(u): j for j, u in enumerate(qsets)}
    return quality_cells(cfg.layers, cfg.sites, index, is_scores, aurocs, clusters)


def _width_sweep(cfg: SweepConfig, lm, facts: list[Fact], clusters: list[str], progress) -> list[WidthPoint]:
    """At ``width_layer``: SAEs of each width per site (trained together per width), IG-selected top-k features and
    their effects (error term kept), beside random and matched random features and every feature suppressed."""
    out = []
    L = cfg.width_layer
    for exp in cfg.widths:
        tcfg = replace(cfg.sae_train, expansion=exp)
        sites = [Site(L, s) for s in cfg.sites]
        got = obtain_saes(lm, sites, tcfg, cfg.corpus, cfg.model.device, cfg.model.cache_dir, progress)
        units = [feature_units(lm.model, got[s][0], s) for s in sites]
        edit_centres(cfg.edits.ablate_to, lm, units, cfg.baselines.fit_tokens, cfg.corpus, cfg.sae_train.outlier_factor,
                     cfg.model.cache_dir, progress)  # the same edit rule as every cell
        rows: list[list[SetEffects]] = [[] for _ in sites]
        for f in facts:
            select, f = split_prompts(f, cfg.holdout)
            a = cfg.attribution
            scores, _ = prompt_scores(lm, select.prompts, fact_objective(f), units, a.steps, a.batch_size, a.method, a.shortlist)
            jobs = [SetJob(u, _rank(sc, a, max(cfg.delta_prob.ks)), key=f"width{exp}:{set_name(u)}") for u, sc in zip(units, scores)]
            for j, e in enumerate(measure_sets(lm, f, jobs, cfg.delta_prob, cfg.seed)):
                rows[j].append(e)
        for j, s in enumerate(sites):
            stats = got[s][1].stats or {}
            out.append(WidthPoint(s.kind, exp, units[j].n_units, stats.get("explained_variance"),
                                  summarize_effects(rows[j], clusters)))
    return out
