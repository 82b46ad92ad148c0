"""``kscope reproduce``: the whole study on one model, stage by stage, resumable, into one report.

A stage is reused only when its result exists *and* was made with the same inputs and options
(a fingerprint of the stage's config is kept beside the results); otherwise it runs again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kscope.app.explorer import ExploreConfig
from kscope.app.report_attacks import POOLED_WHITEBOX
from kscope.analyses.autointerp import InterpretJob, InterpretResult, run_interpret_job
from kscope.analyses.faithfulness import FaithfulnessJob, FaithfulnessResult, run_faithfulness_job
from kscope.analyses.sweep import SweepConfig, SweepResult
from kscope.analyses.verdicts import Verdict
from kscope.analyses.monosemanticity import MonosemanticityJob, MonosemanticityResult, run_monosemanticity_job
from kscope.config import MAX_EXPANSION, Config, nested, option, parse_layers
from kscope.errors import KscopeError
from kscope.facts import FactConfig, holdout_option
from kscope.io import read_json, write_json
from kscope.locate.attribution import AttributionConfig
from kscope.locate.compare import CompareConfig, CompareResult, run_study
from kscope.locate.edits import EditConfig
from kscope.model.loading import ModelConfig
from kscope.outputs import Written
from kscope.privacy.study.erase import EraseConfig, EraseJob, EraseResult, erase
from kscope.privacy.data.inject import MANIFEST, BuildConfig, BuildSummary, build, read_manifest
from kscope.privacy.data.dataset import PrivacyConfig
from kscope.progress import console
from kscope.results import Result
from kscope.units.corpus import CorpusConfig
from kscope.units.provision import BaselineConfig
from kscope.units.training import TrainSAEConfig

STAGES = ("compare", "faithfulness", "interpret", "monosemanticity", "explorer", "privacy-build", "privacy-erase", "sweep")
DEFAULT_STAGES = STAGES[:-1]  # the sweep (many layers, two sites) is asked for by name
FINGERPRINTS = ".stages.json"


@dataclass
class ReproduceConfig(Config):
    """The whole study: ΔProb, faithfulness, interpretability, monosemanticity, privacy erasure -> <out>/index.html."""

    model: ModelConfig = nested(ModelConfig)
    facts: str | None = option(None, "ParaRel dir or fact file; default: the built-in facts.", reads=True)
    max_facts: int = option(60, "Known facts to study.", min=1)
    layer: int = option(12, "Layer of the neurons and the SAE.", min=0)
    out: str = option("report", "Report directory (index.html, results.json, figures).", output="dir")
    stages: list[str] = option(help="Stages to run (the sweep runs only when named).", factory=lambda: list(DEFAULT_STAGES), choices=STAGES,
                               label="stage", unique=True)
    sweep_layers: list[int] = option(help="Layers of the sweep stage.", factory=lambda: list(range(0, 28, 3)), parse=parse_layers, min=0)
    sweep_selection: list[str] = option(help="Sweep: how top units are chosen, 'ig' and/or 'activation' (the paper's protocol).",
                                        factory=lambda: ["ig"], choices=("ig", "activation"), label="selection protocol", unique=True)
    sweep_widths: list[int] = option(help="Sweep: SAE widths (x site width) of a width sweep at --layer, e.g. 1,4,8; empty: none.",
                                     factory=list, min=1, max=MAX_EXPANSION, unique=True, allow_empty=True)
    sweep_ablation: list[str] = option(help="Sweep: features ablated with the SAE 'error' term kept and/or by 'reconstruction' (the "
                                            "paper's protocol).", factory=lambda: ["error"], choices=("error", "reconstruction"),
                                       label="ablation protocol", unique=True)
    fresh: bool = option(False, "Redo stages whose results already exist (default: reuse those made with the same options).")
    privacy: PrivacyConfig = nested(PrivacyConfig, prefix="privacy-", hide=("early_stop", "seed", "band"))  # band: --erase-layers
    privacy_seeds: list[int] = option(help="Seeds of the privacy models (people and secrets); replaces --privacy-seed.",
                                      factory=lambda: [0], unique=True)
    privacy_strengths: list[str] = option(help="Injection strengths: 'early' (stop once every secret is memorised) and/or 'full' "
                                               "(all --privacy-epochs).", factory=lambda: ["early"], choices=("early", "full"),
                                          label="strength", unique=True)
    privacy_runs: list[str] = option(help="Privacy models to make, as STRENGTH-sSEED (e.g. early-s0,early-s1,full-s0); default: every "
                                          "--privacy-strengths x --privacy-seeds.", factory=list, label="privacy run", unique=True,
                                     allow_empty=True)
    holdout: bool = holdout_option()
    known_top_k: int = option(1, "A prompt is known if the answer is within the top k.", min=1)
    min_known_prompts: int = option(2, "Known prompts a fact needs.", min=1)
    baselines: BaselineConfig = nested(BaselineConfig)
    edits: EditConfig = nested(EditConfig)  # compare's and the sweep's: one edit rule for both
    sae_train: TrainSAEConfig = nested(TrainSAEConfig, prefix="sae-")
    corpus: CorpusConfig = nested(CorpusConfig)
    erase: EraseConfig = nested(EraseConfig, prefix="erase-", hide=("unrelated",))

    def validate(self) -> None:
        if self.facts is not None and not Path(self.facts).exists():
            raise KscopeError(f"fact source {self.facts} does not exist")
        self.check_writes()
        for name in self.privacy_runs:
            if not re.fullmatch(r"(early|full)-s\d+", name):
                raise KscopeError(f"privacy run {name!r}: expected STRENGTH-sSEED with STRENGTH early or full, e.g. early-s0")

    def writes(self) -> list[Written]:
        """The report and what every stage writes under ``--out``: results, figures, journals, the explorer and the
        directories of the sweep and the privacy models."""
        out = Path(self.out)
        ws = [Written(out, "--out", self.out, whole=False, directory=True)]
        ws += [Written(out / name, "--out", self.out) for name in ("results.json", "index.html", FINGERPRINTS, "compare.png",
                                                               POOLED_WHITEBOX)]
        for scfg in stage_configs(self).values():
            ws += [Written(w.path, "--out", self.out, whole=w.whole) for w in scfg.writes() if w.path != out]
        return ws


@dataclass
class ReproduceResult(Result):
    """Every stage's result (per-fact detail left in the stage files) and how long each stage took."""

    kind = "reproduce"
    version = 2
    min_version = 2
    min_version_why = ("made before issue 34 (the basis zeroed while other sets were mean-ablated, suppress and enhance judged "
                       "combined); run kscope reproduce again")

    model: str
    layer: int
    facts_note: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    compare: CompareResult | None = None
    faithfulness: FaithfulnessResult | None = None
    interpret: InterpretResult | None = None
    monosemanticity: MonosemanticityResult | None = None
    privacy_build: dict[str, BuildSummary] = field(default_factory=dict)
    privacy: dict[str, EraseResult] = field(default_factory=dict)
    sweep: SweepResult | None = None
    kscope_version: str = ""
    config: dict = field(default_factory=dict)
    paired: dict[str, Verdict] = field(default_factory=dict)  # the answers' per-fact verdicts (app.verdicts.paired_verdicts)


