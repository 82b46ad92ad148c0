"""The locate and compare jobs: attribute facts to neurons and SAE features, then measure ΔProb."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kscope.config import Config, nested, option, parse_layers
from kscope.errors import KscopeError
from kscope.facts import (Fact, FactConfig, asking, context_length, holdout_option, prepare_facts, resolve_targets, split_kind,
                          split_prompts, splittable)
from kscope.locate.attribution import AttributionConfig, attribute_fact
from kscope.locate.conditions import CONTROLLED, SetEffects, SetJob, SetSummary, measure_sets, summarize_effects
from kscope.locate.delta_prob import DeltaProbConfig
from kscope.locate.edits import EditConfig, collateral_panel
from kscope.model.loading import ModelConfig, load_model
from kscope.model.readout import fact_probs
from kscope.model.sites import Site, check_layer
from kscope.progress import make_progress
from kscope.parallel import ParallelConfig, fact_keys, fact_task, map_facts
from kscope.results import Result, decode, encode
from kscope.units.base import Units
from kscope.units.corpus import CorpusConfig
from kscope.units.means import apply_centres, edit_centres
from kscope.units.provision import BaselineConfig, SAEInfo, neuron_units, site_baselines, unit_sets_for_layers
from kscope.units.training import TrainSAEConfig


@dataclass
class StudyConfig(Config):
    """Locate facts in neurons and SAE features at some layers."""

    model: ModelConfig = nested(ModelConfig)
    facts: FactConfig = nested(FactConfig)
    layers: list[int] = option(help="Layers to study (one SAE per layer): 12, 10,12 or 10-14.", factory=lambda: [12], parse=parse_layers, min=0)
    feature_site: str = option("mlp.out", "Site kind of the SAE features.", flag="site", choices=("mlp.out", "resid.post", "mlp.neurons"), label="site kind")
    saes: list[str] = option(help="SAELens SAE directories, one per layer; default: train (and cache) one.", factory=list, flag="sae",
                              allow_empty=True, reads=True)
    sae_train: TrainSAEConfig = nested(TrainSAEConfig, prefix="sae-")
    corpus: CorpusConfig = nested(CorpusConfig)
    attribution: AttributionConfig = nested(AttributionConfig)
    parallel: ParallelConfig = nested(ParallelConfig)
    out: str = option("runs/locate.json", "Where to write the JSON results.", output="file")

    def validate(self) -> None:
        """Checks of the file system, before any model work."""
        if self.facts.facts is not None and not Path(self.facts.facts).exists():
            raise KscopeError(f"fact source {self.facts.facts} does not exist")
        for sae in self.saes:
            if not Path(sae).is_dir():
                raise KscopeError(f"SAE directory {sae} does not exist")
        self.check_writes()
        self.parallel.validate()


@dataclass
class LocateConfig(StudyConfig):
    """Top neurons and top SAE features of each known fact (or of one fact given here), with their IG scores."""

    features: bool = option(True, "Also attribute to SAE features.")
    subject: str | None = option(None, "A single fact: its subject.")
    relation: str = option("fact", "A single fact: its relation name.")
    object: str | None = option(None, "A single fact: its object (the answer).")
    prompts: list[str] | None = option(None, "A single fact: prompts ending right before the object (repeat for paraphrases).",
                                       flag="prompt")

    def single_fact(self) -> Fact | None:
        if not (self.subject or self.object or self.prompts):
            return None
        if not (self.subject and self.object and self.prompts):
            raise KscopeError("a single fact needs --subject, --object and at least one --prompt")
        if self.facts.facts:
            raise KscopeError("give either --facts or a single fact (--subject/--object/--prompt), not both")
        return Fact(self.subject, self.relation, self.object, list(self.prompts))


@dataclass
class CompareConfig(StudyConfig):
    """Neurons vs SAE features: locate each known fact with IG, then ΔProb of suppressing/enhancing its top-k units."""

    facts: FactConfig = nested(FactConfig, max_facts=60)
    holdout: bool = holdout_option()
    delta_prob: DeltaProbConfig = nested(DeltaProbConfig)
    edits: EditConfig = nested(EditConfig)
    baselines: BaselineConfig = nested(BaselineConfig)
    out: str = option("runs/compare.json", "Where to write the JSON results.", output="file")


@dataclass
class UnitScore:
    unit: int
    score: float
    freq: float


@dataclass
class LocatedUnits:
    """A fact's units of one kind at one layer: Dai et al.'s refined set, the top units, and (compare) the effects of
    editing the top-k, random and matched random units, and every unit."""

    units: str
    refined: list[int]
    top: list[UnitScore]
    p_clean: list[float]
    effects: SetEffects | None = None


@dataclass
class FactLocation:
    uid: str
    subject: str
    relation: str
    object: str
    target_token: str
    multi_token: bool
    prompts: list[str]  # the prompts ΔProb is measured on (p_clean is per prompt)
    layers: dict[int, dict[str, LocatedUnits]] = field(default_factory=dict)
    p_clean: list[float] | None = None
    selected_on: list[str] | None = None  # the prompts the units were chosen on (the same ones unless --holdout)


@dataclass
class UnitSummary:
    site: str
    n_units: int
    mean_refined: float
    effects: SetSummary | None = None  # over facts, CR2 intervals over relations


@dataclass
class CompareResult(Result):
    """Per fact and layer, the located units; per layer and unit kind, the summary over facts."""

    kind = "compare"
    # 4: CR2 intervals over relations (were the cluster bootstrap); 3: every set edited about its mean codes; edit sizes,
    # effect per size and collateral per condition
    version = 4

    model: str
    n_facts: int
    n_multi_token: int
    multi_token_note: str | None
    config: dict
    summary: dict[int, dict[str, UnitSummary]]
    facts: list[FactLocation]
    seconds: float
    saes: dict[int, SAEInfo] = field(default_factory=dict)
    kscope_version: str = ""
    failed: list[dict] = field(default_factory=list)  # facts that failed twice, with their errors
    workers: dict[str, dict] = field(default_factory=dict)  # facts and seconds per worker
    resumed: int = 0  # facts taken from the journal of an interrupted run
    split: str = ""  # how prompts were split between selection and measurement (facts.split_kind)


def _ranked(cfg: StudyConfig) -> int:
    """Units to rank per fact: enough for the report and for every k measured."""
    ks = cfg.delta_prob.ks if isinstance(cfg, CompareConfig) else []
    return max([cfg.attribution.top_k, *ks])


@dataclass
class _StudyContext:
    lm: object
    sets: list  # per layer: its unit sets (neurons first)
    cfg: StudyConfig
    pool: list[Fact] = field(default_factory=list)  # every fact's measurement view: the collateral panels' source


def _study_context(cfg: StudyConfig, sae_paths: dict[int, str], baselines: dict[int, list[Units]],
                   means: dict[str, object] | None = None, pool: list[Fact] | None = None) -> _StudyContext:
    """What a worker process needs per fact: the model and each layer's unit sets (SAEs loaded from their directories),
    each set's mean codes (the centre of its edits) and the collateral pool."""
    from kscope.units.sae import feature_units, load_sae

    lm = load_model(cfg.model)
    sets = [[neuron_units(lm, L)] + ([feature_units(lm.model, load_sae(sae_paths[L], cfg.model.device), Site(L, cfg.feature_site))]
                                     if L in sae_paths else []) + baselines.get(L, []) for L in cfg.layers]
    apply_centres([u for layer_sets in sets for u in layer_sets], means)
    return _StudyContext(lm, sets, cfg, pool or [])


