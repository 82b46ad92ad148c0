"""Interpretability score (IS): explain a unit from its top-activating contexts, simulate its
activations from the explanation on held-out contexts, IS = Pearson r(simulated, true).

Pearson r over every token favours sparse units: a TopK feature's exact zeros are easy to predict, a dense neuron's
background activity is not. Beside it, the **detection** score is sparsity-robust: the AUROC with which the simulated
activation (its maximum over a window) tells the held-out top-activating windows from as many random held-out windows,
a balanced classification as in EleutherAI's delphi detection scorer (``delphi/scorers/classifier/detection.py``:
activating against non-activating examples; ``delphi/log/result_analysis.py``: AUC and class-balanced accuracy).

Two explainer/simulators:
- ``TokenExplainer`` (offline default, a *proxy*): the explanation is the tokens at which the unit
  fires most (weighted by its mean activation there); the simulation predicts, at each token, the
  weight of that token (0 if absent). It measures how much of a unit's behaviour is "fires on these
  tokens", not a natural-language explanation.
- ``LLMExplainer``: any OpenAI-compatible chat endpoint (``--llm-url``), in the spirit of Bills et al.
  2023: the LLM writes an explanation from marked top contexts, then scores held-out contexts 0–10.

Every unit set is scored the same way: neurons, features and the same-site baselines the job has; intervals are
cluster-robust (CR2) over facts, facts that share a scored unit counting as one cluster.
"""

from __future__ import annotations

import json
import random
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from kscope.analyses.common import AnalysisConfig, AnalysisResult, save_outputs, setup
from kscope.analyses.monosemanticity import auroc
from kscope.config import MAX_LENGTH, MAX_TEXTS, Config, nested, option
from kscope.errors import KscopeError
from kscope.model.hooks import site_activations
from kscope.model.readout import pad_rows
from kscope.net import check_openai_url
from kscope.plots import pyplot, save_figure, unit_color
from kscope.progress import make_progress
from kscope.stats import Interval, cluster_robust
from kscope.units.base import Units
from kscope.units.corpus import build_corpus
from kscope.units.provision import BaselineConfig, SAEInfo


@dataclass
class InterpretConfig(Config):
    """Top-activating contexts, explanation and simulation."""

    n_contexts: int = option(600, "Text windows scanned for activations.", flag="contexts", min=4, max=MAX_TEXTS)
    window: int = option(24, "Tokens per window.", min=4, max=MAX_LENGTH)
    top_contexts: int = option(20, "Top-activating windows shown to the explainer.", min=1)
    heldout_frac: float = option(0.3, "Windows held out for simulation.", min=0.05, max=0.95)
    explanation_tokens: int = option(10, "Tokens in the offline explanation.", min=1)
    llm_url: str | None = option(None, "OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1) for the LLM explainer.")
    llm_model: str = option("gpt-4o-mini", "Model name sent to the LLM endpoint.")
    seed: int = option(0, "Sampling seed.")


@dataclass
class UnitIS:
    """One unit's interpretability score: its explanation, Pearson r on held-out windows, windows scored, peak activation;
    ``detection``: the balanced top-vs-random window AUROC; ``facts``: the facts whose top unit it is."""

    unit: int
    explanation: Any
    score: float
    n_eval: int
    fires: float
    sign: float = 1.0  # -1: oriented, the unit fires most strongly negative
    detection: float | None = None
    facts: list[str] = field(default_factory=list)


@dataclass
class UnitSetIS:
    """``summary``: Pearson r, ``detection``: the detection AUROC, each a mean with its CR2 interval over ``n_clusters``
    clusters of facts (facts sharing a scored unit are one cluster; each unit counts once)."""

    units: str
    explainer: str
    rows: list[UnitIS]
    summary: Interval
    detection: Interval | None = None
    n_clusters: int = 0


@dataclass
class InterpretResult(AnalysisResult):
    """Interpretability score of each fact's top neurons and top features."""

    kind = "interpret"
    version = 2

    results: dict[str, UnitSetIS]
    sae: SAEInfo | None = None