def _earlier_seconds(out: Path) -> dict[str, float]:
    """Stage seconds of the run directory's previous ``results.json`` (none if absent or unreadable)."""
    try:
        return dict(read_json(out / "results.json").get("stage_seconds") or {})
    except (KscopeError, AttributeError):
        return {}


def privacy_runs(cfg: ReproduceConfig) -> list[tuple[str, str, int]]:
    """``(name, strength, seed)`` of each privacy model."""
    if cfg.privacy_runs:
        return [(name, name.split("-s")[0], int(name.split("-s")[1])) for name in cfg.privacy_runs]
    return [(f"{st}-s{sd}", st, sd) for st in cfg.privacy_strengths for sd in cfg.privacy_seeds]


def _files(cfg: ReproduceConfig) -> dict[str, Path]:
    """Each unit of work (a stage, or a stage of one privacy model) and the file that marks it done."""
    out = Path(cfg.out)
    files = {"compare": out / "compare.json", "faithfulness": out / "faithfulness.json",
             "interpret": out / "interpret.json", "monosemanticity": out / "monosemanticity.json",
             "explorer": out / "explorer" / "index.html", "sweep": out / "sweep" / "sweep.json"}
    for name, _, _ in privacy_runs(cfg):
        files[f"privacy-build:{name}"] = out / "privacy" / name / MANIFEST
        files[f"privacy-erase:{name}"] = out / f"privacy-{name}.json"
    return files


