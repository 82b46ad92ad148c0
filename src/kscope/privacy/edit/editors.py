"""Training-free erasure editors, over any number of layers. Weight editors change the MLP down
projections ``W_l`` (``[d_model, d_mlp]``, the "value" matrices) and keep the originals for an
exact restore; runtime editors clamp SAE features through hooks.

- ``zero_columns``: DEPN / KN erase: zero the columns of the located neurons (their output
  weights), the same as clamping those neurons to 0 (Dai et al. 2022 "erase" with value 0; Wu et
  al. 2023 DEPN). The methods differ in how neurons are chosen (``privacy.select``).
- ``feature_edit``: FeatureEdit as the paper describes it. For a located feature's unit decoder
  direction ``d`` (in the down projection's output space) the part of ``W`` that writes along ``d``
  is ``P = d dᵀ W``; zero the entries with ``|P_ij| >= tau * max |P|``, each feature with its own
  maximum, so the budget (the number of features) sets how many weights change.
  ``feature_edit_mask`` gives the mask of one set of directions (top ``budget`` entries or ``tau``).
- ``projection_removal``: ``W <- (I - D D⁺) W`` over the located directions ``D``: afterwards no
  neuron writes along any of them (``dᵀ W = 0``).
- ``RuntimeFeatureEdit``: clamp features through the SAE at inference (error term kept): to 0, or
  negatively where they fire (``u -> -c u`` for ``u > 0``, after Farrell et al. 2024).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from kscope.errors import KscopeError
from kscope.model.hooks import hooked
from kscope.model.sites import down_proj_weight
from kscope.units.base import FeatureUnits, suppress


class WeightEdit:
    """New values for some layers' down projections; ``applied`` swaps them in and restores the originals exactly."""

    runtime = False

    def __init__(self, method: str, new: Mapping[int, torch.Tensor], expressible: float | None = None):
        self.method, self.new = method, dict(new)
        self.expressible = expressible  # keyed edits: the share of the target their handle can hold at the keys

    def n_weights(self, model) -> int:
        """Entries that differ from the model's current weights."""
        return int(sum(int((down_proj_weight(model, L) != W.to(down_proj_weight(model, L).device)).sum()) for L, W in self.new.items()))

    @contextmanager
    def applied(self, model) -> Iterator["WeightEdit"]:
        saved = {L: down_proj_weight(model, L).clone() for L in self.new}
        try:
            for L, W in self.new.items():
                down_proj_weight(model, L).copy_(W)
            yield self
        finally:
            for L, W in saved.items():
                down_proj_weight(model, L).copy_(W)


def zero_columns(model, units: Sequence[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """Down projections with the columns of ``units`` (``(layer, neuron)``) zeroed."""
    by: dict[int, list[int]] = {}
    for L, n in units:
        by.setdefault(L, []).append(n)
    out = {}
    for L, ns in by.items():
        W = down_proj_weight(model, L).clone()
        if any(not 0 <= n < W.shape[1] for n in ns):
            raise KscopeError(f"neuron index out of range 0..{W.shape[1] - 1} at layer {L}")
        W[:, ns] = 0
        out[L] = W
    return out


def direction_projection(W: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``max_f |d_f d_fᵀ W|`` entrywise, ``[d_model, d_mlp]``; ``directions``: ``[n_f, d_model]`` (normalised here)."""
    if directions.ndim != 2 or directions.shape[1] != W.shape[0]:
        raise KscopeError(f"feature directions {tuple(directions.shape)} do not live in the down projection's output space ({W.shape[0]})")
    d = directions.float() / directions.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    coef = d @ W.float()  # [n_f, d_mlp]
    return (d[:, :, None] * coef[:, None, :]).abs().amax(0)


def feature_edit_mask(W: torch.Tensor, directions: torch.Tensor, budget: int | None = None, tau: float | None = None) -> torch.Tensor:
    """Entries of ``W`` carrying the features' directions: top ``budget`` of ``|P|`` or ``|P| >= tau * max|P|``."""
    if (budget is None) == (tau is None):
        raise KscopeError("give exactly one of budget or tau")
    P = direction_projection(W, directions)
    mask = torch.zeros_like(P, dtype=torch.bool)
    if budget is not None:
        if budget <= 0:
            return mask
        idx = P.flatten().topk(min(budget, P.numel())).indices
        mask.view(-1)[idx] = True
    else:
        mask = P >= tau * P.max()
    return mask


def feature_edit(model, directions: Mapping[int, torch.Tensor], tau: float) -> dict[int, torch.Tensor]:
    """FeatureEdit at each layer: for each located feature ``d``, zero the entries of ``W`` with
    ``|d dᵀ W| >= tau * max |d dᵀ W|`` (that feature's own maximum), so every feature adds the entries that carry it
    and the weights changed grow with the number of features (the budget)."""
    out = {}
    for L, D in directions.items():
        W = down_proj_weight(model, L).clone()
        mask = torch.zeros_like(W, dtype=torch.bool)
        for d in D.to(W.device).float():
            d = d / d.norm().clamp_min(1e-12)
            P = (d[:, None] * (d @ W.float())[None, :]).abs()  # |d dᵀ W|, [d_model, d_mlp]
            mask |= P >= tau * P.max()
        W[mask] = 0
        out[L] = W
    return out


def projection_removal(model, directions: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """``W <- (I - D D⁺) W`` at each layer, ``D`` = the located decoder directions as columns ``[d_model, n]``."""
    out = {}
    for L, D in directions.items():
        W = down_proj_weight(model, L)
        Dm = D.to(W.device, torch.float64).T  # [d_model, n]
        P = Dm @ torch.linalg.pinv(Dm)
        out[L] = (W.double() - P @ W.double()).to(W.dtype)
    return out


class RuntimeFeatureEdit:
    """Clamp SAE features at every position during inference (context manager): to 0 (``negative=None``),
    or where they fire to ``-negative`` times their activation."""

    runtime = True

    def __init__(self, features: Mapping[int, tuple[FeatureUnits, Sequence[int]]], negative: float | None = None):
        for units, idx in features.values():
            units.check_index(idx)
        self.features, self.negative = dict(features), negative

    def _op(self, idx: Sequence[int]):
        if self.negative is None:
            return suppress(idx)
        c = self.negative

        def op(u: torch.Tensor) -> torch.Tensor:
            u = u.clone()
            i = torch.as_tensor(list(idx), device=u.device)
            sel = u[..., i]
            u[..., i] = torch.where(sel > 0, -c * sel, sel)
            return u

        return op

    @contextmanager
    def applied(self, model) -> Iterator["RuntimeFeatureEdit"]:
        edits = {units.site: units.edit_fn(self._op(idx)) for units, idx in self.features.values() if len(idx)}
        with hooked(model, edits):
            yield self