@dataclass
class InterpretJob(AnalysisConfig):
    """Interpretability score of the top fact neurons vs top fact features (offline token proxy, or an LLM)."""
    output_name = "interpret"

    interpret: InterpretConfig = nested(InterpretConfig)
    per_fact: int = option(1, "Top units per fact to score.", min=1)
    baselines: BaselineConfig = nested(BaselineConfig, baselines=[])

    def validate(self) -> None:
        super().validate()
        if self.interpret.llm_url:
            check_openai_url(self.interpret.llm_url, "--llm-url", self.interpret.llm_model)


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson r; 0 when either side is constant (no linear information)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


@dataclass
class ActivationRecords:
    """Token windows and a unit set's activations on them. ``tokens``: ``[W, T]``; ``acts``: ``[W, T, n_units]`` (sparse units kept dense)."""

    tokens: list[list[str]]
    acts: torch.Tensor


def _windows(tokenizer, texts: Sequence[str], cfg: InterpretConfig) -> list[list[int]]:
    windows: list[list[int]] = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True).input_ids
        windows.extend(ids[i : i + cfg.window] for i in range(0, len(ids), cfg.window) if len(ids[i : i + cfg.window]) >= 4)
        if len(windows) >= cfg.n_contexts:
            break
    return windows[: cfg.n_contexts]


@torch.no_grad()
def record_many(lm, picks: Sequence[tuple[Units, Sequence[int]]], texts: Sequence[str], cfg: InterpretConfig,
                progress=None) -> list[ActivationRecords]:
    """For each ``(units, unit_idx)``, the activations of those units at every token of up to ``n_contexts``
    windows of ``texts``; one forward pass per batch serves every unit set."""
    tok = lm.tokenizer
    windows = _windows(tok, texts, cfg)
    acts = [torch.zeros(len(windows), cfg.window, len(idx)) for _, idx in picks]
    idxs = [torch.as_tensor(list(idx), dtype=torch.long) for _, idx in picks]
    sites = list(dict.fromkeys(u.site for u, _ in picks))
    task = progress.add_task("activation records", total=len(windows)) if progress else None
    for s in range(0, len(windows), 32):
        part = windows[s : s + 32]
        ids, mask = pad_rows(part, tok.pad_token_id or 0, cfg.window)
        xs = site_activations(lm.model, sites, ids.to(lm.device), mask.to(lm.device))
        for j, (units, _) in enumerate(picks):
            if len(idxs[j]):
                acts[j][s : s + len(part)] = units.encode(xs[units.site]).float().cpu()[..., idxs[j]] * mask[..., None]
        if progress:
            progress.advance(task, len(part))
    tokens = [[tok.decode([i]) for i in w] for w in windows]
    return [ActivationRecords(tokens, a) for a in acts]


def record_activations(lm, units: Units, texts: Sequence[str], unit_idx: Sequence[int], cfg: InterpretConfig) -> ActivationRecords:
    """Activations of ``unit_idx`` at every token of up to ``n_contexts`` windows of ``texts``."""
    return record_many(lm, [(units, unit_idx)], texts, cfg)[0]


class Explainer(Protocol):
    def explain(self, contexts: list[list[str]], acts: list[list[float]]) -> object: ...

    def simulate(self, explanation: object, contexts: list[list[str]]) -> list[list[float]]: ...


class TokenExplainer:
    """Offline proxy: explanation = top tokens by mean activation at them; simulation = token lookup."""

    def __init__(self, n_tokens: int = 10):
        self.n_tokens = n_tokens

    def explain(self, contexts: list[list[str]], acts: list[list[float]]) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for toks, a in zip(contexts, acts):
            for t, v in zip(toks, a):
                sums.setdefault(t, []).append(v)
        mean = {t: float(np.mean(v)) for t, v in sums.items()}
        best = sorted(mean.items(), key=lambda kv: -kv[1])[: self.n_tokens]
        return {t: v for t, v in best if v > 0}

    def simulate(self, explanation: dict[str, float], contexts: list[list[str]]) -> list[list[float]]:
        return [[explanation.get(t, 0.0) for t in toks] for toks in contexts]


