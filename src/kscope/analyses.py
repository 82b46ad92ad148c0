"""The analysis jobs (faithfulness, interpretability score, monosemanticity) on one layer:
shared setup, then each writes ``<out_dir>/<name>.json`` and ``<name>.png``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kscope.attribution import AttributionConfig, attribute_fact
from kscope.errors import KscopeError
from kscope.facts import FactConfig, prepare_facts
from kscope.faithfulness import FaithfulnessConfig, plot_faithfulness, run_faithfulness
from kscope.interpret import InterpretConfig, plot_interpretability, score_units
from kscope.io import read_json, write_json
from kscope.models import ModelConfig, load_model
from kscope.monosemanticity import MonosemanticityConfig, plot_monosemanticity, unit_monosemanticity
from kscope.pipeline import CorpusConfig, sae_corpus, unit_sets_for_layers
from kscope.progress import make_progress
from kscope.sae import TrainSAEConfig, collect_activations
from kscope.sites import SITE_KINDS, check_layer


@dataclass
class AnalysisConfig:
    """One layer's neurons and SAE features, the known facts, and where to write."""

    model: ModelConfig = field(default_factory=ModelConfig)
    facts: FactConfig = field(default_factory=FactConfig)
    layer: int = field(default=12, metadata={"help": "Layer to analyse."})
    feature_site: str = field(default="mlp.out", metadata={"help": "Site kind of the SAE features."})
    sae: str | None = field(default=None, metadata={"help": "SAELens SAE directory; default: train (and cache) one."})
    sae_train: TrainSAEConfig = field(default_factory=TrainSAEConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    attribution: AttributionConfig = field(default_factory=lambda: AttributionConfig(steps=10))
    located: str | None = field(default=None, metadata={"help": "Reuse top units from a compare/locate JSON instead of recomputing IG."})
    out_dir: str = field(default="runs", metadata={"help": "Directory for the JSON and PNG outputs."})

    def validate(self) -> None:
        if self.feature_site not in SITE_KINDS:
            raise KscopeError(f"unknown site kind {self.feature_site!r}")
        if self.sae and not Path(self.sae).is_dir():
            raise KscopeError(f"SAE directory {self.sae} does not exist")
        if self.located and not Path(self.located).exists():
            raise KscopeError(f"{self.located} does not exist")
        if self.facts.facts is not None and not Path(self.facts.facts).exists():
            raise KscopeError(f"fact source {self.facts.facts} does not exist")
        if Path(self.out_dir).is_file():
            raise KscopeError(f"--out-dir {self.out_dir} is a file")


@dataclass
class Setup:
    lm: object
    facts: list
    loaded: list
    neurons: object
    features: object
    tops: dict  # kind -> list (per fact) of ranked units
    progress: object


def setup(cfg: AnalysisConfig, progress, need_tops: bool = True) -> Setup:
    cfg.validate()
    loaded = cfg.facts.load()
    lm = load_model(cfg.model)
    check_layer(lm.model, cfg.layer)
    facts, loaded = prepare_facts(lm, cfg.facts, loaded)
    (neurons, feats), = unit_sets_for_layers(
        lm, [cfg.layer], cfg.feature_site, [cfg.sae] if cfg.sae else None, cfg.sae_train,
        lambda: sae_corpus(lm, loaded, cfg.sae_train, cfg.corpus, progress), cfg.model.device, cfg.model.cache_dir, progress)
    tops: dict = {}
    if need_tops:
        tops = located_tops(cfg.located, facts, cfg.layer) if cfg.located else None
        if tops is None:
            tops = {"neuron": [], "feature": []}
            task = progress.add_task("locating", total=len(facts))
            for f in facts:
                an, af = attribute_fact(lm, f, [neurons, feats], cfg.attribution)
                tops["neuron"].append(an.top)
                tops["feature"].append(af.top)
                progress.advance(task)
    return Setup(lm, facts, loaded, neurons, feats, tops, progress)


def located_tops(path: str, facts, layer: int) -> dict | None:
    """Ranked units per fact from a compare/locate JSON; None if it does not cover these facts."""
    res = read_json(path)
    by_uid = {r["uid"]: r for r in res.get("facts", [])}
    if not all(f.uid in by_uid and str(layer) in by_uid[f.uid]["layers"] for f in facts):
        return None
    return {kind: [[u["unit"] for u in by_uid[f.uid]["layers"][str(layer)][kind]["top"]] for f in facts]
            for kind in ("neuron", "feature")}


def _save(out_dir: str, name: str, result: dict, plot: Callable[[Path], None]) -> dict:
    """``<out_dir>/<name>.png`` then ``<name>.json`` (the JSON last: its presence marks the job done)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / f"{name}.png")
    write_json(out / f"{name}.json", result)
    return result


def run_faithfulness_job(cfg: AnalysisConfig, fcfg: FaithfulnessConfig) -> dict:
    with make_progress() as progress:
        s = setup(cfg, progress, need_tops=False)
        texts = sae_corpus(s.lm, s.loaded, cfg.sae_train, cfg.corpus, progress)
        acts = collect_activations(s.lm, s.features.site, texts, fcfg.fit_tokens, progress=progress)
        result = run_faithfulness(s.lm, s.features, acts, s.facts, fcfg, progress)
    result.update(model=s.lm.name, layer=cfg.layer)
    return _save(cfg.out_dir, "faithfulness", result, lambda path: plot_faithfulness(result, path))


def run_interpret_job(cfg: AnalysisConfig, icfg: InterpretConfig, per_fact: int = 1) -> dict:
    with make_progress() as progress:
        s = setup(cfg, progress)
        texts = sae_corpus(s.lm, s.loaded, cfg.sae_train, cfg.corpus, progress)
        results = {}
        task = progress.add_task("interpretability", total=2)
        for kind, units in (("neuron", s.neurons), ("feature", s.features)):
            idx = list(dict.fromkeys(u for top in s.tops[kind] for u in top[:per_fact]))
            results[kind] = score_units(s.lm, units, idx, texts, icfg)
            progress.advance(task)
    result = {"model": s.lm.name, "layer": cfg.layer, "n_facts": len(s.facts), "config": asdict(icfg), "results": results}
    return _save(cfg.out_dir, "interpret", result, lambda path: plot_interpretability(results, path))


def run_monosemanticity_job(cfg: AnalysisConfig, mcfg: MonosemanticityConfig) -> dict:
    with make_progress() as progress:
        s = setup(cfg, progress)
        if len(s.facts) < 2:
            raise KscopeError("monosemanticity needs at least 2 known facts (others serve as unrelated prompts)")
        results = {kind: unit_monosemanticity(s.lm, s.facts, units, s.tops[kind], mcfg)
                   for kind, units in (("neuron", s.neurons), ("feature", s.features))}
    result = {"model": s.lm.name, "layer": cfg.layer, "n_facts": len(s.facts), "config": asdict(mcfg), "results": results}
    return _save(cfg.out_dir, "monosemanticity", result, lambda path: plot_monosemanticity(results, mcfg.mix_fracs, path))
