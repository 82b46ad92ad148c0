"""Integrated-gradients attribution of an answer's probability to units (Dai et al. 2022).

For a prompt whose last token predicts the answer, the units ``u`` at a site are read at the last
position; IG moves them from their centre ``c`` (the set's mean codes, where fitted, else 0: the point
suppression moves them to, ``Units.centre``) to their value in ``m`` steps and sums gradients (Riemann, right
endpoints ``alpha = k/m``): ``IG_i = (u_i - c_i) / m * sum_k dP(answer | c + alpha_k (u - c)) / du_i``.
For SAE features the error term is held fixed, so the baseline is "every feature at its mean, error kept".
The same code serves neurons and features.

Speed: the prompt prefix is run once and its KV cache reused; the IG steps run as one batch of
single-token forwards over that cache, so only the last position is recomputed. With several unit
sets, each set's rows join the batch at its own block (``hooks.grown_batch``), so they skip the
blocks below it forward and backward; and dP/dlogits is written in closed form, P (e_t - p).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from kscope.config import MAX_STEPS, Config, option
from kscope.facts import Fact
from kscope.locate.objectives import Objective, fact_objective
from kscope.model.head import head_logits, plain_head
from kscope.model.hooks import hooked
from kscope.model.prefix import PrefixRunner
from kscope.model.readout import pad_rows
from kscope.model.sites import n_layers
from kscope.units.base import Units


METHODS = ("ig", "atp", "atp-mid", "atp-ig")


@dataclass
class AttributionConfig(Config):
    """How units are scored: integrated gradients, attribution patching, or AtP shortlisting checked by IG."""

    method: str = option("ig", "ig: integrated gradients (steps passes); atp: attribution patching, gradient x activation from one "
                               "forward and one backward (baseline: the units at their centre, as IG); atp-mid: the gradient "
                               "taken halfway along IG's path (IG with one midpoint step: one forward and one backward, two rows per layer); atp-ig: AtP shortlists "
                               "the --shortlist best units of each unit set and IG, moving only those along its path, scores them "
                               "(the rest score 0).",
                         choices=METHODS, label="attribution method")
    steps: int = option(20, "IG steps m (Riemann sum).", min=1, max=MAX_STEPS)
    shortlist: int = option(50, "atp-ig: units per unit set that AtP passes on to IG.", min=1)
    batch_size: int = option(1024, "Most IG rows per forward/backward pass: each unit set (layer) takes steps+1 rows and a fact's sets share passes up to this (at least one set per pass); lower it to save memory.", min=1)
    max_memory: float | None = option(None, "Cap on the IG batch's activation memory in MB: the rows per pass follow from a measured bytes-per-row "
                                            "estimate (overrides --batch-size when smaller).", min=1.0)
    coarse_threshold: float = option(0.2, "Coarse selection: keep units scoring >= t x the prompt's max score.", min=0.0, max=1.0)
    refine_frac: float = option(0.5, "Refinement: keep units selected on >= this fraction of a fact's prompts.", min=0.0, max=1.0)
    top_k: int = option(10, "Units reported per fact.", min=1)


def answer_prob_grad(head: nn.Linear, h: torch.Tensor, target_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``P(target)`` ``[rows]`` from final hidden states ``h`` ``[rows, d]``, and ``dP/dh`` ``[rows, d]`` in closed form."""
    value, dh = Objective.first_token(target_id).value_grad(head, h[:, None], head_logits)
    return value, dh[:, 0]


def as_objective(target: int | Objective) -> Objective:
    return target if isinstance(target, Objective) else Objective.first_token(target)