def stage_configs(cfg: ReproduceConfig) -> dict[str, Config]:
    """The config each unit of work runs with: what its fingerprint covers."""
    out = Path(cfg.out)
    files = _files(cfg)
    facts = FactConfig(facts=cfg.facts, max_facts=cfg.max_facts, known_top_k=cfg.known_top_k, min_known_prompts=cfg.min_known_prompts)
    common = dict(model=cfg.model, facts=facts, holdout=cfg.holdout, layer=cfg.layer, located=str(files["compare"]), out_dir=str(out),
                  attribution=AttributionConfig(steps=10), sae_train=cfg.sae_train, corpus=cfg.corpus)
    configs: dict[str, Config] = {
        "compare": CompareConfig(model=cfg.model, facts=facts, holdout=cfg.holdout, layers=[cfg.layer], out=str(files["compare"]), sae_train=cfg.sae_train,
                                 corpus=cfg.corpus, baselines=cfg.baselines, edits=cfg.edits),
        "faithfulness": FaithfulnessJob(**(common | {"located": None})),  # it ranks its decompositions' units itself
        "interpret": InterpretJob(**common),
        "monosemanticity": MonosemanticityJob(**common),
        "sweep": SweepConfig(model=cfg.model, facts=facts, layers=list(cfg.sweep_layers), selection=list(cfg.sweep_selection),
                             ablation=list(cfg.sweep_ablation), widths=list(cfg.sweep_widths), width_layer=cfg.layer,
                             holdout=cfg.holdout, baselines=cfg.baselines, edits=cfg.edits,
                             sae_train=cfg.sae_train, corpus=cfg.corpus,
                             out_dir=str(out / "sweep")),
    }
    for name, strength, seed in privacy_runs(cfg):
        pcfg = replace(cfg.privacy, seed=seed, early_stop=strength == "early",
                       band=list(cfg.erase.layers) if cfg.privacy.train == "band" else cfg.privacy.band)  # inject where edits reach
        model_dir = str(files[f"privacy-build:{name}"].parent)
        configs[f"privacy-build:{name}"] = BuildConfig(model=cfg.model, privacy=pcfg, out=model_dir)
        configs[f"privacy-erase:{name}"] = EraseJob(model_dir=model_dir, erase=replace(cfg.erase, unrelated=cfg.facts),
                                                   device=cfg.model.device, cache_dir=cfg.model.cache_dir, sae_train=cfg.sae_train,
                                                   corpus=cfg.corpus, out=str(files[f"privacy-erase:{name}"]))
    configs["explorer"] = ExploreConfig(run_dir=str(out), runtime=cfg.model)  # last: its pages show every result
    return configs


def _stage(unit: str) -> str:
    return unit.split(":")[0]


def fingerprint(stage_cfg: Config, upstream: str = "", run_dir: str | None = None) -> str:
    """A hash of everything that shapes a stage: its config and the fingerprints of the stages it reads. Paths inside
    ``run_dir`` count relative to it: where a run directory lies is not an input, so a copy reruns nothing."""
    text = json.dumps(asdict(stage_cfg), sort_keys=True, default=str)
    if run_dir:
        text = re.sub(re.escape(json.dumps(run_dir)[1:-1]) + r'(?=[/\\"])', "<run>", text)
    return hashlib.sha256((text + upstream).encode()).hexdigest()[:16]


def stage_fingerprints(configs: dict[str, Config], run_dir: str | None) -> dict[str, str]:
    """Each unit's fingerprint, chained through the units it reads."""
    prints: dict[str, str] = {}
    for unit in configs:
        upstream = {"interpret": ["compare"], "monosemanticity": ["compare"]}.get(unit, [])
        if unit == "explorer":  # it reads the located units, their explanations, the sweep and the privacy results
            upstream = ["compare", "interpret", "sweep", *(u for u in prints if u.startswith("privacy-erase:"))]
        if unit.startswith("privacy-erase:"):
            upstream = ["privacy-build:" + unit.split(":", 1)[1]]
        prints[unit] = fingerprint(configs[unit], "".join(prints[u] for u in upstream), run_dir)
    return prints


