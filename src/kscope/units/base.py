"""One abstraction for "a set of units at a site": MLP neurons (identity dictionary) or SAE features.

A unit set encodes a site activation ``x`` ``[..., d_site]`` into unit activations ``u`` ``[..., n_units]``
and decodes back. Features keep the SAE error term, so ``x -> decode(edit(encode(x))) + (x - decode(encode(x)))``
equals ``x`` when the edit does nothing: splicing the SAE in leaves the model's output unchanged.

One edit rule for every unit set (``Units.scaled``): an edit scales each unit's distance from its centre, the unit's
mean code over the corpus (``units.means.fit_code_means``; 0 where none was fitted): suppress (x0) moves the unit to
its mean, enhance (x2) doubles its distance from it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from kscope.errors import KscopeError
from kscope.model.hooks import EditFn
from kscope.model.sites import Site

UnitOp = Callable[[torch.Tensor], torch.Tensor]
"""Maps unit activations ``[..., n_units]`` to edited ones."""


class Units:
    """Base class: identity dictionary over the site's own coordinates (MLP neurons)."""

    kind = "neuron"
    signed = True  # activations take either sign (rank them by magnitude)
    code_mean: torch.Tensor | None = None  # [n_units]: each unit's mean code over the corpus, the centre of its edits

    def __init__(self, site: Site, n_units: int):
        self.site = site
        self.n_units = n_units

    def centre(self, u: torch.Tensor) -> torch.Tensor:
        """``[n_units]`` on ``u``'s device and dtype: the code an edit moves each unit toward (its mean, or 0)."""
        if self.code_mean is None:
            return torch.zeros(u.shape[-1], device=u.device, dtype=u.dtype)
        return self.code_mean.to(u.device, u.dtype)

    def scaled(self, u: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """The edit rule: ``c + f (u - c)`` per unit (``f`` 0 suppress, 2 enhance, 1 keep), written ``u + (f - 1)(u - c)``
        so a kept unit stays bit-exact."""
        if self.code_mean is None:
            return u * factors
        return u + (factors - 1) * (u - self.centre(u))

    def op(self, name: str, idx: Sequence[int]) -> UnitOp:
        """``suppress`` / ``enhance`` of the units ``idx`` about this set's centre."""
        return OPS[name](idx, centre=self.code_mean)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        return u

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, err)`` with ``decode(u) + err == x``."""
        u = self.encode(x)
        return u, x - self.decode(u)

    def edit_fn(self, op: UnitOp) -> EditFn:
        """A site edit that applies ``op`` to the unit activations and keeps the error term."""

        def fn(x: torch.Tensor) -> torch.Tensor:
            u, err = self.split(x)
            return (self.decode(op(u)) + err).to(x.dtype)

        return fn

    def check_index(self, idx: Sequence[int]) -> None:
        bad = [i for i in idx if not 0 <= int(i) < self.n_units]
        if bad:
            raise KscopeError(f"unit index {bad[0]} out of range for {self.n_units} {self.kind}s at {self.site.name}")

    def direction_norms(self) -> torch.Tensor:
        """``[n_units]``: the norm of what one unit of activation writes (``|u| x norm`` is a unit's contribution)."""
        return torch.ones(self.n_units)

    @property
    def label(self) -> str:
        return f"{self.kind}s@{self.site.name}"


class NeuronUnits(Units):
    """MLP neurons (``site.kind`` should be ``mlp.neurons``; any site works as a coordinate basis)."""

    kind = "neuron"

    def __init__(self, site: Site, n_units: int, out_norms: torch.Tensor | None = None):
        super().__init__(site, n_units)
        self.out_norms = out_norms  # norms of the down-projection's columns: what each neuron writes to mlp.out

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros_like(x)

    def direction_norms(self) -> torch.Tensor:
        return self.out_norms if self.out_norms is not None else super().direction_norms()

    def edit_fn(self, op: UnitOp) -> EditFn:
        return lambda x: op(x).to(x.dtype)


class FeatureUnits(Units):
    """Features of a SAELens SAE attached at ``site``."""

    kind = "feature"
    signed = False  # ReLU / TopK / JumpReLU codes are never negative

    def __init__(self, site: Site, sae):
        super().__init__(site, int(sae.cfg.d_sae))
        self.sae = sae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes on ``x``'s device (activations collected on the CPU meet an SAE on the GPU)."""
        w = self.sae.W_enc
        return self.sae.encode(x.to(w.device, w.dtype)).to(x.device)

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(u.to(self.sae.W_dec.device)).to(u.device)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.encode(x)
        return u, x.to(u.dtype) - self.decode(u)

    @property
    def decoder(self) -> torch.Tensor:
        """Decoder directions ``[n_units, d_site]``."""
        return self.sae.W_dec

    def direction_norms(self) -> torch.Tensor:
        return self.sae.W_dec.detach().float().norm(dim=1).cpu()


def _index(idx: Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    return torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long, device=device)


def suppress(idx: Sequence[int], centre: torch.Tensor | None = None) -> UnitOp:
    """Set the units ``idx`` to their centre (``[n_units]``; default 0)."""

    def op(u: torch.Tensor) -> torch.Tensor:
        u = u.clone()
        i = _index(idx, u.device)
        u[..., i] = 0 if centre is None else centre.to(u.device, u.dtype)[i]
        return u

    return op


def enhance(idx: Sequence[int], factor: float = 2.0, centre: torch.Tensor | None = None) -> UnitOp:
    """Scale the units ``idx``'s distance from their centre (``[n_units]``; default 0) by ``factor``."""

    def op(u: torch.Tensor) -> torch.Tensor:
        u = u.clone()
        i = _index(idx, u.device)
        if centre is None:
            u[..., i] = u[..., i] * factor
        else:
            u[..., i] = u[..., i] + (factor - 1) * (u[..., i] - centre.to(u.device, u.dtype)[i])
        return u

    return op


def set_to(idx: Sequence[int], value: float) -> UnitOp:
    """Set the units ``idx`` to ``value``."""

    def op(u: torch.Tensor) -> torch.Tensor:
        u = u.clone()
        u[..., _index(idx, u.device)] = value
        return u

    return op


OPS = {"suppress": suppress, "enhance": enhance}
