"""``kscope reproduce``: the whole study on one model, stage by stage, resumable, into one report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kscope.analyses import AnalysisConfig, run_faithfulness_job, run_interpret_job, run_monosemanticity_job
from kscope.attribution import AttributionConfig
from kscope.errors import KscopeError
from kscope.facts import FactConfig
from kscope.faithfulness import FaithfulnessConfig
from kscope.interpret import InterpretConfig
from kscope.inject import MANIFEST
from kscope.io import read_json, write_json
from kscope.models import ModelConfig
from kscope.monosemanticity import MonosemanticityConfig
from kscope.progress import console
from kscope.sae import TrainSAEConfig
from kscope.report import plot_compare, plot_privacy, write_html
from kscope.study import StudyConfig, run_study

STAGES = ("compare", "faithfulness", "interpret", "monosemanticity", "privacy-build", "privacy-erase")


@dataclass
class ReproduceConfig:
    """Run every analysis and write ``<out>/index.html`` + ``<out>/results.json``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    facts: str | None = field(default=None, metadata={"help": "ParaRel dir or fact file; default: the built-in facts."})
    max_facts: int = field(default=60, metadata={"help": "Known facts to study."})
    layer: int = field(default=12, metadata={"help": "Layer of the neurons and the SAE."})
    out: str = field(default="report", metadata={"help": "Report directory."})
    stages: list[str] = field(default_factory=lambda: list(STAGES), metadata={"help": "Stages to run."})
    fresh: bool = field(default=False, metadata={"help": "Redo stages whose results already exist."})
    people: int = field(default=10, metadata={"help": "Fictitious people for the privacy stages."})
    known_top_k: int = field(default=1, metadata={"help": "A prompt is known if the answer is within the top k."})
    min_known_prompts: int = field(default=2, metadata={"help": "Known prompts a fact needs."})
    sae_train: TrainSAEConfig = field(default_factory=TrainSAEConfig)

    def validate(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise KscopeError(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
        if self.facts is not None and not Path(self.facts).exists():
            raise KscopeError(f"fact source {self.facts} does not exist")
        if Path(self.out).is_file():
            raise KscopeError(f"--out {self.out} is a file")


def _stage_files(out: Path) -> dict[str, Path]:
    return {
        "compare": out / "compare.json",
        "faithfulness": out / "faithfulness.json",
        "interpret": out / "interpret.json",
        "monosemanticity": out / "monosemanticity.json",
        "privacy-build": out / "privacy_model" / MANIFEST,
        "privacy-erase": out / "privacy.json",
    }


def run_reproduce(cfg: ReproduceConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _stage_files(out)
    facts = FactConfig(facts=cfg.facts, max_facts=cfg.max_facts, known_top_k=cfg.known_top_k, min_known_prompts=cfg.min_known_prompts)
    analysis = AnalysisConfig(model=cfg.model, facts=facts, layer=cfg.layer, located=str(files["compare"]), out_dir=str(out),
                              attribution=AttributionConfig(steps=10), sae_train=cfg.sae_train)
    timings = {}
    for i, stage in enumerate(cfg.stages, 1):
        done = files[stage].exists() and not cfg.fresh
        console.rule(f"[bold]stage {i}/{len(cfg.stages)}: {stage}" + (" (done, resumed)" if done else ""))
        if done:
            continue
        t0 = time.time()
        if stage == "compare":
            res = run_study(StudyConfig(model=cfg.model, facts=facts, layers=[cfg.layer], out=str(files["compare"]), sae_train=cfg.sae_train))
            plot_compare(res, out / "compare.png")
        elif stage == "faithfulness":
            run_faithfulness_job(analysis, FaithfulnessConfig())
        elif stage == "interpret":
            run_interpret_job(analysis, InterpretConfig(), per_fact=1)
        elif stage == "monosemanticity":
            run_monosemanticity_job(analysis, MonosemanticityConfig())
        elif stage == "privacy-build":
            from kscope.privacy import build
            from kscope.privacy_data import PrivacyConfig

            if files["privacy-build"].parent.exists() and cfg.fresh:
                import shutil

                shutil.rmtree(files["privacy-build"].parent)
            build(cfg.model, PrivacyConfig(n_people=cfg.people), str(files["privacy-build"].parent))
        elif stage == "privacy-erase":
            from kscope.privacy import EraseConfig, erase

            res = erase(str(files["privacy-build"].parent), EraseConfig(layer=cfg.layer, unrelated=cfg.facts),
                        str(files["privacy-erase"]), cfg.model.device, cfg.model.cache_dir, cfg.sae_train)
            plot_privacy(res, out / "privacy.png")
        timings[stage] = time.time() - t0
    results = {"model": cfg.model.model, "layer": cfg.layer,
               "facts_note": f"facts: {cfg.facts or 'built-in set'}, up to {cfg.max_facts} known facts, layer {cfg.layer}",
               "stage_seconds": timings}
    for stage, key in (("compare", "compare"), ("faithfulness", "faithfulness"), ("interpret", "interpret"),
                       ("monosemanticity", "monosemanticity"), ("privacy-erase", "privacy")):
        if files[stage].exists():
            r = read_json(files[stage])
            if key == "compare":
                r = {k: v for k, v in r.items() if k != "facts"}
            if key == "monosemanticity":
                r = {**r, "results": {k: {"units": v["units"], "summary": v["summary"]} for k, v in r["results"].items()}}
            results[key] = r
    if files["privacy-build"].exists():
        results["privacy_build"] = read_json(files["privacy-build"])["summary"]
    write_json(out / "results.json", results)
    write_html(out, results)
    return results
