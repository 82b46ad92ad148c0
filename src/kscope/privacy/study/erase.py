"""``privacy erase``: where the secrets live, which units carry them, and which editors remove them.

A run traces where the erased people's secrets live (``privacy.trace``), locates neurons and SAE features over a band
of layers per person (``privacy.locate``), then applies each editor at several budgets and strengths beside random
and whole-mechanism controls and measures it (``privacy.observe``): Rel, Gen, Loc on known facts and on the people
kept, ΔPPL, the change of log P(secret) and (for each method's best point) the secret's rank among candidates of its
format. The key-conditioned closed-form edit (``privacy.keyed``) runs through every handle at equal budgets: SAE
features' decoder span, neurons' columns (at equal rank and at equal parameters), random directions and columns,
and no restriction (the positive control). Each method's best point, the controls and the base model then face the
attacks (``privacy.attacks``). The model directory is never written: edits are applied in memory and restored,
checked bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kscope.config import MAX_STEPS, Config, nested, option, parse_layers, require
from kscope.errors import KscopeError
from kscope.facts import FactConfig, filter_known, load_facts, resolve_targets
from kscope.locate.attribution import METHODS as ATTRIBUTION_METHODS
from kscope.model.loading import ModelConfig, load_model
from kscope.model.sites import Site, config_shape, down_proj_weight, n_layers
from kscope.outputs import Written, journal_path
from kscope.parallel import ParallelConfig
from kscope.privacy.data.dataset import strangers
from kscope.privacy.data.inject import PrivacyManifest, read_manifest, retain_dir
from kscope.privacy.edit.keyed import KeyedConfig, KeyRows, keyed_inputs
from kscope.privacy.judge.attacks import AttackConfig
from kscope.privacy.judge.metrics import pareto_front
from kscope.privacy.judge.observe import Observer
from kscope.privacy.locate.fit import sae_fit
from kscope.privacy.edit.plan import (CONTROLS, DEFAULT_METHODS, METHODS, NOT_BY_DEFAULT, count_by_layer, lowest_edited, make_editor,
                                      plan)
from kscope.privacy.edit.revs import RevsConfig
from kscope.privacy.locate.trace import trace_secrets
from kscope.privacy.study.graded import grade_and_attack
from kscope.privacy.study.located import located
from kscope.privacy.study.results import EraseResult, ErasurePoint, Target, handle_verdicts, per_person
from kscope.privacy.study.sets import study_sets
from kscope.progress import make_progress
from kscope.units.corpus import CorpusConfig, build_corpus, cached_generation, windows
from kscope.units.provision import obtain_saes
from kscope.units.sae import feature_units, load_sae, sae_site_on_disk
from kscope.units.training import TrainSAEConfig


@dataclass
class EraseConfig(Config):
    """Trace, locate per person and compare erasure editors over a band of layers at several budgets and strengths."""

    methods: list[str] = option(help=f"Editors to compare (default: all but {', '.join(NOT_BY_DEFAULT)}).", factory=lambda: list(DEFAULT_METHODS), flag="method", choices=METHODS,
                                label="method", unique=True)
    controls: list[str] = option(help="Controls: random directions / columns through the keyed solver, random neurons / features "
                                      "zeroed, and the whole MLP of the band (then of all layers) zeroed.",
                                 factory=lambda: list(CONTROLS), choices=CONTROLS, label="control", unique=True, allow_empty=True)
    layers: list[int] = option(help="The band: layers whose neurons and SAE features are located and edited. Default 28: on "
                                    "SmolLM2 zeroing the MLP output where the secret is read out matters most in layers 27-29, "
                                    "and one layer there let the unrestricted keyed edit meet the target with the least "
                                    "perplexity cost of the bands tried (28; 29; 27-29; 18,21,24).", factory=lambda: [28],
                               parse=parse_layers, min=0)
    choice_layers: list[int] | None = option(None, "Other layers DEPN, KN erase and REVS may each choose instead of the band "
                                                  "(one layer alone), on the validation people: each is measured at its "
                                                  "budgets on the band and on each of these, and its best point (chosen on "
                                                  "validation) decides. Default: the layer above the band's top, where the "
                                                  "model has one (29 on SmolLM2, where the trace finds the strongest read-out); "
                                                  "a band layer alone: no choice.", parse=parse_layers, min=0)
    feature_choice_layers: list[int] | None = option(None, "The same choice for FeatureEdit and the runtime SAE editors (runtime "
                                                          "zeroing, the clamps); each layer needs an mlp.out SAE, trained if not "
                                                          "cached (~2.7 min on the README's CPU). Default: none, the band alone.",
                                                     parse=parse_layers, min=0)
    resid_layers: list[int] = option(help="Layers of the residual SAE features the gated clamp 'gated-clamp-resid' uses.",
                                     factory=lambda: [28], parse=parse_layers, min=0)
    neuron_budgets: list[int] = option(help="Neurons zeroed per point by DEPN, KN erase and random neurons (over the band).",
                                       factory=lambda: [100, 300, 1000], min=1, unique=True)
    feature_budgets: list[int] = option(help="Located units per point of the keyed handles (s directions; neurons at equal rank "
                                             "s, at equal parameters s x d_mlp / d_model) and of the feature editors.",
                                        factory=lambda: [32, 128, 512], min=1, unique=True)
    revs_budgets: list[int] = option(help="REVS: most neurons edited per target token and layer.", factory=lambda: [5, 20], min=1,
                                     unique=True)
    taus: list[float] = option(help="FeatureEdit: zero the entries with |d dᵀ W| >= tau x that feature's max.",
                               factory=lambda: [0.5, 0.2], min=0.0, max=1.0, unique=True)
    objective: str = option("distinct", "What location attributes: 'first' (P of the secret's first token), 'whole' (log P of all "
                                        "its tokens) or 'distinct' (log P of the tokens after the prefix all secrets of its kind share).",
                            choices=("first", "whole", "distinct"))
    specificity: list[str] = option(help="Specificity steps of location: 'format' subtracts a unit's score on the same templates "
                                         "about strangers (a disjoint name pool, values no one was taught); 'generic' divides by "
                                         "its importance on corpus text. Empty: raw scores.", factory=lambda: ["format", "generic"],
                                    choices=("format", "generic"), label="specificity", unique=True, allow_empty=True)
    raw_location: bool = option(True, "Also measure the keyed handles located on raw scores (the specificity steps' effect on Rel).")
    locate_method: str = option("ig", "How units are scored: ig (--steps), atp-mid, atp or atp-ig.", choices=ATTRIBUTION_METHODS,
                                label="attribution method")
    steps: int = option(5, "IG steps.", min=1, max=MAX_STEPS)
    depn_threshold: float = option(0.1, "DEPN: per-prompt selection at >= t x max score.", min=0.0, max=1.0)
    gate: float = option(0.5, "clamp-all (kscope's earlier clamp): a token is clamped where a located feature fires above gate x "
                              "its mean activation on the secrets.", min=0.0, max=100.0)
    clamp: float = option(2.0, "The clamps: located features are set to -clamp x their mean activation on the secrets.", min=0.0,
                          max=1000.0)
    gate_percentile: float = option(95.0, "Gated clamp (Dynamic SAE Guardrails): a sequence is clamped where its share of tokens "
                                          "with a located feature active exceeds this percentile of that share over corpus "
                                          "texts (--generic-texts of them).", min=0.0, max=100.0)
    trace_layers: list[int] | None = option(None, "Layers of the where-it-lives trace (default: every layer).", parse=parse_layers,
                                            min=0)
    trace_prompts: int = option(1, "Edit prompts per secret in the trace (its intervals are over people; 3: all, at 3x the cost).",
                                min=1)
    trace_blocks: bool = option(False, "Also trace where the secret is computed: each block's whole weights (attention, MLP, "
                                       "norms) restored to the base model's at every position, and the blocks restored "
                                       "cumulatively from the bottom and from the top (3 passes per traced layer, ~2.5x the "
                                       "trace's time); the result names the band where the bottom-up restore removes the "
                                       "secret fastest.")
    keyed: KeyedConfig = nested(KeyedConfig, prefix="keyed-")
    revs: RevsConfig = nested(RevsConfig, prefix="revs-")
    attacks: AttackConfig = nested(AttackConfig)
    saes: list[str] = option(help="SAELens SAE directories, one per band layer (mlp.out); default: trained on the base model.",
                             factory=list, flag="sae", allow_empty=True, reads=True)
    unrelated: str | None = option(None, "ParaRel dir / fact file for locality (default: built-in facts).", reads=True)
    max_unrelated: int = option(40, "Unrelated facts (whose whole object the model produces) for locality.", min=1)
    ppl_texts: int = option(16, "Held-out texts the base model generates (seed 1234) for perplexity (half validation, half "
                                "test).", min=2)
    generic_texts: int = option(24, "Corpus training texts for the 'generic' specificity weights.", min=1)
    candidates: int = option(20, "Candidates of a secret's format for e-mails and birth dates (phones, cities, employers: all).", min=2)
    seed: int = option(0, "Seed of the random controls and the strangers.")
    random_draws: int = option(1, "Draws of every random control (random units or directions drawn anew each time); the "
                                  "verdicts against a random control average its draws per person.", min=1, max=100)


@dataclass
class EraseJob(Config):
    """Where a privacy model's secrets live, which units carry them per person, and which editors erase them: keyed
    closed-form edits through features / neurons / random handles at equal budgets, FeatureEdit, REVS, DEPN, KN erase,
    gated and plain SAE clamps, with controls, targets and attacks."""

    model_dir: str | None = option(help="A directory made by `kscope privacy build`.", required=True, reads=True)
    erase: EraseConfig = nested(EraseConfig)
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1 ...")
    cache_dir: str | None = option(None, "Cache for the default model and SAEs (default $KSCOPE_CACHE or ~/.cache/kscope).")
    sae_train: TrainSAEConfig = nested(TrainSAEConfig, prefix="sae-")
    corpus: CorpusConfig = nested(CorpusConfig)
    parallel: ParallelConfig = nested(ParallelConfig)
    out: str = option("runs/privacy.json", "JSON results.", output="file")

    def writes(self) -> list[Written]:
        """The result and its journal, the strangers' journal (``located``) and the figures beside it (``plot_all``)."""
        out = Path(self.out)
        side = [journal_path(str(out) + "strangers"), *(out.with_name(out.stem + s + ".png") for s in ("", "-budget", "-trace"))]
        return super().writes() + [Written(p, "--out", self.out) for p in side]

    def validate(self) -> None:
        require(self.model_dir, "--model-dir")
        self.parallel.validate()
        cfg = self.erase
        if cfg.saes and len(cfg.saes) != len(cfg.layers):
            raise KscopeError(f"{len(cfg.saes)} SAE(s) given for {len(cfg.layers)} layer(s); give one per layer")
        for s in cfg.saes:
            if not Path(s).is_dir():
                raise KscopeError(f"SAE directory {s} does not exist")
        for path in cfg.saes:
            load_sae(path)  # garbage, NaN or misshapen weights: one line now, not after the model has loaded
        for path, L in zip(cfg.saes, cfg.layers):
            site = sae_site_on_disk(path)
            if site is not None and site.kind != "mlp.out":
                raise KscopeError(f"--sae {path} holds {site.kind} features: the weight editors change the down projection, whose "
                                  "output space is mlp.out's; give mlp.out SAEs (residual features serve gated-clamp-resid, "
                                  "--resid-layers)")
            if site is not None and site.layer != L:
                raise KscopeError(f"--sae {path} is an SAE of layer {site.layer}, not of band layer {L}")
        if "gated-clamp-resid" in cfg.methods and not cfg.resid_layers:
            raise KscopeError("gated-clamp-resid needs --resid-layers (residual SAE features to clamp)")
        if cfg.unrelated is not None and not Path(cfg.unrelated).exists():
            raise KscopeError(f"fact source {cfg.unrelated} does not exist")
        self.check_writes()
        read_manifest(self.model_dir)  # a privacy model at all, before anything is read from its config
        self.check_shape()

    def check_shape(self) -> None:
        """Refusals that need only the model's config: layers it lacks, budgets larger than the band's units."""
        from transformers import AutoConfig

        try:
            n_model_layers, d_model, d_mlp = config_shape(AutoConfig.from_pretrained(self.model_dir))
        except (OSError, ValueError):
            return  # an unreadable config fails with its own message when the model loads
        cfg = self.erase
        resid = cfg.resid_layers if "gated-clamp-resid" in cfg.methods else []
        named = [*cfg.layers, *resid, *(cfg.trace_layers or []), *(cfg.choice_layers or []), *(cfg.feature_choice_layers or [])]
        bad = [L for L in named if L >= n_model_layers]
        if bad:
            raise KscopeError(f"unknown layer {bad[0]}: the model has layers 0..{n_model_layers - 1}")
        n_units = len(cfg.layers) * d_mlp
        if max(cfg.neuron_budgets) > n_units:
            raise KscopeError(f"--neuron-budgets {max(cfg.neuron_budgets)}: the band has only {n_units} neurons")
        n_feats = len(cfg.layers) * self.sae_train.expansion * d_model
        if max(cfg.feature_budgets) > min(n_feats, n_units):
            raise KscopeError(f"--feature-budgets {max(cfg.feature_budgets)}: the band has {n_feats} features and {n_units} neurons")
        if max(cfg.feature_budgets) * d_mlp > n_units * d_model:
            raise KscopeError(f"--feature-budgets {max(cfg.feature_budgets)}: at equal parameters that is "
                              f"{max(cfg.feature_budgets) * d_mlp // d_model} neurons, more than the band's {n_units}")


