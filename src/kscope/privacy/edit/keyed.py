"""Key-conditioned erasure: closed-form edits of a band of down projections that change the MLP output only for the
erased people's keys (MEMIT's update with AlphaEdit's alternative, ``kscope.privacy.edit.solver``), through any handle.

Keys are the MLP hidden activations at the positions that read a secret out: the prompt's last token and the secret's
own teacher-forced tokens, up to the last scored one. Targets:

- ``optimised`` (MEMIT's ``compute_z``, ``memit/compute_z.py``, with the fact-erasure loss of Patil et al. 2024): a
  shift ``δ`` of the residual after the last band layer at each key position, found by gradient steps that minimise
  the secret's probability (``exp`` of its mean token log-probability), with MEMIT's weight decay ``wd ‖δ‖/‖h‖²`` and
  norm clamp ``‖δ‖ <= clamp ‖h‖``; the band's layers then share the change, each solving for ``(z - h) / layers left``
  on the model as edited so far (MEMIT's spreading). Every handle gets the same target.
- ``reverse`` (training-free): at each layer, the handle's own located units' contribution at the key, reversed:
  ``-(1 + γ) D_S a_S`` for features, ``-(1 + γ) W_N a_N`` for neurons.

Preserved keys: the kept people's key positions, known facts' key positions and corpus tokens, each group's second
moment weighted equally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kscope.config import Config, option
from kscope.facts import Fact
from kscope.model.head import plain_head
from kscope.model.hooks import BlockReplay, hooked
from kscope.model.readout import logits_at, pad_rows
from kscope.model.sites import Site, down_proj_weight, final_norm, n_layers
from kscope.privacy.edit.solver import PRESERVE, expressible, second_moment, solve_columns, solve_directions, solve_unrestricted
from kscope.units.base import FeatureUnits

TARGETS = ("optimised", "reverse")


@dataclass
class KeyedConfig(Config):
    """The key-conditioned closed-form edit (MEMIT / AlphaEdit style) and its preservation."""

    target: str = option("optimised", "What the erased keys' MLP outputs should become: 'optimised' (a residual shift found by "
                                      "gradient steps that minimise the secret's probability, spread over the band as MEMIT "
                                      "does; the same for every handle) or 'reverse' (each handle's located units' "
                                      "contribution reversed, -(1 + gamma) times it; training-free).", choices=TARGETS,
                         label="keyed target")
    preserve: str = option("ridge", "How preserved keys are kept: 'ridge' (MEMIT's lambda x their second moment) or 'nullspace' "
                                    "(AlphaEdit: the edit lives in the near-null space of their second moment).",
                           choices=PRESERVE, label="preservation")
    lams: list[float] = option(help="Ridge weights lambda of the preserved keys, relative to the erased keys (the strength "
                                    "sweep of every handle).", factory=lambda: [3.0, 10.0], min=0.0, unique=True)
    tol: float = option(1e-3, "nullspace: eigenvalues of the preserved second moment below tol x the largest count as null.",
                        min=0.0, max=1.0)
    gamma: float = option(1.0, "reverse: the located contribution becomes -(1 + gamma) times itself.", min=0.0, max=100.0)
    steps: int = option(25, "optimised: gradient steps of the residual shift (MEMIT: 25).", min=1, max=1000)
    lr: float = option(0.5, "optimised: Adam learning rate of the shift (MEMIT: 0.5).", min=1e-6, max=100.0)
    weight_decay: float = option(0.5, "optimised: weight of ||delta|| / ||h||^2 in the loss (MEMIT: 0.5).", min=0.0, max=100.0)
    clamp: float = option(0.75, "optimised: the shift's norm is at most clamp x the residual's (MEMIT: 0.75).", min=0.0, max=100.0)
    corpus_tokens: int = option(12000, "Corpus training tokens whose keys are preserved.", min=0, max=10_000_000)


@dataclass
class KeyRows:
    """Teacher-forced rows of some facts' prompts and their key positions (those that predict the scored secret tokens)."""

    ids: torch.Tensor
    mask: torch.Tensor
    keys: torch.Tensor  # bool [rows, seq]
    targets: list[list[int]]  # per row, the scored tokens (one per key position, in order)

    @classmethod
    def of(cls, tokenizer, facts: Sequence[Fact], prompts: str = "prompts", per_fact: int | None = None) -> "KeyRows":
        rows, keys, tgts = [], [], []
        for f in facts:
            secret = list(f.target_tokens) if f.target_tokens else [f.target_id]
            for p in getattr(f, prompts)[:per_fact]:
                ids = tokenizer(p).input_ids
                rows.append(ids + secret[:-1])
                keys.append([len(ids) - 1 + t for t in range(f.score_from, len(secret))])
                tgts.append(secret[f.score_from :])
        if not rows:
            return cls(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool), [])
        ids, mask = pad_rows(rows, tokenizer.pad_token_id or 0)
        km = torch.zeros(ids.shape, dtype=torch.bool)
        for r, ks in enumerate(keys):
            km[r, ks] = True
        return cls(ids, mask, km, tgts)


