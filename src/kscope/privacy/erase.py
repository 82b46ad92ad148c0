"""``privacy erase``: locate the units that carry private facts across a band of layers, apply each
editor at several budgets beside random and brute-force controls, measure, restore.

Location is IG on the whole secret (teacher-forced log-probability of its tokens; by default only
the tokens that tell it apart from the other secrets of its kind), for neurons and SAE features of
every edited layer in one batched pass per prompt. Each (method, budget) is one point: Rel, Gen,
Loc (ParaRel facts and the private facts not erased, on their whole objects), ΔPPL, exposure, the
change of log P(secret) and the secret's rank among candidates of its format. The model directory
is never written: edits are applied in memory and restored (checked bit for bit).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kscope.config import MAX_STEPS, Config, nested, option, parse_layers, require
from kscope.errors import KscopeError
from kscope.facts import Fact, FactConfig, filter_known, load_facts, resolve_targets
from kscope.io import check_writable
from kscope.locate.attribution import METHODS as ATTRIBUTION_METHODS, gradient_taps, plain_head, prompt_scores
from kscope.locate.objectives import fact_objective
from kscope.model.hooks import BlockReplay, ReplayMismatch, hooked
from kscope.model.loading import ModelConfig, load_model
from kscope.model.prefix import continuation_nlls_many
from kscope.model.readout import pad_rows
from kscope.model.sites import Site, down_proj_weight, n_layers
from kscope.privacy.dataset import candidates
from kscope.privacy.editors import RuntimeFeatureEdit, WeightEdit, feature_edit, projection_removal, zero_columns
from kscope.privacy.inject import PrivacyManifest, read_manifest, teacher_forced
from kscope.privacy.metrics import erased_fraction, pareto_front, perplexity, rank_of, relative_ppl_change
from kscope.privacy.select import depn_select, kn_select
from kscope.parallel import ParallelConfig, fact_keys, fact_task, map_facts
from kscope.progress import make_progress
from kscope.results import Result
from kscope.stats import Interval, mean_ci
from kscope.units.base import FeatureUnits, Units
from kscope.units.corpus import CorpusConfig, build_corpus, cached_generation, collect_activations
from kscope.units.provision import SAEInfo, neuron_units, obtain_saes
from kscope.units.sae import feature_units
from kscope.units.training import TrainSAEConfig, drop_outliers

NEURON_METHODS = ("depn", "kn-erase")
FEATURE_METHODS = ("feature-edit", "feature-project", "runtime-zero", "runtime-negative")
METHODS = NEURON_METHODS + FEATURE_METHODS
CONTROLS = ("random-neurons", "random-features", "mlp-zero", "mlp-zero-all")


@dataclass
class EraseConfig(Config):
    """Locate privacy units over a band of layers and compare erasure editors at several budgets."""

    methods: list[str] = option(help="Editors to compare.", factory=lambda: list(METHODS), flag="method", choices=METHODS, label="method", unique=True)
    controls: list[str] = option(help="Controls: random neurons / random features at every budget, and the whole MLP of the edited "
                                      "layers (then of all layers) zeroed; empty: none.", factory=lambda: list(CONTROLS),
                                 choices=CONTROLS, label="control", unique=True, allow_empty=True)
    layers: list[int] = option(help="Layers whose neurons and SAE features are located and edited: 12, 10,12, 18-29 or 12-27:3 "
                                    "(every third; the sweep's SAEs serve).", factory=lambda: list(range(12, 28, 3)), parse=parse_layers,
                               min=0)
    neuron_budgets: list[int] = option(help="Neurons edited per point (globally over the layers); weights changed = neurons x d_model.",
                                       factory=lambda: [30, 100, 300, 1000, 3000], min=1, unique=True)
    feature_budgets: list[int] = option(help="SAE features edited per point (globally over the layers).",
                                        factory=lambda: [10, 30, 100, 300, 1000], min=1, unique=True)
    feature_site: str = option("mlp.out", "Site of the SAE features: 'mlp.out' (their decoder directions are what the down "
                                          "projection writes) or 'resid.post' (the residual stream after the block).", flag="site",
                               choices=("mlp.out", "resid.post"), label="site kind")
    objective: str = option("distinct", "What location attributes: 'first' (P of the secret's first token), 'whole' (log P of all "
                                        "its tokens) or 'distinct' (log P of the tokens after the prefix all secrets of its kind share).",
                            choices=("first", "whole", "distinct"))
    specificity: list[str] = option(help="What makes a unit specific to the secrets: 'format' subtracts its score on the same prompts "
                                         "about people the model was never taught (so units of the secret's format, e.g. writing a "
                                         "phone number, are not chosen); 'generic' divides by its importance on generic text "
                                         "(|grad x activation| of the LM loss on corpus training text). Empty: raw scores.",
                                    factory=lambda: ["format", "generic"], choices=("format", "generic"), label="specificity",
                                    unique=True, allow_empty=True)
    locate_method: str = option("ig", "How units are scored: ig (--steps), atp-mid (the gradient halfway along IG's path: half "
                                      "the location time, but DEPN's erasure was weaker with it), atp or atp-ig.", choices=ATTRIBUTION_METHODS, label="attribution method")
    steps: int = option(5, "IG steps.", min=1, max=MAX_STEPS)
    depn_threshold: float = option(0.1, "DEPN: per-prompt selection at >= t x max score.", min=0.0, max=1.0)
    tau: float = option(0.5, "FeatureEdit (paper variant): zero the entries with |d dᵀ W| >= tau x max.", min=0.0, max=1.0)
    negative: float = option(2.0, "runtime-negative: a located feature that fires at u becomes -negative x u.", min=0.0)
    sae_source: str = option("base", "SAEs of the 'base' model (cached, reused by every privacy model; their explained variance on "
                                     "this model is reported) or trained on the 'edited' model.", choices=("base", "edited"))
    saes: list[str] = option(help="SAELens SAE directories, one per edited layer (mlp.out); default: see --sae-source.", factory=list,
                             flag="sae", allow_empty=True, reads=True)
    n_erase: int | None = option(None, "Private facts to erase (default: half of the memorised ones; the rest test locality).", min=1)
    unrelated: str | None = option(None, "ParaRel dir / fact file for locality (default: built-in facts).", reads=True)
    max_unrelated: int = option(40, "Unrelated facts (whose whole object the model produces) for locality.", min=1)
    ppl_texts: int = option(16, "Held-out texts the base model generates (seed 1234) for perplexity.", min=1)
    generic_texts: int = option(24, "Corpus training texts for the specificity weights.", min=1)
    candidates: int = option(20, "Candidates of a secret's format for e-mails and birth dates (phones, cities, employers: all).", min=2)
    seed: int = option(0, "Seed of the random controls.")


@dataclass
class EraseJob(Config):
    """Locate privacy neurons / features across layers and compare erasure editors at several budgets, with controls:
    Rel, Gen, Loc, ΔPPL, exposure, Δlog P and rank of the secret."""

    model_dir: str | None = option(help="A directory made by `kscope privacy build`.", required=True, reads=True)
    erase: EraseConfig = nested(EraseConfig)
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1 ...")
    cache_dir: str | None = option(None, "Cache for the default model and SAEs (default $KSCOPE_CACHE or ~/.cache/kscope).")
    sae_train: TrainSAEConfig = nested(TrainSAEConfig, prefix="sae-")
    corpus: CorpusConfig = nested(CorpusConfig)
    parallel: ParallelConfig = nested(ParallelConfig)
    out: str = option("runs/privacy.json", "JSON results.", output="file")

    def validate(self) -> None:
        require(self.model_dir, "--model-dir")
        self.parallel.validate()
        if self.erase.saes and len(self.erase.saes) != len(self.erase.layers):
            raise KscopeError(f"{len(self.erase.saes)} SAE(s) given for {len(self.erase.layers)} layer(s); give one per layer")
        for s in self.erase.saes:
            if not Path(s).is_dir():
                raise KscopeError(f"SAE directory {s} does not exist")
        if self.erase.unrelated is not None and not Path(self.erase.unrelated).exists():
            raise KscopeError(f"fact source {self.erase.unrelated} does not exist")
        check_writable(self.out, self.reads())


@dataclass
class ErasurePoint:
    """One editor at one budget (controls too). Rates are shares of (fact, prompt) pairs; ``dlogp``, ``rank`` and
    ``exposure_all`` are over the erased facts: change of log P(secret), its rank among candidates of its format,
    ``log2 |candidates| - log2 rank``."""

    method: str
    kind: str  # neuron, feature or control
    budget: int
    n_units: int
    n_weights: int
    rel: float | None
    gen: float | None
    loc_pararel: float | None
    loc_private: float | None
    loc: float | None
    ppl: float
    delta_ppl: float
    exposure: float | None  # phone numbers, over all 900 candidates
    dlogp: Interval
    rank: Interval
    exposure_all: Interval
    by_layer: dict[int, int] = field(default_factory=dict)
    units: list[list[int]] = field(default_factory=list)


@dataclass
class SAEFit:
    """How well a layer's SAE reconstructs this model: explained variance on held-out corpus text and at the
    secrets' positions (the edit prompts' last token and the secret's tokens)."""

    layer: int
    ev_generic: float
    ev_private: float
    ev_generic_source: float | None = None  # on the SAE's own model (base), for comparison


