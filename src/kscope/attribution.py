"""Integrated-gradients attribution of an answer's probability to units (Dai et al. 2022).

For a prompt whose last token predicts the answer, the units ``u`` at a site are read at the last
position; IG scales them from 0 to their value in ``m`` steps and sums gradients (Riemann, right
endpoints ``alpha = k/m``): ``IG_i = u_i / m * sum_k dP(answer | alpha_k u) / du_i``.
For SAE features the error term is held fixed, so the baseline is "all features off, error kept".
The same code serves neurons and features.

Speed: the prompt prefix is run once and its KV cache reused; the IG steps run as one batch of
single-token forwards over that cache, so only the last position is recomputed.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kscope.facts import Fact
from kscope.hooks import hooked
from kscope.units import Units


@dataclass
class AttributionConfig:
    """Integrated gradients and unit selection."""

    steps: int = field(default=20, metadata={"help": "IG steps m (Riemann sum)."})
    batch_size: int = field(default=20, metadata={"help": "IG rows per forward pass (unit sets of a fact share batches of up to max(this, 512) rows)."})
    coarse_threshold: float = field(default=0.2, metadata={"help": "Coarse selection: keep units scoring >= t x the prompt's max score."})
    refine_frac: float = field(default=0.5, metadata={"help": "Refinement: keep units selected on >= this fraction of a fact's prompts."})
    top_k: int = field(default=10, metadata={"help": "Units reported per fact."})


def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


class PrefixRunner:
    """Runs a prompt's prefix once; then forwards of its last token for any batch size.

    ``ids``: ``[seq]`` token ids of one prompt.
    """

    def __init__(self, model, ids: Sequence[int]):
        self.model = model
        self.kw = _cache_kw(model)
        device = next(model.parameters()).device
        ids = torch.as_tensor(list(ids), dtype=torch.long, device=device)
        self.last = ids[-1:]
        self.cache = None
        if ids.numel() > 1:
            with torch.no_grad():
                self.cache = _out_cache(self.model(input_ids=ids[None, :-1], use_cache=True))

    def logits(self, batch: int) -> torch.Tensor:
        """Next-token logits of the last token, ``[batch, vocab]`` (hooks set by the caller apply)."""
        kwargs = {}
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            if batch > 1:
                cache.batch_repeat_interleave(batch)
            kwargs[self.kw] = cache
        out = self.model(input_ids=self.last.expand(batch, 1), use_cache=self.cache is not None, **kwargs)
        return out.logits[:, -1]


def ig_alphas(steps: int, rule: str = "right") -> tuple[torch.Tensor, int]:
    """Points to evaluate and the index the Riemann sum starts at (point 0 is always alpha = 0).

    ``right``: ``0, 1/m, ..., 1`` summing ``k = 1..m`` (Dai et al.); ``linspace``: ``m`` points
    ``linspace(0, 1, m)`` all summed, as the EleutherAI ``knowledge-neurons`` library does.
    """
    if rule == "right":
        return torch.arange(0, steps + 1) / steps, 1
    if rule == "linspace":
        return torch.linspace(0, 1, steps), 0
    raise ValueError(f"unknown IG rule {rule!r}")


def riemann_ig(
    u: torch.Tensor,
    f: Callable[[torch.Tensor], torch.Tensor],
    steps: int = 20,
    batch_size: int = 20,
    rule: str = "right",
) -> tuple[torch.Tensor, float]:
    """IG of a batched scalar function ``f: [b, n] -> [b]`` from baseline 0 to ``u`` ``[n]``.

    ``u / m * sum_k grad f(alpha_k u)`` over the points of ``ig_alphas``; also returns ``f(0)``.
    """
    u = u.detach()
    total = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
    alphas, first = ig_alphas(steps, rule)
    alphas = alphas.to(u.device, u.dtype)
    f0 = float("nan")
    for start in range(0, len(alphas), batch_size):
        a = alphas[start : start + batch_size]
        scaled = (a[:, None] * u[None]).requires_grad_(True)
        with torch.enable_grad():
            out = f(scaled)
            (grad,) = torch.autograd.grad(out.sum(), scaled)
        if start == 0:
            f0 = float(out[0].detach())
            grad = grad[first:]  # under the right rule the baseline is not a Riemann point
        total += grad.float().sum(0)
    return u.float() * total / steps, f0


def integrated_gradients(
    runner: PrefixRunner,
    units: Units,
    target_id: int,
    steps: int = 20,
    batch_size: int = 20,
    rule: str = "right",
) -> tuple[torch.Tensor, float, float]:
    """IG scores ``[n_units]`` of ``P(target)`` at the last position, plus ``f(x)`` and ``f(baseline)``.

    Completeness: ``scores.sum() ~= f(x) - f(baseline)`` as ``steps`` grows.
    """
    model = runner.model
    with torch.no_grad(), hooked(model, capture=[units.site]) as cap:
        p_clean = float(runner.logits(1).float().softmax(-1)[0, target_id])
        x = cap[units.site]  # [1, 1, d]
    u, err = units.split(x)
    err = err.detach()

    def prob(scaled: torch.Tensor) -> torch.Tensor:  # [b, n] -> [b]
        edit = lambda _x: (units.decode(scaled[:, None, :]) + err).to(_x.dtype)  # noqa: E731
        with hooked(model, {units.site: edit}):
            return runner.logits(scaled.shape[0]).float().softmax(-1)[:, target_id]

    scores, p_base = riemann_ig(u[0, 0], prob, steps, batch_size, rule)
    return scores.detach(), p_clean, p_base


def integrated_gradients_many(
    runner: PrefixRunner,
    unit_sets: Sequence[Units],
    target_id: int,
    steps: int = 20,
    rule: str = "right",
    max_rows: int = 512,
) -> list[tuple[torch.Tensor, float, float]]:
    """``integrated_gradients`` for several unit sets (e.g. every layer) in shared batches.

    Each unit set gets its own block of rows (its IG points); a site's hook edits only its blocks, so
    the rows stay independent and one forward/backward serves them all. Same results, wider matrices.
    """
    model = runner.model
    sites = sorted({u.site for u in unit_sets})
    with torch.no_grad(), hooked(model, capture=sites) as cap:
        p_clean = float(runner.logits(1).float().softmax(-1)[0, target_id])
        xs = {s: cap[s] for s in sites}
    alphas, first = ig_alphas(steps, rule)
    per_chunk = max(1, max_rows // len(alphas))
    out: list[tuple[torch.Tensor, float, float]] = []
    for c in range(0, len(unit_sets), per_chunk):
        chunk = unit_sets[c : c + per_chunk]
        split = [u.split(xs[u.site]) for u in chunk]
        n = len(alphas)
        scaled = [(alphas.to(uu.device, uu.dtype)[:, None] * uu[0, 0].detach()[None]).requires_grad_(True) for uu, _ in split]
        by_site: dict = {}
        for j, u in enumerate(chunk):
            by_site.setdefault(u.site, []).append(j)

        def make_edit(js):
            def edit(x):
                x = x.clone()
                for j in js:
                    recon = chunk[j].decode(scaled[j][:, None, :]) + split[j][1].detach()
                    x[j * n : (j + 1) * n] = recon.to(x.dtype)
                return x

            return edit

        with torch.enable_grad(), hooked(model, {s: make_edit(js) for s, js in by_site.items()}):
            probs = runner.logits(n * len(chunk)).float().softmax(-1)[:, target_id]
            grads = torch.autograd.grad(probs.sum(), scaled)
        for j, (uu, _) in enumerate(split):
            g = grads[j][first:].float().sum(0)
            out.append(((uu[0, 0].float() * g / steps).detach(), p_clean, float(probs[j * n].detach())))
    return out


@dataclass
class UnitAttribution:
    """Per-fact result for one unit set. ``scores``: ``[n_prompts, n_units]`` IG scores."""

    units: str
    scores: torch.Tensor
    refined: list[int]
    top: list[int]
    p_clean: list[float]

    def to_dict(self, k: int | None = None) -> dict:
        mean = self.scores.mean(0)
        sel = coarse_select(self.scores, 0.0)  # any positive score, for frequencies
        freq = sel.float().mean(0)
        top = self.top[:k] if k else self.top
        return {
            "units": self.units,
            "refined": self.refined,
            "top": [{"unit": int(i), "score": float(mean[i]), "freq": float(freq[i])} for i in top],
            "p_clean": self.p_clean,
        }


def coarse_select(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[P, n]`` bool: units whose score is ``>= threshold x`` the max score of their prompt (and > 0)."""
    mx = scores.max(-1, keepdim=True).values.clamp_min(0)
    return (scores >= threshold * mx) & (scores > 0)