@torch.no_grad()
def at_keys(lm, rows: KeyRows, sites: Sequence[Site], batch: int = 64) -> dict[Site, torch.Tensor]:
    """Each site's activations at the key positions, ``[n_keys, d]`` (rows in order, keys left to right)."""
    out: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    for i in range(0, rows.ids.shape[0], batch):
        sl = slice(i, i + batch)
        with hooked(lm.model, capture=sites) as cap:
            lm.model.base_model(input_ids=rows.ids[sl].to(lm.device), attention_mask=rows.mask[sl].to(lm.device), use_cache=False)
        for s in sites:
            out[s].append(cap[s][rows.keys[sl].to(lm.device)].float())
    return {s: torch.cat(v) for s, v in out.items()}


@torch.no_grad()
def corpus_keys(lm, windows: Sequence[Sequence[int]], sites: Sequence[Site], batch: int = 32) -> dict[Site, torch.Tensor]:
    """Sites' activations at every token of corpus windows but their first (the attention sink)."""
    out: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    for i in range(0, len(windows), batch):
        ids, mask = pad_rows(windows[i : i + batch], lm.tokenizer.pad_token_id or 0)
        keep = mask.bool()
        keep[:, 0] = False
        with hooked(lm.model, capture=sites) as cap:
            lm.model.base_model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
        for s in sites:
            out[s].append(cap[s][keep.to(lm.device)].float())
    return {s: torch.cat(v) for s, v in out.items()}


def preserved_moments(lm, layers: Sequence[int], groups: Sequence[KeyRows], windows: Sequence[Sequence[int]],
                      extra: Sequence[dict[int, torch.Tensor]] = ()) -> dict[int, torch.Tensor]:
    """Per layer, the mean of each preserved group's second moment of MLP keys (kept secrets, known facts, corpus, and
    ``extra`` groups given as moments: ``kscope forget``'s earlier erasures)."""
    sites = [Site(L, "mlp.neurons") for L in layers]
    parts = [{s.layer: second_moment(v) for s, v in at_keys(lm, g, sites).items()} for g in groups if g.ids.shape[0]]
    if windows:
        parts.append({s.layer: second_moment(v) for s, v in corpus_keys(lm, windows, sites).items()})
    parts += [{L: m[L].to(lm.device) for L in layers} for m in extra]
    return {L: sum(p[L] for p in parts) / len(parts) for L in layers}


def keyed_inputs(lm, erase: Sequence[Fact], preserved: Sequence[KeyRows], windows: Sequence[Sequence[int]], layers: Sequence[int],
                 cfg: KeyedConfig, extra: Sequence[dict[int, torch.Tensor]] = ()) -> tuple[KeyRows, dict[int, torch.Tensor], torch.Tensor | None]:
    """What every keyed edit of ``erase`` needs, on the model as it is: the key rows, each layer's preserved moment and
    (``optimised``) the target residual ``z`` after the band's last layer. The erase study and ``kscope forget`` share it."""
    rows = KeyRows.of(lm.tokenizer, erase)
    moments = preserved_moments(lm, layers, preserved, windows, extra)
    z = optimise_z(lm, rows, max(layers), cfg)[1] if cfg.target == "optimised" else None
    return rows, moments, z


