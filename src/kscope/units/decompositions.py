"""Other decompositions of a site, as unit sets: PCA, ICA (scikit-learn FastICA), random directions.

Each is a linear dictionary ``codes = topk((x - mean) @ E)``, ``x_hat = codes @ D + mean`` with the
same number of active codes per token (``k``) as the SAE it is compared with, so reconstruction is
compared at equal L0. They plug into the same attribution and ablation code as neurons and features.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from kscope.model.sites import Site
from kscope.numerics import fixed_threads
from kscope.units.base import NeuronUnits, Units

BASELINES = ("basis", "pca", "random")
"""Complete same-site dictionaries a site's SAE features are compared with (``baseline_units``)."""


def topk_abs(c: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the ``k`` largest-magnitude entries of the last dim, zero the rest."""
    if k is None or k >= c.shape[-1]:
        return c
    idx = c.abs().topk(k, dim=-1).indices
    return torch.zeros_like(c).scatter(-1, idx, c.gather(-1, idx))


class LinearDictUnits(Units):
    """Units of a fixed linear dictionary. ``enc``: ``[d, n]``, ``dec``: ``[n, d]``, ``mean``: ``[d]``."""

    def __init__(self, site: Site, enc: torch.Tensor, dec: torch.Tensor, mean: torch.Tensor, k: int | None, kind: str):
        super().__init__(site, enc.shape[1])
        self.enc, self.dec, self.mean, self.k = enc.float(), dec.float(), mean.float(), k
        self.kind = kind

    def to(self, device) -> "LinearDictUnits":
        self.enc, self.dec, self.mean = self.enc.to(device), self.dec.to(device), self.mean.to(device)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.enc.device != x.device:  # fitted on CPU activations; follow the model (e.g. CUDA)
            self.to(x.device)
        return topk_abs((x.float() - self.mean) @ self.enc, self.k)

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        if self.dec.device != u.device:
            self.to(u.device)
        return u @ self.dec + self.mean

    def direction_norms(self) -> torch.Tensor:
        return self.dec.norm(dim=1).cpu()


class BasisUnits(NeuronUnits):
    """The site's own coordinates as units (at ``resid.post``: the residual stream's basis). Edited like every set, about
    its mean code (``Units.scaled``): with its fitted mean (``units.means``) suppressing a coordinate sets it to its corpus
    mean, and suppressing all of them leaves the site at its mean, as PCA and random directions do."""

    kind = "basis"


@contextmanager
def one_thread():
    """One BLAS / LAPACK thread for numpy (sklearn) and torch inside: a fit's last digits otherwise follow the thread
    count (``OMP_NUM_THREADS=1`` and 2 gave PCA and random baselines 1e-6 apart)."""
    from threadpoolctl import threadpool_limits

    # torch's threads are set back last: when threadpoolctl's exit ran after torch's, OpenMP got its threads back but MKL
    # stayed on one for the rest of the process (torch said 2, so it never set 2 again): every later stage ran at half speed
    with fixed_threads(1), threadpool_limits(limits=1):
        yield


def pca_units(site: Site, acts: torch.Tensor, n: int | None = None, k: int | None = None) -> LinearDictUnits:
    """PCA with ``n`` components (default: full width) of ``acts`` ``[N, d]``."""
    from sklearn.decomposition import PCA

    n = n or acts.shape[1]
    with one_thread():
        p = PCA(n_components=min(n, *acts.shape)).fit(acts.numpy())
    V = torch.from_numpy(p.components_.astype(np.float32))
    return LinearDictUnits(site, V.T, V, torch.from_numpy(p.mean_.astype(np.float32)), k, "pca")


def ica_units(site: Site, acts: torch.Tensor, n: int | None = None, k: int | None = None, seed: int = 0, max_iter: int = 400) -> LinearDictUnits:
    """FastICA with ``n`` components; ``sources = (x - mean) @ components_.T``, ``x = sources @ mixing_.T + mean``."""
    import warnings

    from sklearn.decomposition import FastICA

    n = min(n or acts.shape[1], *acts.shape)
    with warnings.catch_warnings():  # not one_thread(): its many passes would double faithfulness's time on 2 cores
        warnings.simplefilter("ignore")  # convergence warnings on small CPU budgets
        ica = FastICA(n_components=n, whiten="unit-variance", random_state=seed, max_iter=max_iter, tol=1e-3).fit(acts.numpy())
    E = torch.from_numpy(ica.components_.T.astype(np.float32))
    D = torch.from_numpy(ica.mixing_.T.astype(np.float32))
    return LinearDictUnits(site, E, D, torch.from_numpy(ica.mean_.astype(np.float32)), k, "ica")


def random_units(site: Site, d: int, n: int | None = None, k: int | None = None, seed: int = 0, mean: torch.Tensor | None = None) -> LinearDictUnits:
    """``n <= d`` random orthonormal directions (QR of a Gaussian matrix)."""
    n = min(n or d, d)
    g = torch.Generator().manual_seed(seed)
    with one_thread():
        q, _ = torch.linalg.qr(torch.randn(d, n, generator=g))
    return LinearDictUnits(site, q, q.T.contiguous(), mean if mean is not None else torch.zeros(d), k, "random")


def baseline_units(kind: str, site: Site, acts: torch.Tensor, seed: int = 0) -> Units:
    """A complete baseline dictionary of the site's width, never sparsified (k = None), so splicing it in changes
    nothing and an edit acts only on the units it names: ``basis`` (the coordinates), ``pca`` (PCA of ``acts``
    ``[N, d]``, the site's activations on text; with fewer tokens than dimensions the rest is the error term) or
    ``random`` (random orthonormal directions about the activations' mean, so like PCA its codes are centred). The centre
    of every set's edits, its mean code, is fitted for all sets alike by ``units.means.fit_code_means``."""
    d = acts.shape[1]
    if kind == "basis":
        return BasisUnits(site, d)
    if kind == "pca":
        return pca_units(site, acts, d, None)
    if kind == "random":
        with one_thread():
            mean = acts.double().mean(0).float()
        return random_units(site, d, d, None, seed=seed, mean=mean)
    raise ValueError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")
