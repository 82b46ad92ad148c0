"""A unit set's conditions on one fact: the one code path of ``compare`` and the sweep.

Per unit set: its top-k units suppressed (x0) and enhanced (x2); random units of the set at the same k, drawn
uniformly and (the matched control) among the units active at the answer-reading position, each matched to a top
unit on contribution norm; every unit suppressed (the positive control); under reconstruction ablation also the
reconstruction alone, which is then the reference of the set's other conditions. A condition is read per prompt as
the relative change of P(answer) and as the log-ratio ``log P'/P``, then averaged over the fact's prompts.

A condition is a row of per-unit factors (0 suppress, 2 enhance, 1 keep), applied by the one edit rule of every unit
set (``Units.scaled``: a unit's distance from its mean code scaled; ``locate.edits``). All rows of all unit sets of a
fact run in shared passes per prompt: the prompt's prefix once (its KV cache), then each set's rows join the batch at
the set's layer (``hooks.grown_batch``), so no row recomputes the blocks below its site; row 0 is the clean model.

Each condition also records its edit's size ``‖Δx‖`` (the change at the site, in the residual stream's space: at
``mlp.neurons`` through the down-projection; mean over the measured positions and prompts) and the effect per unit of
it; each top-k condition its collateral, log P'/P of the same edit on a small panel of other facts' prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from kscope.errors import KscopeError
from kscope.locate.attribution import head_logits, plain_head
from kscope.locate.delta_prob import DeltaProbConfig
from kscope.locate.matching import contribution_norms, matched_units
from kscope.locate.objectives import Objective, fact_objective
from kscope.model.hooks import hooked
from kscope.model.prefix import PrefixRunner
from kscope.model.readout import last_token_activations
from kscope.model.sites import down_proj_weight, n_layers
from kscope.stats import Interval, cluster_robust, log_ratio
from kscope.units.base import Units

MAX_ROWS = 512
"""Most condition rows per pass (a pass holds whole unit sets)."""
FACTORS = {"suppress": 0.0, "enhance": 2.0, "keep": 1.0}
CONTROLLED = ("neuron", "feature")
"""Unit kinds measured beside random and matched random units of their own kind (same-site baselines are not)."""


@dataclass
class Effect:
    """One condition on one fact: mean over its prompts of ``(P' - P) / P`` and of ``log P'/P``; ``dx``: the edit's size
    ``‖Δx‖`` (mean over the measured positions and prompts); ``per_dx``: ``log / dx``, nats per unit of edit size (None
    for an edit of size 0); ``collateral``: mean ``log P'/P`` of the same edit on other facts' prompts (top-k only)."""

    rel: float
    log: float
    dx: float | None = None
    per_dx: float | None = None
    collateral: float | None = None


@dataclass
class SetEffects:
    """One unit set on one fact. ``random``/``matched``: means over the draws; ``recon``: the reconstruction alone
    against the clean model (reconstruction ablation only, where it is the other conditions' reference)."""

    top: dict[str, dict[int, Effect]]
    random: dict[str, dict[int, Effect]] | None = None
    matched: dict[str, dict[int, Effect]] | None = None
    all: Effect | None = None
    recon: Effect | None = None
    n_active: float | None = None  # units active at the answer-reading position (mean over prompts)
    matched_norm: float | None = None  # contribution norm of the matched units / of the top units they match
    ablated_to: str = "zero"  # the centre of the set's edits: "mean" (its mean codes) or "zero"


@dataclass
class SetJob:
    """A unit set to measure on a fact: its ranked units, the ablation mode, whether it gets random controls, and
    the key that (with the seed and the fact) seeds its draws, so they do not depend on order or workers."""

    units: Units
    top: Sequence[int]
    mode: str = "error"
    controls: bool = True
    key: str = ""


def factor_rows(n_units: int, rows: Sequence[tuple[str, Sequence[int]]]) -> torch.Tensor:
    """``[len(rows), n_units]`` factors: each row's op (suppress / enhance / keep) on its units, 1 elsewhere."""
    out = torch.ones(len(rows), n_units)
    for r, (op, idx) in enumerate(rows):
        out[r, list(idx)] = FACTORS[op]
    return out


@dataclass
class _Plan:
    labels: list[tuple]
    factors: torch.Tensor
    matched_norm: float | None = None


def _plan(job: SetJob, cfg: DeltaProbConfig, rng: random.Random, norms: np.ndarray | None) -> _Plan:
    """The rows of one unit set: top-k, random and matched draws (nested: k units are the first k of a draw of the
    largest k), every unit, and the reconstruction alone under reconstruction ablation."""
    conds = [(op, k) for op in cfg.ops for k in cfg.ks]
    kmax, n = max(cfg.ks), job.units.n_units
    labels: list[tuple] = []
    rows: list[tuple[str, Sequence[int]]] = []

    def add(label: tuple, op: str, idx: Sequence[int]) -> None:
        labels.append(label)
        rows.append((op, idx))

    for op, k in conds:
        add(("top", op, k), op, job.top[:k])
    ratios = []
    if job.controls:
        for d in range(cfg.random_draws):
            draw = rng.sample(range(n), kmax)
            for op, k in conds:
                add(("random", d, op, k), op, draw[:k])
        for d in range(cfg.matched_draws if norms is not None else 0):
            draw = matched_units(job.top[:kmax], norms, rng)
            ratios.append(norms[draw].sum() / max(norms[list(job.top[:kmax])].sum(), 1e-30))
            for op, k in conds:
                add(("matched", d, op, k), op, draw[:k])
    add(("all",), "suppress", range(n))
    if job.mode == "reconstruction":
        add(("recon",), "keep", ())
    return _Plan(labels, factor_rows(n, rows), float(np.mean(ratios)) if ratios else None)


@dataclass
class _Block:
    """Rows ``[off, off + len(factors))`` of a pass: job ``job``'s unit set edited by its factors."""

    off: int
    job: int
    units: Units
    factors: torch.Tensor
    mode: str
    proj: torch.Tensor | None = None  # [d_model, d_mlp]: at mlp.neurons an edit's size is measured in what the MLP writes


def _size(delta: torch.Tensor, proj: torch.Tensor | None, at: slice | None) -> torch.Tensor:
    """``[rows]``: ``‖Δx‖`` per row, mean over the measured positions (``at``; default all of the pass's)."""
    if at is not None:
        delta = delta[:, at]
    if proj is not None:
        delta = delta @ proj.T.float()
    return delta.norm(dim=-1).mean(-1).cpu()


def _block_edit(blocks: Sequence[_Block], sizes: dict[int, torch.Tensor], at: slice | None = None):
    """A site edit for each block's rows: the units scaled by the block's factors (``Units.scaled``), the error term kept
    (``error``) or dropped (``reconstruction``); other rows pass unchanged. Each block's edit size goes to ``sizes``:
    ``decode(edited codes) - decode(codes)``, the same under either ablation (the splice's own change is not the edit's)."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for b in blocks:
            n = b.factors.shape[0]
            xb = x[b.off : b.off + n]
            u, err = b.units.split(xb)
            new = b.units.decode(b.units.scaled(u, b.factors.to(u.device, u.dtype)[:, None, :]))
            sizes[b.job] = _size(new.float() - b.units.decode(u).float(), b.proj, at)  # the edit alone, not the splice
            x[b.off : b.off + n] = (new + err if b.mode == "error" else new).to(x.dtype)
        return x

    return edit


def _chunks(order: Sequence[int], sizes: Sequence[int], max_rows: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    rows = 0
    for j in order:
        if out[-1] and rows + sizes[j] > max_rows:
            out.append([])
            rows = 0
        out[-1].append(j)
        rows += sizes[j]
    return out


def _from_last(lm, ids: Sequence[int], obj: Objective, jobs: Sequence[tuple[Units, torch.Tensor, str]], max_rows: int,
               projs: Sequence[torch.Tensor | None], sizes: dict[int, torch.Tensor]):
    """log P of every row when edits act from the prompt's last token on: one prefix run, grown passes."""
    runner = PrefixRunner(lm.model, ids)
    head = plain_head(lm.model)
    order = sorted(range(len(jobs)), key=lambda j: jobs[j][0].site.layer)
    vals: list[torch.Tensor | None] = [None] * len(jobs)
    clean = None
    for chunk in _chunks(order, [f.shape[0] for _, f, _ in jobs], max_rows):
        new_rows = [0] * n_layers(lm.model)
        by_site: dict = {}
        off, offs = 1, {}
        for j in chunk:  # by layer: rows joining at a lower block come first
            units, factors, mode = jobs[j]
            new_rows[units.site.layer] += factors.shape[0]
            by_site.setdefault(units.site, []).append(_Block(off, j, units, factors, mode, projs[j]))
            offs[j], off = off, off + factors.shape[0]
        with hooked(lm.model, {s: _block_edit(b, sizes) for s, b in by_site.items()}):
            if head is None:
                lv = obj.log_value(runner.grown(new_rows, continuation=obj.continuation))
            else:
                h = runner.grown(new_rows, head=False, continuation=obj.continuation)
                lv = torch.cat([obj.log_value(head_logits(head, h[a : a + 64].reshape(-1, h.shape[-1])).view(-1, obj.length, head.out_features))
                                for a in range(0, h.shape[0], 64)])
        clean = float(lv[0])
        for j in chunk:
            vals[j] = lv[offs[j] : offs[j] + jobs[j][1].shape[0]]
    return clean, vals


def _everywhere(lm, ids: Sequence[int], obj: Objective, jobs: Sequence[tuple[Units, torch.Tensor, str]],
                projs: Sequence[torch.Tensor | None], sizes: dict[int, torch.Tensor]):
    """log P of every row when edits act at every position of the prompt (no prefix to share); edit sizes are read at
    the positions the answer is read from."""
    full = torch.tensor([list(ids) + obj.continuation], device=lm.device)
    at = slice(len(ids) - 1, len(ids) - 1 + obj.length)
    clean = float(obj.log_value(lm.model(input_ids=full, use_cache=False).logits[:, at])[0])
    vals = []
    for j, (units, factors, mode) in enumerate(jobs):
        with hooked(lm.model, {units.site: _block_edit([_Block(0, j, units, factors, mode, projs[j])], sizes, at)}):
            vals.append(obj.log_value(lm.model(input_ids=full.expand(factors.shape[0], -1), use_cache=False).logits[:, at]))
    return clean, vals


@torch.no_grad()
def condition_logps(lm, fact, jobs: Sequence[tuple[Units, torch.Tensor, str]], positions: str = "last",
                    max_rows: int = MAX_ROWS) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """``log P(answer)`` of the clean model ``[n_prompts]``, and of each job's rows and their edit sizes ``‖Δx‖``
    (each ``[n_rows, n_prompts]``); a job is ``(units, factors [n_rows, n_units], mode)``. ``positions``: edit from the
    prompt's last token on (``last``, the positions the answer is read from) or at every position (``all``)."""
    obj = fact_objective(fact)
    projs = [down_proj_weight(lm.model, u.site.layer) if u.site.kind == "mlp.neurons" else None for u, _, _ in jobs]
    clean = np.zeros(len(fact.prompts))
    out = [np.zeros((f.shape[0], len(fact.prompts))) for _, f, _ in jobs]
    dx = [np.zeros((f.shape[0], len(fact.prompts))) for _, f, _ in jobs]
    for p, prompt in enumerate(fact.prompts):
        ids = lm.tokenizer(prompt).input_ids
        sizes: dict[int, torch.Tensor] = {}
        c, vals = (_from_last(lm, ids, obj, jobs, max_rows, projs, sizes) if positions == "last"
                   else _everywhere(lm, ids, obj, jobs, projs, sizes))
        clean[p] = c
        for j, v in enumerate(vals):
            out[j][:, p] = v.double().cpu().numpy()
            dx[j][:, p] = sizes[j].double().numpy()
    return clean, out, dx


def _per_dx(log: float, dx: float) -> float | None:
    return log / dx if dx > 1e-12 else None


def _effect(lp: np.ndarray, ref: np.ndarray, dx: np.ndarray, collateral: float | None = None) -> Effect:
    log, size = float(np.mean(log_ratio(lp, ref))), float(np.mean(dx))
    return Effect(float(np.mean(np.expm1(np.maximum(lp - ref, -700.0)))), log, size, _per_dx(log, size), collateral)


def _mean_effect(effects: Sequence[Effect]) -> Effect:
    """The mean over draws (``per_dx`` from the mean effect and the mean size)."""
    rel, log, dx = (float(np.mean([getattr(e, a) for e in effects])) for a in ("rel", "log", "dx"))
    return Effect(rel, log, dx, _per_dx(log, dx))


def _read(plan: _Plan, lp: np.ndarray, dx: np.ndarray, clean: np.ndarray, job: SetJob, n_active: float | None,
          collateral: dict[tuple, float]) -> SetEffects:
    row = {label: (lp[r], dx[r]) for r, label in enumerate(plan.labels)}
    ref = row[("recon",)][0] if job.mode == "reconstruction" else clean
    out = SetEffects({}, all=_effect(row[("all",)][0], ref, row[("all",)][1]), n_active=n_active,
                     matched_norm=plan.matched_norm, ablated_to="zero" if job.units.code_mean is None else "mean")
    draws: dict[tuple, list[Effect]] = {}
    for label, (v, d) in row.items():
        if label[0] == "top":
            out.top.setdefault(label[1], {})[label[2]] = _effect(v, ref, d, collateral.get(label))
        elif label[0] in ("random", "matched"):
            draws.setdefault((label[0], label[2], label[3]), []).append(_effect(v, ref, d))
    for (kind, op, k), effects in draws.items():
        got = getattr(out, kind) or {}
        got.setdefault(op, {})[k] = _mean_effect(effects)
        setattr(out, kind, got)
    if job.mode == "reconstruction":
        out.recon = replace(_effect(row[("recon",)][0], clean, np.zeros(1)), dx=None, per_dx=None)  # no edit: no size
    return out


def _collateral(lm, panel: Sequence, jobs: Sequence[SetJob], plans: Sequence[_Plan], positions: str,
                max_rows: int) -> list[dict[tuple, float]]:
    """Per job, each top-k row's mean ``log P'/P`` over the panel's prompts (each against its own clean model, or the
    reconstruction alone under reconstruction ablation), the rows run as on the fact."""
    picks = [[r for r, lab in enumerate(p.labels) if lab[0] == "top" or lab == ("recon",)] for p in plans]
    sub = [(j.units, p.factors[rows], j.mode) for j, p, rows in zip(jobs, plans, picks)]
    got: list[dict[tuple, list[np.ndarray]]] = [{} for _ in jobs]
    for other in panel:
        clean, lps, _ = condition_logps(lm, other, sub, positions, max_rows)
        for j, (job, plan, rows, lp) in enumerate(zip(jobs, plans, picks, lps)):
            labels = [plan.labels[r] for r in rows]
            ref = lp[labels.index(("recon",))] if job.mode == "reconstruction" else clean
            for label, v in zip(labels, lp):
                if label[0] == "top":
                    got[j].setdefault(label, []).append(log_ratio(v, ref))
    return [{label: float(np.mean(np.concatenate(v))) for label, v in g.items()} for g in got]


def measure_sets(lm, fact, jobs: Sequence[SetJob], cfg: DeltaProbConfig, seed: int | None = None,
                 max_rows: int = MAX_ROWS, panel: Sequence = ()) -> list[SetEffects]:
    """Every condition of every job on ``fact`` (its prompts are the ones measured), in shared passes per prompt.
    Matched draws read each set's activations at the prompts' last token (one pass for all sets). ``panel``: other
    facts (``edits.collateral_panel``) each top-k edit is also measured on, its collateral; never ``fact`` itself."""
    if any(o.uid == fact.uid or set(o.prompts) & set(fact.prompts) for o in panel):
        raise KscopeError(f"the collateral panel of {fact.uid} shares its fact or prompts")
    kmax = max(cfg.ks)
    for job in jobs:
        if len(job.top) < kmax:
            raise KscopeError(f"ΔProb at k={kmax} needs {kmax} ranked units, only {len(job.top)} were ranked"
                              + (f" ({job.units.label} has {job.units.n_units})" if job.units.n_units < kmax else ""))
    distinct = list({id(j.units): j.units for j in jobs if j.controls}.values())
    acts = last_token_activations(lm, distinct, fact.prompts) if distinct else []
    norms = {id(u): contribution_norms(a, u) for u, a in zip(distinct, acts)}
    active = {id(u): float((a != 0).sum(-1).float().mean()) for u, a in zip(distinct, acts)}
    seed = cfg.seed if seed is None else seed
    plans = [_plan(j, cfg, random.Random(f"{seed}:{fact.uid}:{j.key or j.units.site.name}"),
                   norms.get(id(j.units)) if cfg.matched_draws else None) for j in jobs]
    clean, lps, dxs = condition_logps(lm, fact, [(j.units, p.factors, j.mode) for j, p in zip(jobs, plans)], cfg.positions,
                                      max_rows)
    coll = _collateral(lm, panel, jobs, plans, cfg.positions, max_rows) if panel else [{} for _ in jobs]
    return [_read(p, lp, dx, clean, j, active.get(id(j.units)), c) for j, p, lp, dx, c in zip(jobs, plans, lps, dxs, coll)]


@dataclass
class Change:
    """A condition over facts: relative change and log-ratio, each a mean with its interval over relations; the
    edit's size, the effect per unit of it and the collateral likewise (None where not measured)."""

    rel: Interval
    log: Interval
    dx: Interval | None = None
    per_dx: Interval | None = None
    collateral: Interval | None = None


@dataclass
class SetSummary:
    """A unit set over facts (``SetEffects`` summarised per condition)."""

    top: dict[str, dict[int, Change]]
    random: dict[str, dict[int, Change]] | None = None
    matched: dict[str, dict[int, Change]] | None = None
    all: Change | None = None
    recon: Change | None = None
    n_active: float | None = None
    matched_norm: float | None = None
    ablated_to: str = "zero"
    intervals: str = "cluster bootstrap"  # how the intervals over relations were made (results before CR2: the bootstrap)


def summarize_effects(rows: Sequence[SetEffects], clusters: Sequence[str]) -> SetSummary:
    """Means over facts with CR2 intervals over clusters (relations) of facts, Imbens-Kolesar df: they hold with a
    handful of unequal relations, where the cluster bootstrap ran short (``stats.cluster_robust``)."""

    def interval(effects: Sequence[Effect | None], attr: str) -> Interval | None:
        vals = [getattr(e, attr) if e else None for e in effects]
        if all(v is None for v in vals):
            return None
        return cluster_robust([np.nan if v is None else v for v in vals], clusters).interval

    def change(effects: Sequence[Effect | None]) -> Change:
        return Change(*(interval(effects, a) for a in ("rel", "log", "dx", "per_dx", "collateral")))

    def grid(attr: str) -> dict[str, dict[int, Change]] | None:
        got = [getattr(r, attr) for r in rows]
        if not got or any(g is None for g in got):
            return None
        return {op: {k: change([g[op][k] for g in got]) for k in got[0][op]} for op in got[0]}

    def mean(attr: str) -> float | None:
        vals = [getattr(r, attr) for r in rows if getattr(r, attr) is not None]
        return float(np.mean(vals)) if vals else None

    recon = [r.recon for r in rows]
    centres = {r.ablated_to for r in rows}
    return SetSummary(grid("top"), grid("random"), grid("matched"), change([r.all for r in rows]),
                      change(recon) if all(recon) else None, mean("n_active"), mean("matched_norm"),
                      centres.pop() if len(centres) == 1 else "mixed", "CR2")