class LLMExplainer:
    """Explanation and simulation by an LLM behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, base_url: str, model: str, timeout: float = 60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout = model, timeout

    def _chat(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())["choices"][0]["message"]["content"]
        except (OSError, ValueError, LookupError, TypeError) as e:  # unreachable, HTTP error, not the OpenAI reply shape
            raise KscopeError(f"the LLM explainer at {self.url} failed: {type(e).__name__}: {e}") from None

    def explain(self, contexts: list[list[str]], acts: list[list[float]]) -> str:
        mx = max((max(a) for a in acts if a), default=1.0) or 1.0
        lines = []
        for toks, a in zip(contexts, acts):
            lines.append("".join(f"[[{t}]]" if v > 0.5 * mx else t for t, v in zip(toks, a)))
        prompt = ("A neuron in a language model fires on the tokens marked [[like this]] in these texts.\n"
                  + "\n".join(f"- {line}" for line in lines)
                  + "\nIn one short phrase, what does the neuron respond to? Answer with the phrase only.")
        return self._chat(prompt).strip()

    def simulate(self, explanation: str, contexts: list[list[str]]) -> list[list[float]]:
        out = []
        for toks in contexts:
            prompt = (f"A neuron responds to: {explanation}.\nText: {''.join(toks)}\n"
                      "On a scale of 0 to 10, how strongly does the neuron fire anywhere in this text? Answer with a number only.")
            try:
                score = float(self._chat(prompt).strip().split()[0])
            except (ValueError, IndexError):
                score = 0.0
            out.append([score] * len(toks))  # context-level simulation
        return out


def interpretability_score(records: ActivationRecords, col: int, explainer, cfg: InterpretConfig, context_level: bool = False) -> dict:
    """IS of unit column ``col``: explain on top training windows, simulate held-out windows.

    Held-out windows are half top-activating and half random (as in Bills et al.), so a unit that never
    fires on held-out text does not get a meaningless score. ``detection``: the AUROC of the simulation's maximum
    over a window, for the top-activating held-out windows where the unit fires against the random ones. The unit is
    first oriented by the sign of its strongest activation on the training windows: a neuron that fires strongly
    negative (SwiGLU allows it) is explained and scored like its positive mirror.
    """
    acts = records.acts[..., col]
    n = acts.shape[0]
    rng = random.Random(cfg.seed)
    order = list(range(n))
    rng.shuffle(order)
    n_held = max(2, int(n * cfg.heldout_frac))
    held, train = order[:n_held], order[n_held:]
    tr = acts[train]
    sign = -1.0 if tr.numel() and float(-tr.min()) > float(tr.max()) else 1.0
    acts = sign * acts
    peak = acts.max(1).values
    top_train = sorted(train, key=lambda i: -float(peak[i]))[: cfg.top_contexts]
    L = [len(records.tokens[i]) for i in range(n)]
    explanation = explainer.explain([records.tokens[i] for i in top_train], [acts[i, : L[i]].tolist() for i in top_train])
    held_top = sorted(held, key=lambda i: -float(peak[i]))[: max(1, n_held // 4)]
    held_rand = rng.sample([i for i in held if i not in held_top], min(len(held_top), len(held) - len(held_top)))
    eval_idx = held_top + held_rand
    sim = explainer.simulate(explanation, [records.tokens[i] for i in eval_idx])
    peak_sim = [max(x) if x else 0.0 for x in sim]
    fired = [j for j, i in enumerate(held_top) if float(peak[i]) > 0]  # a window where the unit is silent is no top context
    detection = auroc([peak_sim[j] for j in fired], peak_sim[len(held_top) :])
    if context_level:
        true = [float(peak[i]) for i in eval_idx]
        pred = peak_sim
    else:
        true = [float(v) for i in eval_idx for v in acts[i, : L[i]]]
        pred = [float(v) for s in sim for v in s]
    return {"explanation": explanation, "score": pearson(pred, true), "n_eval": len(eval_idx), "fires": float(peak.max()), "sign": sign,
            "detection": None if detection != detection else detection}


def fact_clusters(unit_facts: Sequence[Sequence[str]]) -> list[str]:
    """Per unit, a cluster label: facts that share a unit are joined (transitively), a unit takes its facts' cluster;
    a unit with no facts is its own cluster."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for fs in unit_facts:
        for a in fs[1:]:
            parent[find(a)] = find(fs[0])
    return [find(fs[0]) if fs else f"unit {i}" for i, fs in enumerate(unit_facts)]