def ig_alphas(steps: int, rule: str = "right") -> tuple[torch.Tensor, int]:
    """Points to evaluate and the index the Riemann sum starts at (point 0 is always alpha = 0).

    ``right``: ``0, 1/m, ..., 1`` summing ``k = 1..m`` (Dai et al.); ``linspace``: ``m`` points
    ``linspace(0, 1, m)`` all summed, as the EleutherAI ``knowledge-neurons`` library does; ``midpoint``:
    ``(k - 1/2)/m`` summing ``k = 1..m`` (with ``m = 1``: the gradient halfway along the path, ``atp-mid``).
    """
    if rule == "right":
        return torch.arange(0, steps + 1) / steps, 1
    if rule == "linspace":
        return torch.linspace(0, 1, steps), 0
    if rule == "midpoint":
        return torch.cat([torch.zeros(1), (torch.arange(steps) + 0.5) / steps]), 1
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
    target: int | Objective,
    steps: int = 20,
    batch_size: int = 20,
    rule: str = "right",
) -> tuple[torch.Tensor, float, float]:
    """IG scores ``[n_units]`` of the objective (default: ``P(target)`` at the last position), plus
    ``f(x)`` and ``f(baseline)``. The units are scaled together at every continuation position and
    their scores summed over positions. The plain reference for ``integrated_gradients_many``.

    Completeness: ``scores.sum() ~= f(x) - f(baseline)`` as ``steps`` grows.
    """
    obj = as_objective(target)
    model = runner.model
    with torch.no_grad(), hooked(model, capture=[units.site]) as cap:
        f_clean = float(obj.value(runner.logits(1, obj.continuation).view(1, obj.length, -1))[0])
        x = cap[units.site]  # [1, L, d]
    u, err = units.split(x)
    err = err.detach()
    c = units.centre(u)

    def f(scaled: torch.Tensor) -> torch.Tensor:  # [b, L * n] -> [b]: the path from the centre (scaled = 0)
        s = scaled.view(scaled.shape[0], obj.length, -1) + c
        edit = lambda _x: (units.decode(s) + err).to(_x.dtype)  # noqa: E731
        with hooked(model, {units.site: edit}):
            return obj.value(runner.logits(s.shape[0], obj.continuation).view(s.shape[0], obj.length, -1))

    scores, f_base = riemann_ig((u[0] - c).reshape(-1), f, steps, batch_size, rule)
    return scores.view(obj.length, -1).sum(0).detach(), f_clean, f_base


