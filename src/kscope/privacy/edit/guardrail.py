"""A gated runtime clamp of SAE features (after Dynamic SAE Guardrails, Muhamed et al. 2025,
``evals/unlearning/utils/intervention.py::anthropic_clamp_resid_SAE_features``).

At each edited site the located features are read; where any of them fires above ``gate`` times its activation on
the secrets (per token), every located feature there is set to ``-clamp`` times that activation scale and the SAE
error is added back. Elsewhere the site's activation is returned untouched, so inputs on which no located feature
fires run exactly as before. The DSG code gates per sequence (the share of firing tokens above a percentile of
retain data); kscope gates per token, which also works during KV-cache decoding, where a sequence is one token.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from kscope.model.hooks import hooked
from kscope.units.base import FeatureUnits


class GatedClamp:
    """``features[layer] = (units, indices, scale)``: the located features of a site and their activation scale on the
    secrets (``[len(indices)]``, e.g. the mean activation where they fire on the erased prompts)."""

    runtime = True

    def __init__(self, features: Mapping[int, tuple[FeatureUnits, Sequence[int], torch.Tensor]], gate: float = 0.5,
                 clamp: float = 2.0):
        for units, idx, _ in features.values():
            units.check_index(idx)
        self.features, self.gate, self.clamp = dict(features), gate, clamp

    def edit(self, units: FeatureUnits, idx: Sequence[int], scale: torch.Tensor):
        """The site edit: unchanged where no located feature fires above the gate, clamped where one does."""
        i = torch.as_tensor(list(idx), dtype=torch.long)

        def fn(x: torch.Tensor) -> torch.Tensor:
            u, err = units.split(x)
            ii, sc = i.to(u.device), scale.to(u.device, u.dtype)
            fires = (u[..., ii] > self.gate * sc).any(-1, keepdim=True)  # [..., 1]
            if not bool(fires.any()):
                return x
            v = u.clone()
            v[..., ii] = -self.clamp * sc
            new = (units.decode(v) + err).to(x.dtype)
            return torch.where(fires, new, x)

        return fn

    @contextmanager
    def applied(self, model) -> Iterator["GatedClamp"]:
        edits = {units.site: self.edit(units, idx, scale) for units, idx, scale in self.features.values() if len(idx)}
        with hooked(model, edits):
            yield self


@torch.no_grad()
def activation_scale(units: FeatureUnits, acts: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """Each feature's mean activation where it fires over site activations ``acts`` ``[n, d]`` (1 where it never fires)."""
    u = units.encode(acts)[:, list(idx)].float()
    on = u > 0
    return torch.where(on.any(0), (u * on).sum(0) / on.sum(0).clamp_min(1), torch.ones(u.shape[1]))
