"""What the one-layer analyses share: their config, the setup (model, known facts, neurons and SAE
features, each fact's top units) and how a job writes its JSON and figure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from kscope.config import Config, nested, option
from kscope.errors import KscopeError
from kscope.facts import Fact, FactConfig, holdout_option, prepare_facts, split_prompts, splittable
from kscope.locate.attribution import AttributionConfig, attribute_fact
from kscope.model.loading import LoadedModel, ModelConfig, load_model
from kscope.model.sites import check_layer
from kscope.outputs import journal_path
from kscope.parallel import ParallelConfig, fact_keys, fact_task, map_facts
from kscope.results import Result
from kscope.units.base import Units
from kscope.units.corpus import CorpusConfig
from kscope.units.provision import BaselineConfig, SAEInfo, site_baselines, unit_sets_for_layers
from kscope.units.training import TrainSAEConfig


LOCATED = "located.json"  # the name the journal of each fact's top units is kept under (no such file is written)


@dataclass
class AnalysisResult(Result):
    """What every per-unit-set analysis records first: model, layer, facts, options."""

    model: str
    layer: int
    n_facts: int
    config: dict


@dataclass
class AnalysisConfig(Config):
    """One layer's neurons and SAE features, the known facts, and where to write."""

    output_name: ClassVar[str] = ""  # the job writes <out_dir>/<output_name>.json and .png

    model: ModelConfig = nested(ModelConfig)
    facts: FactConfig = nested(FactConfig, max_facts=60)
    holdout: bool = holdout_option()
    layer: int = option(12, "Layer to analyse.", min=0)
    feature_site: str = option("mlp.out", "Site kind of the SAE features.", flag="site", choices=("mlp.out", "resid.post", "mlp.neurons"), label="site kind")
    sae: str | None = option(None, "SAELens SAE directory; default: train (and cache) one.", reads=True)
    sae_train: TrainSAEConfig = nested(TrainSAEConfig, prefix="sae-")
    corpus: CorpusConfig = nested(CorpusConfig)
    attribution: AttributionConfig = nested(AttributionConfig, steps=10)
    located: str | None = option(None, "Reuse top units from a compare/locate JSON instead of recomputing IG.", reads=True)
    parallel: ParallelConfig = nested(ParallelConfig)
    out_dir: str = option("runs", "Directory for the JSON and PNG outputs.", output="dir")

    def validate(self) -> None:
        """Checks of the file system, before any model work."""
        if self.sae and not Path(self.sae).is_dir():
            raise KscopeError(f"SAE directory {self.sae} does not exist")
        if self.located and not Path(self.located).exists():
            raise KscopeError(f"{self.located} does not exist")
        if self.facts.facts is not None and not Path(self.facts.facts).exists():
            raise KscopeError(f"fact source {self.facts.facts} does not exist")
        self.check_writes()
        self.parallel.validate()

    def written_inside(self) -> list[str]:
        """The result, its figure and the journal of the facts' top units (``setup``)."""
        return [f"{self.output_name}.json", f"{self.output_name}.png", journal_path(LOCATED).name]


@dataclass
class Setup:
    lm: LoadedModel
    facts: list[Fact]  # with --holdout, each fact's measurement prompts only (its units were chosen on the others)
    selected: list[Fact]  # the same facts with the prompts their units were chosen on
    loaded: list[Fact]
    neurons: Units
    features: Units
    sae: SAEInfo
    tops: dict[str, list[list[int]]]  # kind -> per fact, its ranked units
    baselines: dict[str, Units] = field(default_factory=dict)  # same-site baselines of the features' site, kind -> units


def setup(cfg: AnalysisConfig, progress, need_tops: bool = True, baselines: BaselineConfig | None = None) -> Setup:
    """Load the model and facts, obtain the layer's unit sets and (unless given) each fact's top units by IG.

    ``baselines`` (not None): also same-site baselines of the features' site (``Setup.baselines``, their tops in
    ``Setup.tops``). With ``cfg.located``: every baseline the compare run ranked, refitted as it fitted them (none if it
    had none or fitted them on another corpus); otherwise the ones ``baselines`` names, ranked by IG with the rest."""
    cfg.validate()
    tops_file = _read_located(cfg.located) if cfg.located and need_tops else None
    loaded = cfg.facts.load()
    lm = load_model(cfg.model)
    check_layer(lm.model, cfg.layer)
    facts, loaded = prepare_facts(lm, cfg.facts, loaded, progress, cfg.holdout)
    if cfg.holdout:
        facts = splittable(facts)
    select = [split_prompts(f, cfg.holdout)[0] for f in facts]
    sets, infos = unit_sets_for_layers(lm, [cfg.layer], cfg.feature_site, [cfg.sae] if cfg.sae else None, cfg.sae_train,
                                       cfg.corpus, cfg.model.device, cfg.model.cache_dir, progress)
    (neurons, feats), = sets
    bcfg = baselines if baselines is not None and baselines.baselines else None
    if baselines is not None and tops_file is not None:
        bcfg = _located_baseline_config(tops_file, cfg)
    bases = _fit_baselines(lm, cfg, bcfg, progress) if bcfg is not None and need_tops else []
    tops: dict = {}
    if need_tops:
        tops = located_tops(tops_file, select, cfg.layer) if tops_file is not None else None
        if tops is not None and bases:
            got = located_baseline_tops(tops_file, select, cfg.layer, [b.kind for b in bases])
            bases = [b for b in bases if b.kind in got]
            tops.update(got)
        if tops is None:
            cfg.parallel.validate()
            task = fact_task(cfg.parallel, _locate_fact, (lm, [neurons, feats, *bases], cfg), _locate_context,
                             (cfg, infos[cfg.layer].path, bases))
            keys = fact_keys(select)
            fp = {"model": asdict(cfg.model), "facts": keys, "layer": cfg.layer, "sae": infos[cfg.layer].key or infos[cfg.layer].path,
                  "attribution": asdict(cfg.attribution), "holdout": cfg.holdout}
            if bases:
                fp["baselines"] = asdict(bcfg)
            outcome = map_facts(task, select, keys, cfg.parallel, Path(cfg.out_dir) / LOCATED, fp, progress, "locating")
            kept = [i for i, r in enumerate(outcome.rows) if r is not None]
            facts = [facts[i] for i in kept]
            kinds = ["neuron", "feature", *(b.kind for b in bases)]
            tops = {kind: [outcome.rows[i][j] for i in kept] for j, kind in enumerate(kinds)}
    views = [split_prompts(f, cfg.holdout) for f in facts]
    return Setup(lm, [m for _, m in views], [s for s, _ in views], loaded, neurons, feats, infos[cfg.layer], tops,
                 {b.kind: b for b in bases})