def erase(job: EraseJob) -> EraseResult:
    """Trace, locate and erase on a privacy model made by ``build``. Writes ``job.out``; never changes the model dir.

    Every edit is fitted to the erased secrets' key prompts, the preserved people and the preserved facts
    (``study.sets``); it is scored on what it never saw, settings are chosen on the validation split and reported on
    the test split, and each method's best point is compared with the retain twin."""
    job.validate()
    cfg = job.erase
    manifest: PrivacyManifest = read_manifest(job.model_dir)
    t0 = time.time()
    seconds: dict[str, float] = {}
    lm = load_model(ModelConfig(model=job.model_dir, device=job.device, cache_dir=job.cache_dir))
    L_model = n_layers(lm.model)
    objective = "first" if cfg.objective == "first" else "whole"
    resolve = lambda fs: resolve_targets(fs, lm.tokenizer, objective, "distinct" if cfg.objective == "distinct" else "all")  # noqa: E731
    private = resolve(manifest.private_facts())
    mem = {r.uid: r.exact_edit for r in manifest.memorised}
    known = [f for f in private if mem.get(f.uid, 0) >= 0.5]
    if not known:
        raise KscopeError("no memorised private facts in this model (exact greedy match on >= half the edit prompts); "
                          "build with more --epochs or a higher --lr")
    seed = int(manifest.config.get("seed") or 0)
    with make_progress() as progress:
        unrelated = filter_known(lm, load_facts(cfg.unrelated), FactConfig(max_facts=cfg.max_unrelated, min_known_prompts=1,
                                                                            multi_token="whole"), progress=progress)
        base_lm = load_model(ModelConfig(model=manifest.base_model, device=job.device, cache_dir=job.cache_dir))
        ppl_texts = cached_generation(base_lm, cfg.ppl_texts, 64, 1234, progress, job.cache_dir)  # held out: no other use
        sets = study_sets(known, manifest.split, unrelated, ppl_texts, seed)
        erase_set = sets.erase  # key prompts only
        t = time.time()
        trace = trace_secrets(lm, base_lm, erase_set, cfg.trace_layers, cfg.layers, progress, cfg.trace_prompts,
                              cfg.trace_blocks)
        seconds["trace"] = time.time() - t
        t = time.time()
        choice, fchoice = candidate_layers(cfg, L_model)
        sites = [Site(L, "mlp.out") for L in cfg.layers] + [Site(L, "resid.post") for L in cfg.resid_layers
                                                            if "gated-clamp-resid" in cfg.methods]
        sites += [Site(L, "mlp.out") for L in fchoice]  # after the band's, so that --sae pairs with the band
        given = dict(zip(sites, cfg.saes)) if cfg.saes else None
        got = obtain_saes(base_lm, sites, job.sae_train, job.corpus, job.device, job.cache_dir, progress, given)
        feats = {s.layer: feature_units(lm.model, got[s][0], s) for s in sites if s.kind == "mlp.out"}
        rfeats = {s.layer: feature_units(lm.model, got[s][0], s) for s in sites if s.kind == "resid.post"}
        train_texts, held_texts = build_corpus(base_lm, job.corpus, progress, job.cache_dir).split()
        if set(sets.texts) & set(train_texts):
            raise KscopeError("the perplexity texts (seed 1234) are among the corpus's training texts, whose keys the solver "
                              "preserves; use another --corpus-seed")
        fit = sae_fit(lm, base_lm, [*feats.values(), *rfeats.values()], erase_set, held_texts, job.sae_train.outlier_factor)
        seconds["saes"] = time.time() - t
        taught = {f.object for f in private}  # a stranger's value is no one's: not a kept person's either
        scored_values = {f.object for f in sets.erase + sets.kept}  # if a format runs out: at most a preserved person's value
        stranger_set = resolve(strangers(erase_set, cfg.seed, taught, scored_values))
        loc, specificity, person_units = located(job, lm, erase_set, stranger_set, feats, rfeats, {s.name: got[s][1] for s in sites},
                                                 train_texts, progress, seconds, choice, fchoice)
        t = time.time()
        kcfg = cfg.keyed
        preserved = [KeyRows.of(lm.tokenizer, sets.keep_fit),
                     KeyRows.of(lm.tokenizer, resolve_targets(sets.unrelated_fit, lm.tokenizer, "whole"), per_fact=2)]
        corpus_windows = windows(lm.tokenizer, train_texts, kcfg.corpus_tokens, job.corpus.seq_len)
        loc.keyed = (*keyed_inputs(lm, erase_set, preserved, corpus_windows, cfg.layers, kcfg), kcfg, {})
        seconds["keyed_setup"] = time.time() - t
        # observation: every point on the validation and test splits, and in sample
        t = time.time()
        scored = sets.scored()
        obs = Observer(lm, scored, cfg.candidates, replay_from=min([*cfg.layers, *choice, *fchoice]))
        base = obs.baseline()
        clean = {L: down_proj_weight(lm.model, L).clone() for L in range(L_model)}
        specs = plan(cfg.methods, cfg.controls, cfg.neuron_budgets, cfg.feature_budgets, cfg.revs_budgets, kcfg.lams, cfg.taus,
                     cfg.raw_location and bool(cfg.specificity), cfg.random_draws, choice, fchoice)
        task = progress.add_task("editing and measuring", total=len(specs))
        points, editors, observations = [], [], []
        for spec in specs:
            units, editor, params = make_editor(lm, spec, loc, L_model, erase_set, cfg.revs)
            n_weights = editor.n_weights(lm.model) if hasattr(editor, "n_weights") else 0
            lowest = lowest_edited(spec.method, cfg.layers, cfg.resid_layers, spec.layer)
            with editor.applied(lm.model):
                now = obs.observe(lowest)
            _check_restored(lm.model, clean, spec.method)
            val = obs.compare(base, now, "val")
            points.append(ErasurePoint(spec.method, spec.kind, spec.budget, len(units), n_weights, **obs.compare(base, now, "test"),
                                       params=params, lam=spec.lam, tau=spec.tau, variant=spec.variant, draw=spec.draw,
                                       expressible=getattr(editor, "expressible", None), layer=spec.layer,
                                       by_layer=count_by_layer(units),
                                       units=[[L, u] for L, u in units[:2000]], **_people_measures(obs, base, now),
                                       val={k: val[k] for k in ("rel", "gen", "loc_pararel", "loc_private", "loc", "delta_ppl")}, fit=obs.compare(base, now, "fit")))
            editors.append(editor)
            observations.append(now)
            progress.advance(task)
        seconds["observation"] = time.time() - t
        target = Target()
        reach = [i for i, p in enumerate(points) if target.met(p)]
        result = EraseResult(
            model_dir=str(job.model_dir), base_model=manifest.base_model, build=_build_summary(manifest), layers=list(cfg.layers),
            config={**asdict(cfg), "sae_train": asdict(job.sae_train), "corpus": asdict(job.corpus)}, n_erased=len(erase_set),
            n_kept_private=len(sets.keep_fit) + len(sets.kept), n_unrelated=len(unrelated), points=points,
            frontier=[i for i in pareto_front([[p.rel, p.gen, p.loc, -p.delta_ppl] for p in points])
                      if points[i].kind != "control" or points[i].method.startswith(("random", "keyed-random"))],
            reach_target=reach, target=target, n_erased_people=len(sets.people("val")) + len(sets.people("test")),
            saes={s.name: got[s][1] for s in sites}, sae_fit=fit, trace=trace, specificity=specificity,
            verdicts=[v for b in ("keyed-neurons", "keyed-neurons-params", "keyed-random-directions")
                      for v in handle_verdicts(points, "keyed-features", b)],
            located={k: count_by_layer(loc.rankings[k][: max(cfg.feature_budgets)]) for k in ("neurons", "features") if k in loc.rankings},
            seconds=seconds, replay_from=obs.start if obs.replay_ok else 0, split=manifest.split.roles, sizes=sets.sizes(),
            person_units=person_units)
        # each method's best point (chosen on validation) against the retain twin on test, and the attacks
        t = time.time()
        twin_dir = retain_dir(job.model_dir, manifest)
        twin_lm = load_model(ModelConfig(model=str(twin_dir), device=job.device, cache_dir=job.cache_dir)) if twin_dir else None
        twin_obs = Observer(twin_lm, scored, cfg.candidates) if twin_lm is not None else None
        result.retain_model = str(twin_dir) if twin_dir else None
        grade_and_attack(job, lm, base_lm, twin_lm, obs, base, twin_obs, result, editors, observations, sets.attack_facts("test"),
                         sets.erased("val"), float(manifest.config.get("lr") or 1e-4), lambda m: _check_restored(lm.model, clean, m), progress)
        seconds["attacks"] = time.time() - t
    seconds["total"] = time.time() - t0
    result.save(job.out)
    return result


