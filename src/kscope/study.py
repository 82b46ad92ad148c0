"""The locate and compare jobs: attribute facts to neurons and SAE features, then measure ΔProb."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from kscope.attribution import AttributionConfig, attribute_fact
from kscope.errors import KscopeError
from kscope.facts import Fact, FactConfig, prepare_facts
from kscope.influence import InfluenceConfig, aggregate, fact_delta_prob
from kscope.io import write_json
from kscope.models import ModelConfig, load_model
from kscope.pipeline import CorpusConfig, neuron_units, sae_corpus, unit_sets_for_layers
from kscope.progress import console, make_progress
from kscope.sae import TrainSAEConfig
from kscope.scoring import answer_probs
from kscope.sites import SITE_KINDS, check_layer
from kscope.units import OPS


@dataclass
class StudyConfig:
    """Locate facts in neurons and SAE features at some layers (and, for compare, measure ΔProb)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    facts: FactConfig = field(default_factory=FactConfig)
    layers: list[int] = field(default_factory=lambda: [12], metadata={"help": "Layers to study (one SAE per layer)."})
    feature_site: str = field(default="mlp.out", metadata={"help": "Site kind of the SAE features: mlp.out or resid.post."})
    saes: list[str] = field(default_factory=list, metadata={"help": "SAELens SAE directories, one per layer; default: train (and cache) one."})
    features: bool = field(default=True, metadata={"help": "Also attribute to SAE features."})
    sae_train: TrainSAEConfig = field(default_factory=TrainSAEConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    out: str = field(default="runs/compare.json", metadata={"help": "Where to write the JSON results."})

    def validate(self) -> None:
        if self.feature_site not in SITE_KINDS:
            raise KscopeError(f"unknown site kind {self.feature_site!r}; choose one of {', '.join(SITE_KINDS)}")
        bad = [o for o in self.influence.ops if o not in OPS]
        if bad:
            raise KscopeError(f"unknown op {bad[0]!r}; choose from {', '.join(OPS)}")
        if any(k < 1 for k in self.influence.ks):
            raise KscopeError("k must be >= 1")
        if self.attribution.steps < 1 or self.attribution.batch_size < 1:
            raise KscopeError("steps and batch size must be >= 1")
        if self.influence.positions not in ("last", "all"):
            raise KscopeError("positions must be 'last' or 'all'")
        if self.facts.facts is not None and not Path(self.facts.facts).exists():
            raise KscopeError(f"fact source {self.facts.facts} does not exist")
        for sae in self.saes:
            if not Path(sae).is_dir():
                raise KscopeError(f"SAE directory {sae} does not exist")
        if Path(self.out).is_dir():
            raise KscopeError(f"--out {self.out} is a directory; give a .json file path")


def run_study(cfg: StudyConfig, measure: bool = True, facts: list[Fact] | None = None, lm=None) -> dict:
    """Attribute every known fact at every layer; with ``measure``, also ΔProb of the top-k units.

    Writes ``cfg.out`` only after everything succeeded.
    """
    cfg.validate()
    t0 = time.time()
    loaded = cfg.facts.load() if facts is None else facts
    if not loaded:
        raise KscopeError("the fact set is empty")
    lm = lm or load_model(cfg.model)
    for layer in cfg.layers:
        check_layer(lm.model, layer)
    tcfg = cfg.sae_train
    with make_progress() as progress:
        if facts is None:
            facts, loaded = prepare_facts(lm, cfg.facts, loaded)
        sets = unit_sets_for_layers(
            lm,
            cfg.layers,
            cfg.feature_site,
            cfg.saes or None,
            tcfg,
            lambda: sae_corpus(lm, loaded, tcfg, cfg.corpus, progress),
            cfg.model.device,
            cfg.model.cache_dir,
            progress,
        ) if cfg.features else [(neuron_units(lm, L), None) for L in cfg.layers]
        task = progress.add_task("facts", total=len(facts))
        per_fact = []
        for fact in facts:
            row: dict = {"uid": fact.uid, "subject": fact.subject, "relation": fact.relation, "object": fact.object,
                         "target_token": lm.tokenizer.decode([fact.target_id]), "multi_token": fact.multi_token,
                         "prompts": fact.prompts, "layers": {}}
            p_clean = None
            if measure:
                p_clean, _ = answer_probs(lm.model, lm.tokenizer, fact.prompts, [fact.target_id] * len(fact.prompts))
                row["p_clean"] = p_clean.tolist()
            for neurons, feats in sets:
                unit_sets = [u for u in (neurons, feats) if u is not None]
                atts = attribute_fact(lm, fact, unit_sets, cfg.attribution)
                entry = {}
                for units, att in zip(unit_sets, atts):
                    e = att.to_dict(cfg.attribution.top_k)
                    if measure:
                        e["delta_prob"] = fact_delta_prob(lm, fact, units, att.top, cfg.influence, p_clean.numpy())
                    entry[units.kind] = e
                row["layers"][str(neurons.site.layer)] = entry
            per_fact.append(row)
            progress.advance(task)
    summary = {}
    for neurons, feats in sets:
        L = str(neurons.site.layer)
        summary[L] = {}
        for kind, units in (("neuron", neurons), ("feature", feats)):
            if units is None:
                continue
            s = {"site": units.site.name, "n_units": units.n_units,
                 "mean_refined": sum(len(r["layers"][L][kind]["refined"]) for r in per_fact) / len(per_fact)}
            if measure:
                s["delta_prob"] = aggregate([r["layers"][L][kind]["delta_prob"] for r in per_fact])
            summary[L][kind] = s
    result = {
        "model": lm.name,
        "n_facts": len(facts),
        "n_multi_token": sum(f.multi_token for f in facts),
        "multi_token_note": "objects of several tokens are scored by their first token" if any(f.multi_token for f in facts) else None,
        "config": asdict(cfg),
        "summary": summary,
        "facts": per_fact,
        "seconds": time.time() - t0,
    }
    write_json(cfg.out, result)
    return result


def summary_table(result: dict) -> Table:
    """Neurons vs features ΔProb (mean relative change of P(answer), 95% CI) per layer, op and k."""
    t = Table(title=f"ΔProb, {result['n_facts']} facts, {result['model']}")
    for col in ("layer", "op", "k", "neurons", "features"):
        t.add_column(col, justify="right")

    def fmt(c: dict | None) -> str:
        if not c:
            return "-"
        lo, hi = c.get("lo"), c.get("hi")
        ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None and lo == lo else ""
        return f"{c['mean']:+.3f}{ci}"

    for L, by_kind in result["summary"].items():
        n = by_kind.get("neuron", {}).get("delta_prob", {})
        f = by_kind.get("feature", {}).get("delta_prob", {})
        for op in n or f:
            for k in (n or f)[op]:
                t.add_row(L, op, str(k), fmt(n.get(op, {}).get(k)), fmt(f.get(op, {}).get(k)))
    return t


def print_summary(result: dict) -> None:
    console.print(summary_table(result))