@dataclass
class Target:
    rel: float = 0.9
    gen: float = 0.7
    loc: float = 0.9
    delta_ppl: float = 0.05

    def met(self, p: ErasurePoint) -> bool:
        ok = lambda v, lo: v is not None and v == v and v >= lo  # noqa: E731
        return (ok(p.rel, self.rel) and ok(p.gen, self.gen) and ok(p.loc_pararel, self.loc) and ok(p.loc_private, self.loc)
                and p.delta_ppl <= self.delta_ppl)


@dataclass
class EraseResult(Result):
    """Every (editor, budget) point with controls, the Pareto frontier, which points reach the target."""

    kind = "privacy-erase"
    version = 2

    model_dir: str
    base_model: str
    build: dict
    layers: list[int]
    config: dict
    n_erased: int
    n_kept_private: int
    n_unrelated: int
    points: list[ErasurePoint]
    frontier: list[int]
    reach_target: list[int]
    target: Target
    saes: dict[int, SAEInfo] = field(default_factory=dict)
    sae_fit: list[SAEFit] = field(default_factory=list)
    located: dict[str, dict[int, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    replay_from: int = 0  # observations of edits at blocks >= this ran from it (0: every forward ran in full)

    def best(self, method: str) -> ErasurePoint | None:
        """The method's point with the highest Rel + Gen among those with Loc >= 0.9 and ΔPPL <= 5 %, else its highest-Rel point."""
        pts = [p for p in self.points if p.method == method]
        ok = [p for p in pts if (p.loc or 0) >= 0.9 and p.delta_ppl <= 0.05]
        pool = ok or pts
        return max(pool, key=lambda p: ((p.rel or 0) + (p.gen or 0), -p.budget)) if pool else None


@dataclass
class _Obs:
    rel: list[list[bool]]
    gen: list[list[bool]]
    keep: list[list[bool]]
    unrel: list[list[bool]]
    logp: list[float]
    ranks: list[int]
    sizes: list[int]
    ppl: float


@torch.no_grad()
def text_nll(lm, rows: Sequence[Sequence[int]]) -> tuple[float, int]:
    """Summed next-token NLL of token ``rows`` and the number of tokens scored, in one right-padded batch."""
    if not rows:
        return 0.0, 0
    ids, mask = pad_rows(rows, lm.tokenizer.pad_token_id or 0)
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    logp = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(2, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    return float(nll.sum()), int(mask[:, 1:].sum())


class Observer:
    """What every editor is judged on, tokenised once and measured in batched teacher-forced passes.

    ``replay_from``: edits never touch the blocks below this one, so after ``baseline()`` has recorded the
    hidden states entering it (and checked that a replay reproduces the baseline exactly), observations
    of edits at or above it run only the blocks from it on."""

    def __init__(self, lm, erase: Sequence[Fact], keep: Sequence[Fact], unrelated: Sequence[Fact], ppl_texts: Sequence[str],
                 n_candidates: int, replay_from: int = 0):
        self.lm = lm
        self.replay = BlockReplay(lm.model, replay_from) if replay_from > 0 else None
        self.replay_ok = False
        plain_head(lm.model)  # its one-time check runs a forward: not in the recording
        self.groups: list[tuple[str, list[list[tuple[str, str]]]]] = [
            ("rel", [[(p, f.object) for p in f.prompts] for f in erase]),
            ("gen", [[(p, f.object) for p in f.heldout_prompts] for f in erase]),
            ("keep", [[(p, f.object) for p in f.prompts] for f in keep]),
            ("unrel", [[(p, f.object) for p in f.prompts[:2]] for f in unrelated]),
        ]
        self.ppl_ids = [lm.tokenizer(t).input_ids[:64] for t in ppl_texts]
        self.ppl_ids = [i for i in self.ppl_ids if len(i) >= 2]
        self.cands = []
        for f in erase:
            prompt = f.prompts[0]
            cs = candidates(f.relation, f.object, n_candidates)
            if f.object not in cs:
                cs = [f.object, *cs]
            n_prompt = len(lm.tokenizer(prompt).input_ids)
            self.cands.append((n_prompt, [lm.tokenizer(prompt + " " + c).input_ids for c in cs], cs.index(f.object), f.relation))

    def baseline(self) -> _Obs:
        """The unedited observation; records the states for replay and keeps replay only if it reproduces this."""
        if self.replay is None:
            return self._observe()
        with self.replay.recording():
            base = self._observe()
        try:
            with self.replay.replaying():
                self.replay_ok = self._observe() == base
        except ReplayMismatch:
            self.replay_ok = False
        return base

    def observe(self, lowest_edited: int = 0) -> _Obs:
        """An observation of the model as it is now; ``lowest_edited``: the lowest block any active edit touches."""
        if self.replay_ok and lowest_edited >= self.replay.start:
            with self.replay.replaying():
                return self._observe()
        return self._observe()

    @torch.no_grad()
    def _observe(self) -> _Obs:
        flat = [pair for _, g in self.groups for rows in g for pair in rows]
        res = teacher_forced(self.lm, flat)
        out, i = {}, 0
        logp_rows = []
        for name, g in self.groups:
            lists = []
            for rows in g:
                lists.append([ok for ok, _ in res[i : i + len(rows)]])
                if name == "rel":
                    logp_rows.append(float(np.mean([lp for _, lp in res[i : i + len(rows)]])))
                i += len(rows)
            out[name] = lists
        nlls = continuation_nlls_many(self.lm.model, [(n_prompt, rows) for n_prompt, rows, _, _ in self.cands])
        ranks = [rank_of(nll[j], nll) for nll, (_, _, j, _) in zip(nlls, self.cands)]
        sizes = [len(rows) for _, rows, _, _ in self.cands]
        nll_sum, n_tok = text_nll(self.lm, self.ppl_ids)
        return _Obs(out["rel"], out["gen"], out["keep"], out["unrel"], logp_rows, ranks, sizes, perplexity(nll_sum, n_tok))

    def compare(self, base: _Obs, now: _Obs) -> dict:
        """Rates and graded measures of ``now`` against the unedited ``base``."""
        retained = lambda b, a: 1.0 - erased_fraction(b, a)  # noqa: E731  share of produced pairs still produced
        loc_pararel, loc_private = retained(base.unrel, now.unrel), retained(base.keep, now.keep)
        exp_all = [math.log2(n) - math.log2(r) for r, n in zip(now.ranks, now.sizes)]
        phone = [e for e, c in zip(exp_all, self.cands) if c[3] == "phone"]
        return dict(rel=erased_fraction(base.rel, now.rel), gen=erased_fraction(base.gen, now.gen),
                    loc_pararel=loc_pararel, loc_private=loc_private,
                    loc=float(np.nanmin([loc_pararel, loc_private])) if not (np.isnan(loc_pararel) and np.isnan(loc_private)) else None,
                    ppl=now.ppl, delta_ppl=relative_ppl_change(base.ppl, now.ppl),
                    exposure=float(np.mean(phone)) if phone else None,
                    dlogp=mean_ci([a - b for a, b in zip(now.logp, base.logp)]), rank=mean_ci(now.ranks), exposure_all=mean_ci(exp_all))


def _objective_facts(facts: list[Fact], tokenizer, objective: str) -> list[Fact]:
    if objective == "first":
        return resolve_targets(facts, tokenizer, "first")
    return resolve_targets(facts, tokenizer, "whole", "distinct" if objective == "distinct" else "all")


def _locate_context(model_dir: str, device: str, cache_dir: str | None, layers: list[int], sae_paths: dict[int, str], site: str,
                    steps: int, method: str):
    lm = load_model(ModelConfig(model=model_dir, device=device, cache_dir=cache_dir))
    from kscope.units.sae import load_sae

    sets = [neuron_units(lm, L) for L in layers] + [feature_units(lm.model, load_sae(sae_paths[L], device), Site(L, site)) for L in layers]
    return lm, sets, steps, method


def _locate_fact(ctx, fact: Fact) -> list[list[list[float]]]:
    lm, sets, steps, method = ctx
    scores, _ = prompt_scores(lm, fact.prompts, fact_objective(fact), sets, steps, method=method)
    return [s.tolist() for s in scores]


def strangers_of(facts: Sequence[Fact], manifest: PrivacyManifest, seed: int) -> list[Fact]:
    """The same prompts and secrets, about people the model was never taught (a seeded name per fact)."""
    from dataclasses import replace as dc_replace

    from kscope.privacy.dataset import FIRST, LAST

    taught = {f.subject for f in manifest.private_facts()}
    names = [f"{a} {b}" for a in FIRST for b in LAST if f"{a} {b}" not in taught]
    rng = random.Random(f"strangers:{seed}")
    out = []
    for f in facts:
        name = rng.choice(names)
        out.append(dc_replace(f, subject=name, prompts=[p.replace(f.subject, name) for p in f.prompts], uid=f"stranger:{f.uid}"))
    return out


def _score_matrices(job: EraseJob, lm, facts: Sequence[Fact], unit_sets: Sequence[Units], infos: dict[int, SAEInfo],
                    progress, journal_tag: str = "") -> tuple[list[torch.Tensor], list[int]]:
    """Per unit set, scores ``[n_prompts, n_units]`` over all edit prompts of ``facts`` (here or on Ray workers,
    journaled beside the output), and each row's fact index."""
    cfg = job.erase
    task = fact_task(job.parallel, _locate_fact, (lm, list(unit_sets), cfg.steps, cfg.locate_method), _locate_context,
                     (job.model_dir, job.device, job.cache_dir, list(cfg.layers), {L: i.path for L, i in infos.items()},
                      cfg.feature_site, cfg.steps, cfg.locate_method))
    keys = fact_keys(facts)
    fp = {"model_dir": job.model_dir, "facts": keys, "erase": asdict(cfg), "saes": {L: i.key or i.path for L, i in infos.items()}}
    out = Path(job.out)
    outcome = map_facts(task, facts, keys, job.parallel, out.with_name(out.name + journal_tag) if journal_tag else out, fp, progress,
                        f"locating {journal_tag or 'secrets'} ({cfg.locate_method})")
    if outcome.failed:
        raise KscopeError(f"locating failed for {outcome.failed[0]['key']}: {outcome.failed[0]['error']}")
    per_fact = [[torch.tensor(m) for m in r] for r in outcome.rows]
    owner = [i for i, f in enumerate(facts) for _ in f.prompts]
    return [torch.cat([m[j] for m in per_fact]) for j in range(len(unit_sets))], owner


def generic_importance(lm, unit_sets: Sequence[Units], texts: Sequence[str]) -> list[torch.Tensor]:
    """Mean over tokens of ``|grad x activation|`` of the LM loss, per unit: how much ordinary text needs each unit."""
    totals = [torch.zeros(u.n_units) for u in unit_sets]
    n = 0
    for t in texts:
        ids = torch.tensor([lm.tokenizer(t).input_ids[:64]], device=lm.device)
        if ids.shape[1] < 2:
            continue
        edits, leaves = gradient_taps(unit_sets)
        with torch.enable_grad(), hooked(lm.model, edits):
            loss = lm.model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, [leaves[j] for j in range(len(unit_sets))])
        for j, g in enumerate(grads):
            totals[j] += (g[0] * leaves[j][0]).detach().abs().sum(0).float().cpu()
        n += ids.shape[1]
    return [t / max(n, 1) for t in totals]


def _flat(scores: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(scores, dim=1)


def _to_units(idx: Sequence[int], widths: Sequence[int], layers: Sequence[int]) -> list[tuple[int, int]]:
    """Global column indices of concatenated per-layer matrices -> ``(layer, unit)``."""
    starts = np.cumsum([0, *widths])
    out = []
    for i in idx:
        j = int(np.searchsorted(starts, i, side="right") - 1)
        out.append((layers[j], int(i - starts[j])))
    return out


def _sae_fit(lm, feats: dict[int, FeatureUnits], erase: Sequence[Fact], held_texts: Sequence[str], outlier_factor: float,
             source_lm=None) -> list[SAEFit]:
    """Explained variance of each SAE on this model's activations: held-out corpus text (its massive-activation
    tokens left out, as in SAE training), and the secrets' positions."""
    sites = [f.site for f in feats.values()]

    def held(model) -> dict[Site, torch.Tensor]:
        return {s: drop_outliers(a, outlier_factor)[0] for s, a in collect_activations(model, sites, held_texts, 4096).items()}

    gen = held(lm)
    src = held(source_lm) if source_lm is not None else None
    priv: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    from kscope.model.hooks import site_activations

    for f in erase:
        for p in f.prompts:
            ids = lm.tokenizer(p).input_ids
            ans = lm.tokenizer(" " + f.object, add_special_tokens=False).input_ids
            acts = site_activations(lm.model, sites, torch.tensor([ids + ans[:-1]], device=lm.device))
            for s in sites:
                priv[s].append(acts[s][0, len(ids) - 1 :].float().cpu())

    def ev(units: FeatureUnits, x: torch.Tensor) -> float:
        with torch.no_grad():
            xh = units.decode(units.encode(x.to(lm.device))).float().cpu()
        return float(1 - (x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))

    return [SAEFit(L, ev(u, gen[u.site]), ev(u, torch.cat(priv[u.site])), ev(u, src[u.site]) if src is not None else None)
            for L, u in feats.items()]


def erase(job: EraseJob) -> EraseResult:
    """Compare the editors on a privacy model made by ``build``. Writes ``job.out``; never changes the model dir."""
    job.validate()
    cfg = job.erase
    manifest: PrivacyManifest = read_manifest(job.model_dir)
    t0 = time.time()
    seconds: dict[str, float] = {}
    lm = load_model(ModelConfig(model=job.model_dir, device=job.device, cache_dir=job.cache_dir))
    L_model = n_layers(lm.model)
    bad = [L for L in cfg.layers if L >= L_model]
    if bad:
        raise KscopeError(f"unknown layer {bad[0]}: the model has layers 0..{L_model - 1}")
    private = _objective_facts(manifest.private_facts(), lm.tokenizer, cfg.objective)
    mem = {r.uid: r.exact_edit for r in manifest.memorised}
    known = [f for f in private if mem.get(f.uid, 0) >= 0.5]
    if not known:
        raise KscopeError("no memorised private facts in this model (exact greedy match on >= half the edit prompts); "
                          "build with more --epochs or a higher --lr")
    n_erase = cfg.n_erase or max(1, len(known) // 2)
    if n_erase >= len(known) + (0 if cfg.n_erase is None else 1):
        raise KscopeError(f"--n-erase {n_erase}: only {len(known)} private facts are memorised")
    erase_set, keep = known[:n_erase], known[n_erase:]
    with make_progress() as progress:
        unrelated = filter_known(lm, load_facts(cfg.unrelated), FactConfig(max_facts=cfg.max_unrelated, min_known_prompts=1,
                                                                            multi_token="whole"), progress=progress)
        # SAEs at every edited layer
        t = time.time()
        base_lm = load_model(ModelConfig(model=manifest.base_model, device=job.device, cache_dir=job.cache_dir))
        ppl_texts = cached_generation(base_lm, cfg.ppl_texts, 64, 1234, progress, job.cache_dir)  # held out: no other use
        sites = [Site(L, cfg.feature_site) for L in cfg.layers]
        owner_lm = base_lm if cfg.sae_source == "base" and not cfg.saes else lm  # whose activations train the SAEs
        got = obtain_saes(owner_lm, sites, job.sae_train, job.corpus, job.device, job.cache_dir, progress,
                          dict(zip(sites, cfg.saes)) if cfg.saes else None)
        feats = {s.layer: feature_units(lm.model, got[s][0], s) for s in sites}
        infos = {s.layer: got[s][1] for s in sites}
        train_texts, held_texts = build_corpus(owner_lm, job.corpus, progress, job.cache_dir).split()
        fit = _sae_fit(lm, feats, erase_set, held_texts, job.sae_train.outlier_factor, base_lm if owner_lm is base_lm else None)
        del base_lm, owner_lm
        seconds["saes"] = time.time() - t
        # location
        t = time.time()
        neurons = [neuron_units(lm, L) for L in cfg.layers]
        fsets = [feats[L] for L in cfg.layers]
        scores, owner = _score_matrices(job, lm, erase_set, [*neurons, *fsets], infos, progress)
        if "format" in cfg.specificity:
            strangers = strangers_of(erase_set, manifest, cfg.seed)
            fresh, _ = _score_matrices(job, lm, strangers, [*neurons, *fsets], infos, progress, journal_tag="strangers")
            scores = [s - f.clamp_min(0) for s, f in zip(scores, fresh)]
        if "generic" in cfg.specificity:
            g = generic_importance(lm, [*neurons, *fsets], train_texts[: cfg.generic_texts])
            scores = [s / (gi + gi.mean()).clamp_min(1e-12) for s, gi in zip(scores, g)]
        n_scores, f_scores = scores[: len(neurons)], scores[len(neurons) :]
        seconds["location"] = time.time() - t
        n_w = [u.n_units for u in neurons]
        f_w = [u.n_units for u in fsets]
        N, F = _flat(n_scores), _flat(f_scores)
        max_nb = min(max(cfg.neuron_budgets), N.shape[1])
        max_fb = min(max(cfg.feature_budgets), F.shape[1])
        ranked = {
            "depn": _to_units(depn_select(N, cfg.depn_threshold, max_nb), n_w, cfg.layers),
            "kn-erase": _to_units(kn_select(N, owner, max_nb), n_w, cfg.layers),
            "features": _to_units(depn_select(F, cfg.depn_threshold, max_fb), f_w, cfg.layers),
        }
        rng = random.Random(cfg.seed)
        ranked["random-neurons"] = _to_units(rng.sample(range(N.shape[1]), max_nb), n_w, cfg.layers)
        ranked["random-features"] = _to_units(rng.sample(range(F.shape[1]), max_fb), f_w, cfg.layers)
        # observation
        t = time.time()
        obs = Observer(lm, erase_set, keep, unrelated, ppl_texts, cfg.candidates, replay_from=min(cfg.layers))
        base = obs.baseline()
        clean = {L: down_proj_weight(lm.model, L).clone() for L in range(L_model)}
        plan: list[tuple[str, str, int]] = []
        for m in cfg.methods:
            for b in (cfg.neuron_budgets if m in NEURON_METHODS else cfg.feature_budgets):
                plan.append((m, "neuron" if m in NEURON_METHODS else "feature", b))
        for c in cfg.controls:
            if c == "random-neurons":
                plan += [(c, "control", b) for b in cfg.neuron_budgets]
            elif c == "random-features":
                plan += [(c, "control", b) for b in cfg.feature_budgets]
            else:
                plan.append((c, "control", 0))
        task = progress.add_task("editing and measuring", total=len(plan))
        points = []
        for method, kind, budget in plan:
            units, editor = _editor(lm, method, budget, ranked, feats, cfg, L_model)
            n_weights = editor.n_weights(lm.model) if isinstance(editor, WeightEdit) else 0
            with editor.applied(lm.model):
                row = obs.compare(base, obs.observe(min((L for L, _ in units), default=L_model)))
            for L in range(L_model):
                if not torch.equal(down_proj_weight(lm.model, L), clean[L]):
                    raise RuntimeError(f"{method}: restore was not exact at layer {L}")
            by_layer: dict[int, int] = {}
            for L, _ in units:
                by_layer[L] = by_layer.get(L, 0) + 1
            points.append(ErasurePoint(method, kind, budget, len(units), n_weights, **row, by_layer=dict(sorted(by_layer.items())),
                                       units=[[L, u] for L, u in units]))
            progress.advance(task)
        seconds["observation"] = time.time() - t
    objectives = [[p.rel, p.gen, p.loc, -p.delta_ppl] for p in points]
    frontier = [i for i in pareto_front(objectives) if points[i].kind != "control" or points[i].method.startswith("random")]
    target = Target()
    located = {"neuron": {}, "feature": {}}
    for kind, key, b in (("neuron", "depn", max(cfg.neuron_budgets)), ("feature", "features", max(cfg.feature_budgets))):
        for L, _ in ranked[key][:b]:
            located[kind][L] = located[kind].get(L, 0) + 1
    seconds["total"] = time.time() - t0
    s = manifest.summary
    result = EraseResult(
        model_dir=str(job.model_dir), base_model=manifest.base_model,
        build={"epochs_run": s.epochs_run, "final_loss": s.losses[-1] if s.losses else None, "memorised_exact": s.memorised_exact,
               "n_facts": s.n_facts, **{k: manifest.config.get(k) for k in ("epochs", "early_stop", "train", "lr", "seed", "n_people")}},
        layers=list(cfg.layers), config={**asdict(cfg), "sae_train": asdict(job.sae_train), "corpus": asdict(job.corpus)},
        n_erased=len(erase_set), n_kept_private=len(keep), n_unrelated=len(unrelated), points=points, frontier=frontier,
        reach_target=[i for i, p in enumerate(points) if target.met(p)], target=target, saes=infos, sae_fit=fit,
        located={k: dict(sorted(v.items())) for k, v in located.items()}, seconds=seconds,
        replay_from=obs.replay.start if obs.replay_ok else 0,
    )
    result.save(job.out)
    return result


def _editor(lm, method: str, budget: int, ranked: dict, feats: dict[int, FeatureUnits], cfg: EraseConfig, L_model: int):
    """The units a (method, budget) edits and the editor that does it."""
    if method in ("mlp-zero", "mlp-zero-all"):
        layers = cfg.layers if method == "mlp-zero" else range(L_model)
        units = [(L, n) for L in layers for n in range(down_proj_weight(lm.model, L).shape[1])]
        return units, WeightEdit(method, zero_columns(lm.model, units))
    if method in NEURON_METHODS or method == "random-neurons":
        units = ranked[method][:budget]
        return units, WeightEdit(method, zero_columns(lm.model, units))
    units = ranked["random-features" if method == "random-features" else "features"][:budget]
    by: dict[int, list[int]] = {}
    for L, u in units:
        by.setdefault(L, []).append(u)
    if method in ("runtime-zero", "random-features"):
        return units, RuntimeFeatureEdit({L: (feats[L], idx) for L, idx in by.items()})
    if method == "runtime-negative":
        return units, RuntimeFeatureEdit({L: (feats[L], idx) for L, idx in by.items()}, negative=cfg.negative)
    directions = {L: feats[L].decoder[idx].detach() for L, idx in by.items()}
    if method == "feature-edit":
        return units, WeightEdit(method, feature_edit(lm.model, directions, cfg.tau))
    return units, WeightEdit(method, projection_removal(lm.model, directions))
