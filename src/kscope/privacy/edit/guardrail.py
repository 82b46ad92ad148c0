"""Gated runtime clamps of SAE features.

``GatedClamp`` is Dynamic SAE Guardrails' rule (Muhamed et al. 2025; followed ``aashiqmuhamed/DynamicSAEGuardrails``
``evals/unlearning/utils/intervention.py::anthropic_clamp_resid_SAE_features`` and, for the sequence threshold,
``evals/unlearning/utils/feature_activation.py::get_top_features_percentile``):

- a token is *active* where any located feature fires (> 0); the first position never is (DSG zeroes BOS);
- a sequence is *gated* where its share of active tokens exceeds ``threshold`` (DSG: the 95th percentile of that
  share over retain sequences, ``sequence_threshold``);
- at the active tokens of a gated sequence the located features are set to ``-clamp`` (here ``-clamp`` x each
  feature's activation scale on the secrets: DSG's multiplier, 500, is in its SAEs' units) and the SAE error is added
  back. As in DSG's code (whose mask is per token, broadcast over the features) every located feature is clamped at an
  active token, not only those that fire there. Every other token is returned untouched, bit for bit.

The gate is causal: at position t the share is over positions 0..t, the share DSG's code gives the sequence so far at
its newest token. So teacher-forced scoring equals greedy decoding, and during KV-cache decoding (one token per call)
the counts carry over from the prompt: the first generated token is gated by the prompt's share (with itself), as DSG
would gate the prompt plus that token. DSG computes one share over the whole sequence, which would let the answer's
tokens decide whether the prompt is clamped.

``ClampAll`` is kscope's earlier per-token variant (method ``clamp-all``): where any located feature fires above
``gate`` x its scale, every located feature is set to ``-clamp`` x its scale; there is no sequence gate.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from kscope.model.hooks import hooked
from kscope.units.base import FeatureUnits


class GatedClamp:
    """``features[layer] = (units, indices, scale, threshold)``: a site's located features, their activation scale on
    the secrets (``[len(indices)]``) and the share of active tokens above which a sequence is gated."""

    runtime = True

    def __init__(self, features: Mapping[int, tuple[FeatureUnits, Sequence[int], torch.Tensor, float]], clamp: float = 2.0):
        for units, idx, _, _ in features.values():
            units.check_index(idx)
        self.features, self.clamp = dict(features), clamp

    def edit(self, units: FeatureUnits, idx: Sequence[int], scale: torch.Tensor, threshold: float):
        """The site edit. It keeps each row's running counts so that a one-token call right after a call of the same
        batch size continues that sequence (KV-cache decoding); any longer call starts new sequences."""
        i = torch.as_tensor(list(idx), dtype=torch.long)
        carry: dict[str, tuple[torch.Tensor, int]] = {}

        def fn(x: torch.Tensor) -> torch.Tensor:
            flat = x.ndim == 2
            x3 = x[None] if flat else x  # [batch, seq, d]
            u, err = units.split(x3)
            ii, sc = i.to(u.device), scale.to(u.device, u.dtype)
            active = (u[..., ii] > 0).any(-1)  # [batch, seq]
            b, t = active.shape
            prev = carry.get("counts")
            if t == 1 and prev is not None and prev[0].shape[0] == b:
                fired0, seen0 = prev
            else:
                active[:, 0] = False
                fired0, seen0 = torch.zeros(b, device=u.device), 0
            fired = fired0[:, None] + active.float().cumsum(1)
            seen = seen0 + torch.arange(1, t + 1, device=u.device, dtype=torch.float32)
            carry["counts"] = (fired[:, -1], seen0 + t)
            mask = active & (fired / seen > threshold)
            if not bool(mask.any()):
                return x
            v = u.clone()
            v[..., ii] = torch.where(mask[..., None], -self.clamp * sc, u[..., ii])
            out = torch.where(mask[..., None], (units.decode(v) + err).to(x.dtype), x3)
            return out[0] if flat else out

        return fn

    @contextmanager
    def applied(self, model) -> Iterator["GatedClamp"]:
        edits = {units.site: self.edit(units, idx, scale, thr) for units, idx, scale, thr in self.features.values() if len(idx)}
        with hooked(model, edits):
            yield self


class ClampAll:
    """kscope's earlier per-token clamp: ``features[layer] = (units, indices, scale)``; where any located feature fires
    above ``gate`` x its scale, every located feature there is set to ``-clamp`` x its scale."""

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
    def applied(self, model) -> Iterator["ClampAll"]:
        edits = {units.site: self.edit(units, idx, scale) for units, idx, scale in self.features.values() if len(idx)}
        with hooked(model, edits):
            yield self


@torch.no_grad()
def activation_scale(units: FeatureUnits, acts: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """Each feature's mean activation where it fires over site activations ``acts`` ``[n, d]`` (1 where it never fires)."""
    u = units.encode(acts)[:, list(idx)].float()
    on = u > 0
    return torch.where(on.any(0), (u * on).sum(0) / on.sum(0).clamp_min(1), torch.ones(u.shape[1]))


@torch.no_grad()
def sequence_threshold(units: FeatureUnits, retain: Sequence[torch.Tensor], idx: Sequence[int], percentile: float = 95.0) -> float:
    """DSG's sequence threshold: the ``percentile`` of the share of active tokens (any of ``idx`` > 0; the first position
    never) over retain sequences, each ``[seq, d]`` site activations (``get_top_features_percentile``)."""
    if not retain or not len(idx):
        return 0.0
    rates = []
    for a in retain:
        active = (units.encode(a)[:, list(idx)] > 0).any(-1)
        active[0] = False
        rates.append(int(active.sum()) / active.shape[0])
    return float(np.percentile(rates, percentile))