def integrated_gradients_many(
    runner: PrefixRunner,
    unit_sets: Sequence[Units],
    target: int | Objective,
    steps: int = 20,
    rule: str = "right",
    max_rows: int = 1024,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> list[tuple[torch.Tensor, float, float]]:
    """``integrated_gradients`` for several unit sets (e.g. every layer) in shared batches.

    ``masks[j]`` (bool ``[n_units]``) restricts set ``j``'s path to those units (the rest stay at their clean
    value; their scores are 0).

    Each unit set gets its own block of rows (its IG points), which joins the batch at the set's
    layer; a site's hook edits only its blocks, so the rows stay independent and one forward and
    backward serves them all. Same results, wider matrices, no block below a set's layer recomputed.
    """
    obj = as_objective(target)
    model = runner.model
    sites = sorted({u.site for u in unit_sets})
    head = plain_head(model)
    with torch.no_grad(), hooked(model, capture=sites) as cap:
        runner.grown([], head=False, continuation=obj.continuation)  # clean activations; f_clean is row 0 of the IG passes
        xs = {s: cap[s] for s in sites}
    alphas, first = ig_alphas(steps, rule)
    n = len(alphas)
    order = sorted(range(len(unit_sets)), key=lambda j: unit_sets[j].site.layer)
    per_chunk = max(1, max_rows // n)
    out: dict[int, tuple[torch.Tensor, float, float]] = {}
    for c in range(0, len(order), per_chunk):
        chunk = [unit_sets[j] for j in order[c : c + per_chunk]]  # by layer: block j is rows 1 + j n ...
        split = [u.split(xs[u.site]) for u in chunk]
        scaled = []
        centres = [u.centre(uu) for u, (uu, _) in zip(chunk, split)]
        for j, (uu, _) in enumerate(split):
            a = alphas.to(uu.device, uu.dtype)[:, None, None]
            m = masks[order[c + j]] if masks is not None else None
            if m is not None:  # only the masked units move along the path
                m = m.to(uu.device, uu.dtype)
                a = a * m + (1 - m)
            d = (uu[0].detach() - centres[j])[None]  # the path c + a (u - c), written so a = 1 gives u exactly
            scaled.append((uu[0].detach()[None] + (a - 1) * d).requires_grad_(True))
        new_rows = [0] * n_layers(model)
        by_site: dict = {}
        for j, u in enumerate(chunk):
            new_rows[u.site.layer] += n
            by_site.setdefault(u.site, []).append(j)

        def make_edit(js):
            def edit(x):
                x = x.clone()
                for j in js:
                    recon = chunk[j].decode(scaled[j]) + split[j][1].detach()
                    x[1 + j * n : 1 + (j + 1) * n] = recon.to(x.dtype)
                return x

            return edit

        with torch.enable_grad(), hooked(model, {s: make_edit(js) for s, js in by_site.items()}):
            if head is not None:
                h = runner.grown(new_rows, head=False, continuation=obj.continuation)
                values, dh = obj.value_grad(head, h, head_logits)
                grads = torch.autograd.grad(h, scaled, dh)
            else:
                values = obj.value(runner.grown(new_rows, continuation=obj.continuation))
                grads = torch.autograd.grad(values.sum(), scaled)
        values = values.detach()
        for j, (uu, _) in enumerate(split):
            g = grads[j][first:].float().sum(0)  # [L, n_units]
            sc = (((uu[0] - centres[j]).float() * g).sum(0) / steps).detach()
            m = masks[order[c + j]] if masks is not None else None
            out[order[c + j]] = (sc * m.to(sc.device) if m is not None else sc), float(values[0]), float(values[1 + j * n])
    return [out[j] for j in range(len(unit_sets))]


@dataclass
class UnitAttribution:
    """Per-fact result for one unit set. ``scores``: ``[n_prompts, n_units]`` IG scores."""

    units: str
    scores: torch.Tensor
    refined: list[int]
    top: list[int]
    p_clean: list[float]

    def top_scores(self, k: int | None = None) -> list[tuple[int, float, float]]:
        """``(unit, mean score, selection frequency)`` of the top ``k`` units; frequency = share of
        prompts on which the unit scores above zero."""
        mean = self.scores.mean(0)
        freq = coarse_select(self.scores, 0.0).float().mean(0)
        return [(int(i), float(mean[i]), float(freq[i])) for i in (self.top[:k] if k else self.top)]


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


def attribution_patching(model, prompts: Sequence[Sequence[int]], unit_sets: Sequence[Units], target: int | Objective,
                         max_rows: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """AtP (Nanda 2023; Kramár et al. 2024): ``score_i = sum_positions grad_i(x) * (u_i - c_i)`` (``c``: the set's
    centre, as IG's baseline) for every unit of every set, all layers at once; equals IG with one (right-endpoint) step.

    ``prompts``: token ids of prompts that share ``target``. They run ``max_rows`` at a time as one right-padded
    batch (a causal model never attends to the padding after a row's tokens), one forward and one backward
    per batch, so the weights are read twice per batch rather than per prompt. Positions scored: each
    prompt's last token and the answer's teacher-forced continuation, as in IG.
    Returns per set ``(scores [n_prompts, n_units], objective [n_prompts])``."""
    obj = as_objective(target)
    head = plain_head(model)
    device = next(model.parameters()).device
    out: list[tuple[list, list]] = [([], []) for _ in unit_sets]
    for a in range(0, len(prompts), max_rows):
        ids, _ = pad_rows([list(p) + obj.continuation for p in prompts[a : a + max_rows]], 0)  # causal: the mask is not needed
        ids = ids.to(device)
        first = torch.tensor([len(p) - 1 for p in prompts[a : a + max_rows]], device=device)
        pos = first[:, None] + torch.arange(obj.length, device=device)  # [rows, length]
        edits, leaves = gradient_taps(unit_sets, pos)
        with torch.enable_grad(), hooked(model, edits):
            if head is not None:
                h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                h = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
                value, dh = obj.value_grad(head, h, head_logits)
                grads = torch.autograd.grad(h, [leaves[j] for j in range(len(unit_sets))], dh)
            else:
                logits = model(input_ids=ids, use_cache=False).logits
                value = obj.value(logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])))
                grads = torch.autograd.grad(value.sum(), [leaves[j] for j in range(len(unit_sets))])
        for j, g in enumerate(grads):
            out[j][0].append(((leaves[j] - unit_sets[j].centre(leaves[j])).float() * g.float()).sum(1).detach())
            out[j][1].append(value.detach().float())
    return [(torch.cat(s), torch.cat(v)) for s, v in out]