def _study_fact(ctx: _StudyContext, fact: Fact) -> dict:
    """One fact: its located units at every layer (and the effects of editing them, for compare), as JSON data."""
    lm, cfg = ctx.lm, ctx.cfg
    measure = isinstance(cfg, CompareConfig)
    select, fact = split_prompts(fact, measure and cfg.holdout)  # ``fact`` keeps the prompts ΔProb is measured on
    row = FactLocation(fact.uid, fact.subject, fact.relation, fact.object, lm.tokenizer.decode([fact.target_id]),
                       fact.multi_token, fact.prompts, selected_on=select.prompts)
    if measure:
        row.p_clean = fact_probs(lm.model, lm.tokenizer, fact)[0].tolist()
    flat = [u for sets in ctx.sets for u in sets]
    atts = attribute_fact(lm, select, flat, cfg.attribution, _ranked(cfg))  # every layer in one pass per prompt
    located = []
    for units, att in zip(flat, atts):
        e = LocatedUnits(att.units, att.refined, [UnitScore(*t) for t in att.top_scores(cfg.attribution.top_k)], att.p_clean)
        row.layers.setdefault(units.site.layer, {})[units.kind] = e
        located.append(e)
    if measure:  # every condition of every unit set in shared passes
        jobs = [SetJob(u, att.top, controls=u.kind in CONTROLLED, key=f"{u.site.name}:{u.kind}") for u, att in zip(flat, atts)]
        panel = collateral_panel(fact, ctx.pool, cfg.edits.collateral, cfg.delta_prob.seed)
        for e, eff in zip(located, measure_sets(lm, fact, jobs, cfg.delta_prob, panel=panel)):
            e.effects = eff
    return encode(row)


