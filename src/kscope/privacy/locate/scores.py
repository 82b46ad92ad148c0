"""Which units carry each person's secrets: attribution per unit set, made specific, ranked per person.

Scores are IG (or a shortcut) of the whole secret (by default only its tokens that tell it apart from the
other secrets of its kind) on every edit prompt, for neurons and SAE features of every edited layer in one
batched pass per prompt, here or on Ray workers (journaled beside the output). Two specificity steps, each
an option whose effect is measured: ``format`` subtracts a unit's score on the same templates about a
stranger (a name from a pool no taught person shares, with a value of the same format no one was taught),
so units that write *a* phone number are not chosen; ``generic`` divides by how much ordinary text needs
the unit. Each person then gets an equal share of the budget: per person, units ranked by their mean
score over that person's prompts, pooled round-robin (as Dai et al.'s knowledge neurons are per fact).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kscope.errors import KscopeError
from kscope.facts import Fact
from kscope.locate.attribution import gradient_taps, prompt_scores
from kscope.locate.objectives import fact_objective
from kscope.model.hooks import hooked
from kscope.model.loading import ModelConfig, load_model
from kscope.model.sites import Site
from kscope.parallel import fact_keys, fact_task, map_facts
from kscope.units.base import Units
from kscope.units.provision import neuron_units


@dataclass
class SpecificityEffect:
    """What one specificity step did to one kind's ranking: the share of each person's top units (at the largest budget's
    per-person share) that the step removed, mean over people."""

    kind: str
    step: str  # format | generic
    removed: float


def _context(model_dir: str, device: str, cache_dir: str | None, specs: list[tuple[int, str | None, str | None]], steps: int,
             method: str):
    """A Ray worker's model and unit sets: ``specs`` = (layer, SAE directory or None for neurons, site kind)."""
    from kscope.units.sae import feature_units, load_sae

    lm = load_model(ModelConfig(model=model_dir, device=device, cache_dir=cache_dir))
    sets = [neuron_units(lm, L) if path is None else feature_units(lm.model, load_sae(path, device), Site(L, kind))
            for L, path, kind in specs]
    return lm, sets, steps, method


def _fact_scores(ctx, fact: Fact) -> list[list[list[float]]]:
    lm, sets, steps, method = ctx
    scores, _ = prompt_scores(lm, fact.prompts, fact_objective(fact), sets, steps, method=method)
    return [s.tolist() for s in scores]


def score_matrices(lm, facts: Sequence[Fact], unit_sets: Sequence[Units], specs: list, parallel, out: Path, fingerprint: dict,
                   steps: int, method: str, device: str, cache_dir: str | None, progress, label: str) -> list[torch.Tensor]:
    """Per unit set, scores ``[n_prompts, n_units]`` over all edit prompts of ``facts`` (rows in fact order)."""
    task = fact_task(parallel, _fact_scores, (lm, list(unit_sets), steps, method), _context,
                     (fingerprint["model_dir"], device, cache_dir, specs, steps, method))
    keys = fact_keys(facts)
    prompts = [list(f.prompts) for f in facts]  # a journal of other prompts (another split) is never resumed
    outcome = map_facts(task, facts, keys, parallel, out, {**fingerprint, "facts": keys, "prompts": prompts}, progress,
                        f"locating {label} ({method})")
    if outcome.failed:
        raise KscopeError(f"locating failed for {outcome.failed[0]['key']}: {outcome.failed[0]['error']}")
    per_fact = [[torch.tensor(m) for m in r] for r in outcome.rows]
    return [torch.cat([m[j] for m in per_fact]) for j in range(len(unit_sets))]


def generic_importance(lm, unit_sets: Sequence[Units], texts: Sequence[str], batch: int = 8) -> list[torch.Tensor]:
    """Mean over tokens of ``|grad x activation|`` of the LM loss, per unit: how much ordinary text needs each unit.
    Texts run ``batch`` at a time, right-padded (the loss ignores padding)."""
    from kscope.model.readout import pad_rows

    totals = [torch.zeros(u.n_units) for u in unit_sets]
    n = 0
    rows = [r for r in (lm.tokenizer(t).input_ids[:64] for t in texts) if len(r) >= 2]
    for i in range(0, len(rows), batch):
        ids, mask = pad_rows(rows[i : i + batch], lm.tokenizer.pad_token_id or 0)
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        labels = ids.masked_fill(mask == 0, -100)
        edits, leaves = gradient_taps(unit_sets)
        with torch.enable_grad(), hooked(lm.model, edits):
            out = lm.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            n_tok = int((labels[:, 1:] != -100).sum())
            grads = torch.autograd.grad(out.loss * n_tok, [leaves[j] for j in range(len(unit_sets))])
        keep = mask.bool()[..., None]
        for j, g in enumerate(grads):
            totals[j] += ((g * leaves[j]).detach().abs() * keep).sum((0, 1)).float().cpu()
        n += int(mask.sum())
    return [t / max(n, 1) for t in totals]


def per_person(scores: torch.Tensor, person: Sequence[int], n: int) -> list[int]:
    """Round-robin over people of each one's ranking (mean score over that person's rows, highest first), each unit once:
    every person gets an equal share of the first ``n``."""
    person_t = torch.as_tensor(list(person))
    rankings = [torch.argsort(scores[person_t == p].mean(0), descending=True).tolist() for p in sorted(set(person))]
    out: list[int] = []
    seen: set[int] = set()
    for depth in range(scores.shape[1]):
        for r in rankings:
            u = r[depth]
            if u not in seen:
                seen.add(u)
                out.append(u)
        if len(out) >= n:
            break
    return out[:n]


def removed_share(before: torch.Tensor, after: torch.Tensor, person: Sequence[int], k: int) -> float:
    """Mean over people of the share of their top-``k`` units under ``before`` that are not in their top-``k`` under ``after``."""
    person_t = torch.as_tensor(list(person))
    shares = []
    for p in sorted(set(person)):
        a = set(torch.topk(before[person_t == p].mean(0), k).indices.tolist())
        b = set(torch.topk(after[person_t == p].mean(0), k).indices.tolist())
        shares.append(len(a - b) / k)
    return float(np.mean(shares))


def flat(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer score matrices side by side, ``[rows, sum of widths]``."""
    return torch.cat(list(scores), dim=1)


def to_units(idx: Sequence[int], widths: Sequence[int], layers: Sequence[int]) -> list[tuple[int, int]]:
    """Global column indices of ``flat`` matrices -> ``(layer, unit)``."""
    starts = np.cumsum([0, *widths])
    out = []
    for i in idx:
        j = int(np.searchsorted(starts, i, side="right") - 1)
        out.append((layers[j], int(i - starts[j])))
    return out


def fingerprint_of(job, specs) -> dict:
    return {"model_dir": job.model_dir, "erase": asdict(job.erase), "specs": [list(s) for s in specs]}