def rows_for_memory(model, obj: Objective, max_memory_mb: float) -> int:
    """IG rows per pass that fit ``max_memory_mb`` of activations, from a bytes-per-row estimate: every block
    keeps about ``(8 d_model + 3 d_mlp)`` floats per token for the backward, plus the scored logits."""
    from kscope.model.sites import Site, site_dim

    d, d_mlp = site_dim(model, Site(0, "mlp.out")), site_dim(model, Site(0, "mlp.neurons"))
    elem = next(model.parameters()).element_size()
    vocab = model.get_output_embeddings().weight.shape[0]
    per_row = obj.length * (n_layers(model) * (8 * d + 3 * d_mlp) * elem + 4 * vocab)
    return max(1, int(max_memory_mb * 2**20 // per_row))


def prompt_scores(lm, prompts: Sequence[str], target: int | Objective, unit_sets: Sequence[Units], steps: int,
                  max_rows: int = 1024, method: str = "ig", shortlist: int = 50,
                  max_memory: float | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """Scores ``[n_prompts, n_units]`` per unit set (one prefix run and shared passes per prompt), and the
    objective (``P(answer)`` by default) per prompt. ``method``: one of ``METHODS``."""
    per_set: list[list[torch.Tensor]] = [[] for _ in unit_sets]
    p_clean: list[float] = []
    obj = as_objective(target)
    if max_memory is not None:
        max_rows = min(max_rows, rows_for_memory(lm.model, obj, max_memory))
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}")
    ids = [lm.tokenizer(p).input_ids for p in prompts]
    if method == "atp":
        atp = attribution_patching(lm.model, ids, unit_sets, obj)
        return [sc.cpu() for sc, _ in atp], [float(v) for v in atp[0][1]]
    atp = attribution_patching(lm.model, ids, unit_sets, obj) if method == "atp-ig" else None
    for i, prompt_ids in enumerate(ids):
        runner = PrefixRunner(lm.model, prompt_ids)
        masks = None
        if atp is not None:
            masks = []
            for sc, _ in atp:
                m = torch.zeros(sc.shape[1], dtype=torch.bool)
                m[sc[i].topk(min(shortlist, sc.shape[1])).indices.cpu()] = True
                masks.append(m)
        if method == "atp-mid":
            results = integrated_gradients_many(runner, unit_sets, obj, 1, "midpoint", max_rows=max_rows)
        else:
            results = integrated_gradients_many(runner, unit_sets, obj, steps, max_rows=max_rows, masks=masks)
        for j, (sc, _, _) in enumerate(results):
            per_set[j].append(sc.cpu())
        p_clean.append(results[0][1])
    return [torch.stack(rows) for rows in per_set], p_clean


def attribute_fact(lm, fact: Fact, unit_sets: Sequence[Units], cfg: AttributionConfig, n_ranked: int | None = None) -> list[UnitAttribution]:
    """Scores (``cfg.method``) for each unit set on each prompt of ``fact`` (the prefix cache is shared between sets).

    Each set's ``top`` ranks ``n_ranked`` units (default ``cfg.top_k``)."""
    per_set, p_clean = prompt_scores(lm, fact.prompts, fact_objective(fact), unit_sets, cfg.steps, cfg.batch_size, cfg.method,
                                     cfg.shortlist, cfg.max_memory)
    out = []
    for units, scores in zip(unit_sets, per_set):
        refined = refine_select(coarse_select(scores, cfg.coarse_threshold), cfg.refine_frac)
        out.append(UnitAttribution(units.label, scores, refined, rank_units(scores, refined, n_ranked or cfg.top_k), p_clean))
    return out


def gradient_taps(unit_sets: Sequence[Units], positions: torch.Tensor | None = None) -> tuple[dict, dict[int, torch.Tensor]]:
    """Site edits that leave every activation unchanged but expose each unit set's activations as a leaf
    tensor ``u``: the site output becomes ``x + decode(u) - decode(u).detach()``, so ``d loss / d u`` is
    the exact gradient at that site (through every later layer) and nothing upstream changes.
    ``positions`` (``[batch, p]``): tap only these positions of each row; ``None``: every position.
    Returns ``(edits, leaves)``; ``leaves[j]`` (``[batch, seq or p, n_units]``) fills at each forward."""
    leaves: dict[int, torch.Tensor] = {}
    by_site: dict = {}
    for j, u in enumerate(unit_sets):
        by_site.setdefault(u.site, []).append((j, u))

    def make(taps):
        def edit(x):
            out = x
            idx = None if positions is None else positions.to(x.device)[..., None].expand(-1, -1, x.shape[-1])
            xs = x.detach() if idx is None else x.detach().gather(1, idx)
            for j, units in taps:
                u = units.encode(xs).detach().requires_grad_(True)
                leaves[j] = u
                rec = units.decode(u)
                delta = (rec - rec.detach()).to(x.dtype)
                out = out + delta if idx is None else out.scatter_add(1, idx, delta)
            return out

        return edit

    return {s: make(taps) for s, taps in by_site.items()}, leaves