def run_study(cfg: StudyConfig, facts: list[Fact] | None = None, lm=None) -> CompareResult:
    """Attribute every known fact at every layer; for a ``CompareConfig`` also ΔProb of the top-k units.
    The per-fact work runs here or on Ray workers (``cfg.parallel``), journaled so it can resume.

    Writes ``cfg.out`` only after everything succeeded.
    """
    from kscope import __version__

    cfg.validate()
    cfg.parallel.validate()
    measure = isinstance(cfg, CompareConfig)
    with_features = getattr(cfg, "features", True)
    t0 = time.time()
    loaded = cfg.facts.load() if facts is None else facts
    lm = lm or load_model(cfg.model)
    for layer in cfg.layers:
        check_layer(lm.model, layer)
    single = cfg.single_fact() if isinstance(cfg, LocateConfig) else None
    if single is not None:
        facts = resolve_targets(asking([single]), lm.tokenizer, "error" if cfg.facts.multi_token == "first" else cfg.facts.multi_token,
                                context=context_length(lm.model))
        if not facts:
            raise KscopeError(f"the fact {single.subject} -> {single.object} cannot be studied (see the note above)")
        loaded = facts
    tcfg = cfg.sae_train
    with make_progress() as progress:
        if facts is None:
            facts, loaded = prepare_facts(lm, cfg.facts, loaded, progress, measure and cfg.holdout)
        if measure and cfg.holdout:
            facts = splittable(facts)
        if with_features:
            pairs, infos = unit_sets_for_layers(lm, cfg.layers, cfg.feature_site, cfg.saes or None, tcfg, cfg.corpus,
                                                cfg.model.device, cfg.model.cache_dir, progress)
            sets = [list(p) for p in pairs]
        else:
            sets, infos = [[neuron_units(lm, L)] for L in cfg.layers], {}
        bases: dict[int, list[Units]] = {}
        if measure:
            got = site_baselines(lm, [Site(L, cfg.feature_site) for L in cfg.layers], cfg.baselines, cfg.corpus,
                                 tcfg.outlier_factor, cfg.model.cache_dir, progress)
            bases = {s.layer: units for s, units in got.items()}
            sets = [layer_sets + bases[layer_sets[0].site.layer] for layer_sets in sets]
        means, pool = {}, []
        if measure:
            flat = [u for layer_sets in sets for u in layer_sets]
            means = edit_centres(cfg.edits.ablate_to, lm, flat, cfg.baselines.fit_tokens, cfg.corpus, tcfg.outlier_factor,
                                 cfg.model.cache_dir, progress)
            pool = [split_prompts(f, cfg.holdout)[1] for f in facts]
        task = fact_task(cfg.parallel, _study_fact, _StudyContext(lm, sets, cfg, pool), _study_context,
                         (cfg, {L: i.path for L, i in infos.items()}, bases, means, pool))
        keys = fact_keys(facts)
        fp = {k: v for k, v in asdict(cfg).items() if k not in ("out", "parallel")} | {"facts": keys, "saes": {L: i.key or i.path for L, i in infos.items()}}
        outcome = map_facts(task, facts, keys, cfg.parallel, cfg.out, fp, progress)
    rows = [decode(FactLocation, r) for r in outcome.rows if r is not None]
    done = {r.uid for r in rows}
    facts = [f for f in facts if f.uid in done]
    if not rows:
        raise KscopeError(f"every fact failed: {outcome.failed[0]['error'] if outcome.failed else 'no facts'}")
    summary: dict[int, dict[str, UnitSummary]] = {}
    for layer_sets in sets:
        for units in layer_sets:
            L = units.site.layer
            located = [r.layers[L][units.kind] for r in rows]
            s = UnitSummary(units.site.name, units.n_units, sum(len(x.refined) for x in located) / len(located))
            if measure:
                s.effects = summarize_effects([x.effects for x in located], [r.relation for r in rows])
            summary.setdefault(L, {})[units.kind] = s
    n_multi = sum(f.multi_token for f in facts)
    result = CompareResult(
        model=lm.name, n_facts=len(facts), n_multi_token=n_multi,
        multi_token_note="objects of several tokens are scored by their first token" if n_multi else None,
        config=asdict(cfg), summary=summary, facts=rows, seconds=time.time() - t0, saes=infos, kscope_version=__version__,
        failed=outcome.failed, workers=outcome.per_worker, resumed=outcome.resumed,
        split=split_kind(facts, measure and cfg.holdout),
    )
    result.save(cfg.out)
    return result