def refine_select(selected: torch.Tensor, frac: float) -> list[int]:
    """Units selected on ``>= frac`` of the prompts, by frequency then index."""
    freq = selected.float().mean(0)
    idx = torch.nonzero(freq >= frac - 1e-9).flatten()
    order = sorted(idx.tolist(), key=lambda i: (-float(freq[i]), i))
    return order


def rank_units(scores: torch.Tensor, refined: Sequence[int], k: int) -> list[int]:
    """Top ``k`` units: refined units by mean score, then the rest by mean score."""
    mean = scores.mean(0)
    first = sorted(refined, key=lambda i: -float(mean[i]))
    rest = [i for i in torch.argsort(mean, descending=True).tolist() if i not in set(first)]
    return (first + rest)[:k]


def attribute_fact(lm, fact: Fact, unit_sets: Sequence[Units], cfg: AttributionConfig) -> list[UnitAttribution]:
    """IG for each unit set on each prompt of ``fact`` (the prefix cache is shared between sets)."""
    per_set: list[list[torch.Tensor]] = [[] for _ in unit_sets]
    p_clean: list[float] = []
    for prompt in fact.prompts:
        runner = PrefixRunner(lm.model, lm.tokenizer(prompt).input_ids)
        results = integrated_gradients_many(runner, unit_sets, fact.target_id, cfg.steps, max_rows=max(cfg.batch_size, 512))
        for j, (sc, p, _) in enumerate(results):
            per_set[j].append(sc.cpu())
        p_clean.append(results[0][1])
    out = []
    for units, rows in zip(unit_sets, per_set):
        scores = torch.stack(rows)
        refined = refine_select(coarse_select(scores, cfg.coarse_threshold), cfg.refine_frac)
        out.append(UnitAttribution(units.label, scores, refined, rank_units(scores, refined, max(cfg.top_k, 10)), p_clean))
    return out