def score_units(lm, units: Units, unit_idx: Sequence[int], texts: Sequence[str], cfg: InterpretConfig, explainer=None,
                records: ActivationRecords | None = None, facts: Sequence[Sequence[str]] | None = None) -> UnitSetIS:
    """IS for each unit in ``unit_idx``; summaries with CR2 intervals clustered by fact (``facts[j]``: the facts whose top
    unit ``unit_idx[j]`` is; without them every unit is its own cluster). ``records``: their activations on ``texts`` if
    already recorded."""
    explainer = explainer or (LLMExplainer(cfg.llm_url, cfg.llm_model) if cfg.llm_url else TokenExplainer(cfg.explanation_tokens))
    context_level = isinstance(explainer, LLMExplainer)
    records = record_activations(lm, units, texts, unit_idx, cfg) if records is None else records
    facts = [list(f) for f in facts] if facts is not None else [[] for _ in unit_idx]
    rows = [UnitIS(int(u), **interpretability_score(records, c, explainer, cfg, context_level), facts=facts[c])
            for c, u in enumerate(unit_idx)]
    return summarize_is(units.label, type(explainer).__name__, rows)


def summarize_is(label: str, explainer: str, rows: list[UnitIS]) -> UnitSetIS:
    clusters = fact_clusters([r.facts for r in rows])
    det = [r.detection if r.detection is not None else float("nan") for r in rows]
    return UnitSetIS(label, explainer, rows, cluster_robust([r.score for r in rows], clusters).interval,
                     cluster_robust(det, clusters).interval, len(set(clusters)))


def plot_interpretability(results: dict[str, UnitSetIS], path) -> None:
    """Per unit set, the distribution of Pearson r and of the detection AUROC (box + strip)."""
    from kscope.analyses.cells import LABELS

    plt = pyplot()
    kinds = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(kinds), 3.6))
    for ax, attr, name, ref in ((axes[0], "score", "IS (Pearson r, every token)", 0.0),
                                (axes[1], "detection", "detection AUROC (top vs random windows)", 0.5)):
        data = [[getattr(r, attr) for r in results[k].rows if getattr(r, attr) is not None] for k in kinds]
        ax.boxplot(data, tick_labels=[LABELS.get(k, k) for k in kinds])
        for i, (k, d) in enumerate(zip(kinds, data), 1):
            ax.scatter(np.random.default_rng(0).normal(i, 0.04, len(d)), d, s=8, alpha=0.6, color=unit_color(k))
        ax.axhline(ref, color="k", lw=0.5)
        ax.set_ylabel(name)
        ax.tick_params(axis="x", labelrotation=30)
    axes[0].set_title("IS of top fact units")
    axes[1].set_title("sparsity-robust score")
    save_figure(fig, path)


def run_interpret_job(cfg: InterpretJob) -> InterpretResult:
    with make_progress() as progress:
        s = setup(cfg, progress, baselines=cfg.baselines)
        _, texts = build_corpus(s.lm, cfg.corpus, progress, cfg.model.cache_dir).split()  # held-out texts: no SAE saw them
        sets = {"neuron": s.neurons, "feature": s.features, **s.baselines}
        owners: dict[str, dict[int, list[str]]] = {kind: {} for kind in sets}  # unit -> the facts whose top unit it is
        for kind in sets:
            for f, top in zip(s.facts, s.tops[kind]):
                for u in top[: cfg.per_fact]:
                    owners[kind].setdefault(int(u), []).append(f.uid)
        picks = {kind: list(owners[kind]) for kind in sets}
        records = dict(zip(sets, record_many(s.lm, [(sets[k], picks[k]) for k in sets], texts, cfg.interpret, progress)))  # one pass
        results = {kind: score_units(s.lm, sets[kind], picks[kind], texts, cfg.interpret, records=records[kind],
                                     facts=list(owners[kind].values())) for kind in sets}
    result = InterpretResult(s.lm.name, cfg.layer, len(s.facts), asdict(cfg.interpret), results, s.sae)
    return save_outputs(cfg.out_dir, cfg.output_name, result, lambda path: plot_interpretability(results, path))
