"""Training-free erasure editors. Weight editors zero entries of one layer's MLP down projection
``W`` (``[d_model, d_mlp]``, the "value" matrix) and keep the originals for an exact restore.

- ``depn_mask``: DEPN / KN erase: zero the columns of the located neurons (their output weights),
  which is the same as clamping those neurons to 0 (Dai et al. 2022 "erase" with value 0;
  Wu et al. 2023 DEPN). The methods differ in how neurons are chosen (see ``privacy.py``).
- ``feature_edit_mask``: FeatureEdit. For a feature with unit decoder direction ``d`` (in the
  down projection's output space), the part of ``W`` that writes along ``d`` is
  ``P = d dᵀ W``, entrywise ``P_ij = d_i (dᵀ W)_j``: large where output coordinate ``i`` matters to
  the feature *and* neuron ``j`` writes along it. FeatureEdit zeros the entries of ``W`` with the
  largest ``|P_ij|`` (max over the located features): the top ``budget`` entries, or those with
  ``|P_ij| >= tau * max |P|``. Zeroing whole entries (rather than subtracting ``P``) keeps it a
  sparse edit with a count comparable to DEPN's.
- ``RuntimeFeatureEdit``: clamp the features to 0 through the SAE at inference (error term kept),
  an upper bound on what removing the features can do.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from kscope.errors import KscopeError
from kscope.model.hooks import hooked
from kscope.model.sites import down_proj_weight
from kscope.units.base import FeatureUnits, suppress


@dataclass
class WeightEdit:
    """Zero ``W[mask]`` of layer ``layer``'s down projection; ``restore`` puts the originals back."""

    method: str
    layer: int
    mask: torch.Tensor  # [d_model, d_mlp] bool
    units: list[int]
    _saved: torch.Tensor | None = None

    @property
    def n_weights(self) -> int:
        return int(self.mask.sum())

    def apply(self, model) -> None:
        if self._saved is not None:
            raise KscopeError("edit already applied")
        W = down_proj_weight(model, self.layer)
        m = self.mask.to(W.device)
        self._saved = W[m].clone()
        W[m] = 0

    def restore(self, model) -> None:
        if self._saved is None:
            return
        W = down_proj_weight(model, self.layer)
        W[self.mask.to(W.device)] = self._saved
        self._saved = None

    @contextmanager
    def applied(self, model) -> Iterator["WeightEdit"]:
        self.apply(model)
        try:
            yield self
        finally:
            self.restore(model)


def depn_mask(W: torch.Tensor, neurons: Sequence[int]) -> torch.Tensor:
    """Columns of ``W`` (``[d_model, d_mlp]``) for ``neurons``."""
    if any(not 0 <= n < W.shape[1] for n in neurons):
        raise KscopeError(f"neuron index out of range 0..{W.shape[1] - 1}")
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, list(neurons)] = True
    return mask


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


class RuntimeFeatureEdit:
    """Clamp SAE features to 0 at every position during inference (context manager)."""

    def __init__(self, units: FeatureUnits, features: Sequence[int]):
        units.check_index(features)
        self.units, self.features = units, list(features)

    @contextmanager
    def applied(self, model) -> Iterator["RuntimeFeatureEdit"]:
        with hooked(model, {self.units.site: self.units.edit_fn(suppress(self.features))}):
            yield self
