"""How faithful is a decomposition of a site? SAE vs PCA vs ICA vs random directions.

For each decomposition (all at the SAE's L0): reconstruction MSE / explained variance on held-out
activations, knowledge preservation (answer probability of known facts when the site is replaced by
its reconstruction, relative to the clean model) and ΔProb when each fact's top-k units (by IG) are
ablated with the error term kept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from kscope.analyses.common import AnalysisConfig, save_outputs, setup
from kscope.config import MAX_STEPS, MAX_TOKENS, Config, nested, option
from kscope.errors import KscopeError
from kscope.facts import Fact
from kscope.locate.attribution import AttributionConfig, attribute_fact
from kscope.locate.delta_prob import DeltaProbConfig, aggregate, fact_delta_prob
from kscope.model.readout import fact_probs
from kscope.plots import pyplot, save_figure, unit_color
from kscope.progress import make_progress
from kscope.results import Result
from kscope.stats import Interval, mean_ci
from kscope.units.base import Units
from kscope.units.corpus import build_corpus, collect_activations
from kscope.units.training import drop_outliers
from kscope.units.decompositions import ica_units, pca_units, random_units
from kscope.units.provision import SAEInfo


@dataclass
class FaithfulnessConfig(Config):
    """Compare the SAE with PCA, ICA and random directions at one site."""

    fit_tokens: int = option(20_000, "Activation tokens (from the corpus's training texts) to fit PCA/ICA on.", min=10, max=MAX_TOKENS)
    eval_tokens: int = option(10_000, "Held-out activation tokens (texts no decomposition was fitted on) to score all of them on.", min=10,
                             max=MAX_TOKENS)
    ks: list[int] = option(help="Top-k units ablated per fact.", factory=lambda: [1, 5, 10], min=1, unique=True)
    ica_iter: int = option(300, "FastICA iterations.", min=1)
    attribution_steps: int = option(10, "IG steps when ranking units for ablation.", min=1, max=MAX_STEPS)


@dataclass
class Knowledge:
    """The site replaced by its reconstruction: mean ``P_recon / P_clean`` over facts, share of prompts still top-1."""

    prob_ratio: Interval
    top1: float


@dataclass
class DecompositionScores:
    n_units: int
    mse: float
    explained_variance: float
    l0: float
    knowledge: Knowledge
    ablation: dict[int, Interval]
    explained_variance_fit: float | None = None  # on tokens of the texts it was fitted on (SAE: its training texts)


@dataclass
class FaithfulnessResult(Result):
    """Reconstruction, knowledge preservation and top-k ablation of each decomposition of one site."""

    kind = "faithfulness"

    model: str
    layer: int
    site: str
    n_facts: int
    n_eval_tokens: int
    config: dict
    decompositions: dict[str, DecompositionScores]
    seconds: float
    sae: SAEInfo | None = None
    heldout: str = ""  # what the evaluation tokens are, and whether the SAE is known never to have seen them


@dataclass
class FaithfulnessJob(AnalysisConfig):
    """SAE vs PCA vs ICA vs random directions: reconstruction, knowledge preservation, top-k ablation ΔProb."""
    output_name = "faithfulness"

    faithfulness: FaithfulnessConfig = nested(FaithfulnessConfig)
    located: str | None = option(None, "Not read: faithfulness ranks every decomposition's units itself.", cli=False)

    def validate(self) -> None:
        if self.located:
            raise KscopeError("faithfulness ranks the units of every decomposition (PCA, ICA, random too) itself; it reads no "
                              "located units: leave located out")
        super().validate()


def reconstruction_scores(units: Units, acts: torch.Tensor, batch: int = 4096) -> dict:
    """``{"mse", "explained_variance", "l0"}`` of ``decode(encode(x))`` on ``acts`` ``[N, d]`` (pure)."""
    err = tot = 0.0
    l0 = 0.0
    mean = acts.mean(0, keepdim=True)
    with torch.no_grad():
        for i in range(0, acts.shape[0], batch):
            x = acts[i : i + batch]
            u = units.encode(x)
            xh = units.decode(u).float()
            err += float((x - xh).pow(2).sum())
            tot += float((x - mean).pow(2).sum())
            l0 += float((u != 0).sum())
    n = acts.shape[0]
    return {"mse": err / (n * acts.shape[1]), "explained_variance": 1 - err / max(tot, 1e-12), "l0": l0 / n}


def knowledge_preservation(lm, units: Units, facts: Sequence[Fact], p_clean: Sequence[np.ndarray]) -> Knowledge:
    """Answer probability with the site replaced by its reconstruction (no error term), at every position.

    Returns the mean ratio ``P_recon / P_clean`` over facts (CI) and the fraction still top-1.
    """
    recon = lambda x: units.decode(units.encode(x)).to(x.dtype)  # noqa: E731
    ratios, top1 = [], []
    for f, pc in zip(facts, p_clean):
        p, r = fact_probs(lm.model, lm.tokenizer, f, edits={units.site: recon}, positions="all")
        ratios.append(float(np.mean(p.numpy() / np.maximum(pc, 1e-12))))
        top1.append(float((r == 0).float().mean()))
    return Knowledge(mean_ci(ratios), float(np.mean(top1)))


def build_decompositions(sae_units: Units, acts: torch.Tensor, cfg: FaithfulnessConfig, seed: int = 0) -> list[Units]:
    """PCA, ICA and random directions of the site's width, sparsified to the SAE's L0."""
    site = sae_units.site
    with torch.no_grad():
        k = max(1, int(round(float((sae_units.encode(acts[:2048]) != 0).sum(-1).float().mean()))))
    d = acts.shape[1]
    return [
        pca_units(site, acts, d, k),
        ica_units(site, acts, d, k, seed=seed, max_iter=cfg.ica_iter),
        random_units(site, d, d, k, seed=seed, mean=acts.mean(0)),
    ]


def run_faithfulness(lm, sae_units: Units, fit: torch.Tensor, ev: torch.Tensor, facts: Sequence[Fact], cfg: FaithfulnessConfig,
                     progress=None) -> tuple[dict[str, DecompositionScores], int, float]:
    """Scores per decomposition (the SAE and the baselines), the number of held-out tokens and the seconds taken.
    ``fit``: ``[N, d]`` site activations the baselines are fitted on; ``ev``: held-out activations, scored for all."""
    t0 = time.time()
    decomps = [sae_units] + build_decompositions(sae_units, fit, cfg)
    p_clean = [fact_probs(lm.model, lm.tokenizer, f)[0].numpy() for f in facts]
    acfg = AttributionConfig(steps=cfg.attribution_steps, top_k=max(cfg.ks))
    icfg = DeltaProbConfig(ks=list(cfg.ks), ops=["suppress"])
    task = progress.add_task("faithfulness", total=(1 + len(decomps)) * len(facts)) if progress else None
    tops = []  # per fact, per decomposition: ranked units (all decompositions share each IG pass)
    for f in facts:
        tops.append([att.top for att in attribute_fact(lm, f, decomps, acfg)])
        if progress:
            progress.advance(task)
    rows = {}
    for d, units in enumerate(decomps):
        rec = reconstruction_scores(units, ev)
        rec_fit = reconstruction_scores(units, fit[: ev.shape[0]])
        per_fact = []
        for f, pc, top in zip(facts, p_clean, tops):
            per_fact.append(fact_delta_prob(lm, f, units, top[d], icfg, pc))
            if progress:
                progress.advance(task)
        rows[units.kind] = DecompositionScores(units.n_units, rec["mse"], rec["explained_variance"], rec["l0"],
                                               knowledge_preservation(lm, units, facts, p_clean),
                                               aggregate(per_fact).get("suppress", {}), rec_fit["explained_variance"])
    return rows, int(ev.shape[0]), time.time() - t0


def plot_faithfulness(result: FaithfulnessResult, path) -> None:
    """Bar chart: explained variance, knowledge preservation and top-k ablation ΔProb per decomposition."""
    plt = pyplot()
    rows = result.decompositions
    names = list(rows)
    kmax = max(next(iter(rows.values())).ablation) if rows else 10
    panels = [
        ("explained variance", [rows[n].explained_variance for n in names]),
        ("P(answer) recon / clean", [rows[n].knowledge.prob_ratio.mean for n in names]),
        (f"ΔProb, top-{kmax} ablated", [rows[n].ablation[kmax].mean if kmax in rows[n].ablation else np.nan for n in names]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    colors = [unit_color(n) for n in names]
    for ax, (title, vals) in zip(axes, panels):
        ax.bar(["SAE" if n == "feature" else n.upper() if n != "random" else "random" for n in names],
               [np.nan if v is None else v for v in vals], color=colors)
        ax.set_title(title)
        ax.axhline(0, color="k", lw=0.5)
    fig.suptitle(f"Decompositions of {result.site} ({result.n_facts} facts, L0 matched)")
    save_figure(fig, path)


def run_faithfulness_job(cfg: FaithfulnessJob) -> FaithfulnessResult:
    with make_progress() as progress:
        s = setup(cfg, progress, need_tops=False)
        corpus = build_corpus(s.lm, cfg.corpus, progress, cfg.model.cache_dir)
        train_texts, held_texts = corpus.split()
        fit = collect_activations(s.lm, s.features.site, train_texts, cfg.faithfulness.fit_tokens, cfg.corpus.seq_len, progress=progress)
        ev = collect_activations(s.lm, s.features.site, held_texts, cfg.faithfulness.eval_tokens, cfg.corpus.seq_len, progress=progress)
        (fit, _), (ev, _) = drop_outliers(fit, cfg.sae_train.outlier_factor), drop_outliers(ev, cfg.sae_train.outlier_factor)  # the SAEs' rule
        rows, n_eval, secs = run_faithfulness(s.lm, s.features, fit, ev, s.facts, cfg.faithfulness, progress)
    same = (s.sae.corpus or {}).get("identity") == corpus.identity
    note = (f"{n_eval} tokens of the corpus's held-out texts ({corpus.sources}); PCA/ICA fitted on its training texts; "
            + ("the SAE was trained on the same corpus's training texts, so no decomposition saw these tokens"
               if same else "the SAE was not trained on this corpus, so whether it saw these tokens is unknown"))
    result = FaithfulnessResult(s.lm.name, cfg.layer, s.features.site.name, len(s.facts), n_eval, asdict(cfg.faithfulness),
                                rows, secs, s.sae, note)
    return save_outputs(cfg.out_dir, cfg.output_name, result, lambda path: plot_faithfulness(result, path))