def optimise_z(lm, rows: KeyRows, layer: int, cfg: KeyedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual after ``layer`` at the key positions, ``h`` ``[n_keys, d]``, and the target ``z = h + δ`` that makes
    the secrets unlikely (MEMIT's ``compute_z`` with the fact-erasure loss; blocks up to ``layer`` never rerun)."""
    model = lm.model
    last = layer == n_layers(model) - 1
    ids, mask, km = rows.ids.to(lm.device), rows.mask.to(lm.device), rows.keys.to(lm.device)
    site = Site(layer, "resid.post")
    with torch.no_grad(), hooked(model, capture=[site]) as cap:
        model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    full = cap[site].detach()
    h0 = full[km].float()
    tgt = torch.tensor([t for ts in rows.targets for t in ts], device=lm.device)
    row_of = torch.tensor([r for r, ts in enumerate(rows.targets) for _ in ts], device=lm.device)
    n_per_row = torch.bincount(row_of, minlength=len(rows.targets)).float()
    width = max(len(ts) for ts in rows.targets)
    where = [torch.nonzero(km[r]).flatten().tolist() for r in range(km.shape[0])]
    pos = torch.tensor([w + [w[-1]] * (width - len(w)) for w in where], device=lm.device)  # [rows, width]
    valid = torch.tensor([[j < len(w) for j in range(width)] for w in where], device=lm.device)
    replay = None if last else BlockReplay(model, layer + 1)
    head = plain_head(model)
    norm = final_norm(model)
    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    for _ in range(cfg.steps):
        with torch.enable_grad():
            if last:  # the residual after the last block goes straight to the head
                z = norm(h0 + delta)
                logits = head(z) if head is not None else model.get_output_embeddings()(z)
            else:
                shifted = full.clone()
                shifted[km] = (h0 + delta).to(full.dtype)
                replay.states = [shifted]
                with replay.replaying():
                    logits = logits_at(model, ids, mask, pos)[valid]
            lp = logits.float().log_softmax(-1)[torch.arange(len(tgt)), tgt]
            per_row = torch.zeros(len(rows.targets), device=lp.device).index_add(0, row_of, lp) / n_per_row
            loss = per_row.exp().mean() + cfg.weight_decay * (delta.norm(dim=1) / h0.norm(dim=1).pow(2)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            cap_norm = cfg.clamp * h0.norm(dim=1, keepdim=True)
            n = delta.norm(dim=1, keepdim=True)
            delta.mul_(torch.where(n > cap_norm, cap_norm / n.clamp_min(1e-12), torch.ones_like(n)))
    return h0, (h0 + delta).detach()


@dataclass
class Handle:
    """What an edit may change at each layer: ``None`` (anything), directions ``[s, d_model]`` or columns."""

    kind: str  # unrestricted | directions | columns
    per_layer: dict[int, torch.Tensor | list[int]]
    units: dict[int, object] | None = None  # reverse target: each layer's units (FeatureUnits or None for neurons)


def keyed_edit(lm, rows: KeyRows, layers: Sequence[int], handle: Handle, C: dict[int, torch.Tensor], lam: float,
               cfg: KeyedConfig, z: torch.Tensor | None = None, unedited: dict | None = None) -> tuple[dict[int, torch.Tensor], int]:
    """New down projections of ``layers``, the edit's degrees of freedom, and the share of the target the handle can
    express at the keys (``solver.expressible``, summed over layers). ``optimised``: layers in order, each solving
    for its share of ``z - h`` on the model as edited so far (MEMIT); ``reverse``: each layer's located units' contribution
    reversed at the keys. The model is restored before returning. ``unedited``: a dict kept across calls with the same
    ``rows`` on the unedited model; it memoises the activations at the keys until this edit first changes a weight
    (one forward of the whole model fewer per edit)."""
    model = lm.model
    clean = {L: down_proj_weight(model, L).clone() for L in layers}
    last = Site(max(layers), "resid.post")
    params, edited, held, total = 0, False, 0.0, 0.0
    try:
        for i, L in enumerate(sorted(layers)):
            if handle.kind != "unrestricted" and not len(handle.per_layer.get(L, [])):
                continue
            key, out = Site(L, "mlp.neurons"), Site(L, "mlp.out")
            sites = (key, out, last)
            if edited or unedited is None:  # an earlier layer of this edit changed the activations
                got = at_keys(lm, rows, sites)
            else:
                if sites not in unedited:
                    unedited[sites] = at_keys(lm, rows, sites)
                got = unedited[sites]
            K = got[key].T  # [m, n]
            if cfg.target == "optimised":
                R = ((z - got[last]) / (len(layers) - i)).T
            else:
                R = -(1 + cfg.gamma) * _contribution(model, L, handle, got[key], got[out]).T
            kw = dict(preserve=cfg.preserve, lam=lam, tol=cfg.tol)
            if handle.kind == "unrestricted":
                sol = solve_unrestricted(R, K, C[L], **kw)
                share = expressible(R, K)
            elif handle.kind == "directions":
                sol = solve_directions(R, K, C[L], handle.per_layer[L], **kw)
                share = expressible(R, K, directions=handle.per_layer[L])
            else:
                sol = solve_columns(R, K, C[L], handle.per_layer[L], **kw)
                share = expressible(R, K, columns=handle.per_layer[L])
            held, total = held + share[0], total + share[1]
            W = down_proj_weight(model, L)
            W.add_(sol.delta.to(W.device, W.dtype))
            params, edited = params + sol.params, True
        return {L: down_proj_weight(model, L).clone() for L in layers}, params, (held / total if total > 0 else None)
    finally:
        for L, W in clean.items():
            down_proj_weight(model, L).copy_(W)


def _contribution(model, layer: int, handle: Handle, keys: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
    """The handle's located units' part of the MLP output at each key, ``[n, d_model]``."""
    units = (handle.units or {}).get(layer)
    sel = handle.per_layer[layer]
    if isinstance(units, FeatureUnits):
        idx = list(sel)
        with torch.no_grad():
            a = units.encode(mlp_out.to(units.sae.W_enc.device))[:, idx].float()
        return a @ units.decoder[idx].float().to(a.device)
    W = down_proj_weight(model, layer).float()
    idx = list(sel)
    return keys[:, idx] @ W[:, idx].T