def run_reproduce(cfg: ReproduceConfig) -> ReproduceResult:
    from kscope import __version__

    cfg.validate()
    cfg = replace(cfg, out=str(Path(cfg.out).resolve()))  # one spelling per directory, so fingerprints match across spellings
    out = Path(cfg.out)  # made by the first stage that writes, so a run refused before any work leaves nothing
    files = _files(cfg)
    configs = stage_configs(cfg)
    fp_path = out / FINGERPRINTS
    done_fps: dict = read_json(fp_path) if fp_path.exists() else {}
    prints = stage_fingerprints(configs, cfg.out)
    legacy = stage_fingerprints(configs, None)  # runs made before fingerprints were relative: the same run at its old path
    for unit, fp in legacy.items():
        if done_fps.get(unit) == fp:
            done_fps[unit] = prints[unit]
    units = [u for u in configs if _stage(u) in cfg.stages]
    reused = {u: files[u].exists() and done_fps.get(u) == prints[u] and not cfg.fresh for u in units}
    from kscope.app.plan import plan_lines, sae_sites
    from kscope.model.loading import load_model

    sites = sae_sites(cfg, {_stage(u) for u in units if not reused[u]})
    lm = load_model(cfg.model) if sites else None
    console.rule("[bold]plan")
    for line in plan_lines(cfg, units, reused, lm, sites):
        console.print(line, soft_wrap=True)
    timings: dict[str, float] = {}
    if sites:  # every SAE the run needs from one activation pass over the corpus; the stages then find them cached
        from kscope.progress import make_progress
        from kscope.units.provision import obtain_saes

        console.rule("[bold]SAEs")
        t0 = time.time()
        with make_progress() as progress:
            obtain_saes(lm, sites, cfg.sae_train, cfg.corpus, cfg.model.device, cfg.model.cache_dir, progress)
        timings["saes"] = time.time() - t0  # the corpus, its activations and the SAEs not cached yet
    del lm
    earlier = _earlier_seconds(out)
    for i, unit in enumerate(units, 1):
        exists = files[unit].exists()
        same = done_fps.get(unit) == prints[unit]
        done = reused[unit]
        note = " (done, resumed)" if done else " (options changed: running again)" if exists and not same and not cfg.fresh else ""
        console.rule(f"[bold]stage {i}/{len(units)}: {unit}{note}")
        if done:
            if unit in earlier:  # the run that made it timed it
                timings[unit] = earlier[unit]
            continue
        t0 = time.time()
        scfg = configs[unit]
        if done_fps.pop(unit, None) is not None:  # a result replaced halfway must not pass for one of the old options
            write_json(fp_path, done_fps)
        stage = _stage(unit)
        if stage == "compare":
            from kscope.app.report import plot_compare

            plot_compare(run_study(scfg), out / "compare.png")
        elif stage == "faithfulness":
            run_faithfulness_job(scfg)
        elif stage == "interpret":
            run_interpret_job(scfg)
        elif stage == "monosemanticity":
            run_monosemanticity_job(scfg)
        elif stage == "sweep":
            from kscope.analyses.sweep import run_sweep

            run_sweep(scfg)
        elif stage == "explorer":
            from kscope.app.explorer import build_explorer

            build_explorer(scfg)
        elif stage == "privacy-build":
            if files[unit].parent.exists():
                shutil.rmtree(files[unit].parent)
            build(scfg)
        elif stage == "privacy-erase":
            from kscope.app.privacy_figures import plot_all

            plot_all(erase(scfg), out, f"privacy-{unit.split(':', 1)[1]}")
        done_fps[unit] = prints[unit]
        write_json(fp_path, done_fps)
        timings[unit] = time.time() - t0
    results = ReproduceResult(cfg.model.model, cfg.layer,
                              f"facts: {cfg.facts or 'built-in set'}, up to {cfg.max_facts} known facts, layer {cfg.layer}",
                              timings, kscope_version=__version__, config=asdict(cfg))
    current = {u: files[u].exists() and done_fps.get(u) == prints[u] for u in configs}
    if current["compare"]:
        results.compare = CompareResult.load(files["compare"])
    if current["sweep"]:
        results.sweep = SweepResult.load(files["sweep"])
    if current["faithfulness"]:
        results.faithfulness = FaithfulnessResult.load(files["faithfulness"])
    if current["interpret"]:
        results.interpret = InterpretResult.load(files["interpret"])
    if current["monosemanticity"]:
        results.monosemanticity = MonosemanticityResult.load(files["monosemanticity"])
    for name, _, _ in privacy_runs(cfg):
        if current[f"privacy-build:{name}"]:
            results.privacy_build[name] = read_manifest(files[f"privacy-build:{name}"].parent).summary
        if current[f"privacy-erase:{name}"]:
            results.privacy[name] = EraseResult.load(files[f"privacy-erase:{name}"])
    if len(results.privacy) > 1 and any(row.layers for r in results.privacy.values() for row in r.attacks):
        from kscope.app.privacy_figures import plot_whitebox

        plot_whitebox(results.privacy, out / POOLED_WHITEBOX)
    from kscope.app.verdicts import paired_verdicts

    results.paired = paired_verdicts(results)  # the answers' per-fact verdicts, before the per-fact detail is left out
    if results.compare:
        results.compare.facts = []
    for r in (results.monosemanticity.results.values() if results.monosemanticity else []):
        r.rows = []
    results.save(out / "results.json")
    from kscope.app.report_html import write_html

    write_html(out, results)
    return results