_FITTED: dict[str, list[Units]] = {}  # baselines fitted in this process (reproduce runs interpret, then monosemanticity)


def _fit_baselines(lm, cfg: AnalysisConfig, bcfg: BaselineConfig, progress) -> list[Units]:
    """The baselines at the features' site, fitted as compare fits them (``site_baselines``); a fit is reused by the
    next analysis of the same model, site, corpus and options in this process."""
    from kscope.model.sites import Site

    site = Site(cfg.layer, cfg.feature_site)
    key = json.dumps([lm.name, lm.fingerprint, site.name, asdict(bcfg), asdict(cfg.corpus), cfg.sae_train.outlier_factor,
                      cfg.model.cache_dir], sort_keys=True, default=str)
    if key not in _FITTED:
        _FITTED.clear()  # one at a time: a reproduce run asks for one
        _FITTED[key] = site_baselines(lm, [site], bcfg, cfg.corpus, cfg.sae_train.outlier_factor, cfg.model.cache_dir, progress)[site]
    return _FITTED[key]


def _located_baseline_config(res, cfg: AnalysisConfig) -> BaselineConfig | None:
    """The baselines a compare result fitted, if this analysis can refit the same ones: same site, corpus and outlier rule."""
    c = getattr(res, "config", None) or {}
    b = c.get("baselines")
    if not b or not b.get("baselines") or c.get("feature_site", cfg.feature_site) != cfg.feature_site:
        return None
    same_corpus = c.get("corpus") == json.loads(json.dumps(asdict(cfg.corpus), default=str))
    if not same_corpus or (c.get("sae_train") or {}).get("outlier_factor") != cfg.sae_train.outlier_factor:
        from kscope.progress import note

        note("the located result fitted its baselines on another corpus or outlier rule; the analysis scores none")
        return None
    return BaselineConfig(**{k: v for k, v in b.items() if k in BaselineConfig.__dataclass_fields__})


def _locate_context(cfg: AnalysisConfig, sae_path: str, baselines: list[Units] | None = None):
    from kscope.model.sites import Site
    from kscope.units.provision import neuron_units
    from kscope.units.sae import feature_units, load_sae

    lm = load_model(cfg.model)
    site = Site(cfg.layer, cfg.feature_site)
    return lm, [neuron_units(lm, cfg.layer), feature_units(lm.model, load_sae(sae_path, cfg.model.device), site),
                *(baselines or [])], cfg


def _locate_fact(ctx, fact: Fact) -> list[list[int]]:
    """A fact's ranked neurons and ranked features (and ranked units of each baseline the context holds)."""
    lm, sets, cfg = ctx
    return [a.top for a in attribute_fact(lm, fact, sets, cfg.attribution)]


def _read_located(path: str):
    from kscope.locate.compare import CompareResult

    return CompareResult.load(path)


def located_tops(res, facts, layer: int) -> dict | None:
    """Ranked units per fact from a compare/locate result; None if it does not cover these facts or chose its units
    on other prompts than ``facts`` hold (``facts``: the selection views)."""
    by_uid = {r.uid: r for r in res.facts}

    def covers(f) -> bool:
        r = by_uid.get(f.uid)
        return (r is not None and (r.selected_on or r.prompts) == f.prompts and layer in r.layers
                and {"neuron", "feature"} <= set(r.layers[layer]))

    if not all(covers(f) for f in facts):
        return None
    return {kind: [[u.unit for u in by_uid[f.uid].layers[layer][kind].top] for f in facts] for kind in ("neuron", "feature")}


def located_baseline_tops(res, facts, layer: int, kinds) -> dict[str, list[list[int]]]:
    """Ranked units per fact of each baseline in ``kinds`` that ``res`` ranked for every fact (``located_tops`` has
    checked the facts and their selection prompts)."""
    by_uid = {r.uid: r for r in res.facts}
    return {k: [[u.unit for u in by_uid[f.uid].layers[layer][k].top] for f in facts] for k in kinds
            if all(k in by_uid[f.uid].layers[layer] for f in facts)}


def save_outputs(out_dir: str, name: str, result: Result, plot: Callable[[Path], None]) -> Result:
    """``<out_dir>/<name>.png`` then ``<name>.json`` (the JSON last: its presence marks the job done)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / f"{name}.png")
    result.save(out / f"{name}.json")
    return result