def candidate_layers(cfg: EraseConfig, n_model_layers: int) -> tuple[list[int], list[int]]:
    """The layers other than the band that the neuron baselines and the SAE baselines may each choose (``--choice-layers``,
    default the layer above the band's top where the model has one; ``--feature-choice-layers``, default none). Fixed
    before anything is measured: no person's data picks the candidates."""
    top = max(cfg.layers) + 1
    choice = cfg.choice_layers if cfg.choice_layers is not None else ([top] if top < n_model_layers else [])
    return ([L for L in dict.fromkeys(choice) if L not in cfg.layers],
            [L for L in dict.fromkeys(cfg.feature_choice_layers or []) if L not in cfg.layers])


def _people_measures(obs: Observer, base, now) -> dict:
    """Per test person: the share of their produced held-out-template (Rel) and held-out-phrasing (Gen) pairs erased, and
    their mean Δ log P on the held-out template."""
    keep = [s == "test" for s in obs.scopes["rel"]]

    def erased(group: str) -> dict[str, float]:
        gone = [(not a) for k, bs, as_ in zip(keep, base.ok[group], now.ok[group]) if k for b, a in zip(bs, as_) if b]
        who = [p for k, p, bs in zip(keep, obs.people, base.ok[group]) if k for b in bs if b]
        return per_person(gone, who)

    return {"rel_people": erased("rel"), "gen_people": erased("gen"),
            "dlogp_people": per_person([a - b for k, a, b in zip(keep, now.logp, base.logp) if k],
                                       [p for k, p in zip(keep, obs.people) if k])}


def _check_restored(model, clean, method: str) -> None:
    for L, W in clean.items():
        if not torch.equal(down_proj_weight(model, L), W):
            raise RuntimeError(f"{method}: restore was not exact at layer {L}")


def _build_summary(manifest: PrivacyManifest) -> dict:
    s = manifest.summary
    return {"epochs_run": s.epochs_run, "final_loss": s.losses[-1] if s.losses else None, "memorised_exact": s.memorised_exact,
            "n_facts": s.n_facts, **{k: manifest.config.get(k) for k in ("epochs", "early_stop", "train", "band", "lr", "seed", "n_people")}}
