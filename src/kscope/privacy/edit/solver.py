"""Key-conditioned closed-form edits of an MLP's down projection (MEMIT / AlphaEdit style), unrestricted or
restricted to a handle: the span of some SAE features' decoder directions, or some neurons' columns.

At one layer, ``W`` (``[d, m]``) maps a key ``k`` (the MLP hidden activation, ``[m]``) to the MLP output. Given the
keys of the secrets to erase ``K_F`` (``[m, n]``), the change ``R`` (``[d, n]``) their outputs should make, and the
preserved keys' second moment ``C = K_R K_Rᵀ / n_R`` (``[m, m]``: other people's secrets, known facts, corpus text),
find ``ΔW`` with ``ΔW K_F ≈ R`` and ``ΔW K_R ≈ 0``:

- ``ridge``: ``min ‖ΔW K_F − R‖² + λ n_F ‖ΔW K_R‖²/n_R + ε‖ΔW‖²``, i.e. ``ΔW = R K_Fᵀ (K_F K_Fᵀ + λ n_F C + ε I)⁻¹``
  (MEMIT's update with its ``λ C`` covariance term, ``memit/memit_main.py``);
- ``nullspace``: AlphaEdit's projector ``P`` onto the eigenvectors of ``C`` with eigenvalues below ``tol`` times the
  largest, ``ΔW = R K_Fᵀ P (K_F K_Fᵀ P + ε I)⁻¹`` (``AlphaEdit/AlphaEdit_main.py``): ``ΔW K_R = 0`` up to ``tol``.

Handles (all pure functions of tensors):
- features: ``ΔW = U X`` with ``U`` an orthonormal basis of the decoder directions (``[d, s]``): ``s·m`` parameters;
  since ``U`` is orthonormal the optimum is ``U Uᵀ`` times the unrestricted one;
- neurons: ``ΔW = Y E_Nᵀ``, only the columns ``N`` change: ``d·n`` parameters; the same problem on the keys' rows ``N``;
- random directions or random columns of the same size are the controls; no restriction is the upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

PRESERVE = ("ridge", "nullspace")


@dataclass
class Solved:
    """A layer's edit: ``delta`` (``[d, m]``) to add to ``W``; ``params``: its degrees of freedom."""

    delta: torch.Tensor
    params: int


def orthonormal(directions: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``[d, s]`` of the span of ``directions`` (``[s, d]``, rows), by QR in float64."""
    q, r = torch.linalg.qr(directions.double().T)
    keep = r.diagonal().abs() > 1e-8 * r.diagonal().abs().max().clamp_min(1e-30)
    return q[:, keep]


def null_projector(C: torch.Tensor, tol: float) -> torch.Tensor:
    """AlphaEdit's projector onto the eigenvectors of ``C`` (``[m, m]``) whose eigenvalues are below ``tol`` x the largest."""
    vals, vecs = torch.linalg.eigh(C.double())
    small = vecs[:, vals < tol * vals.max().clamp_min(1e-30)]
    return small @ small.T


def _solve(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, preserve: str, lam: float, eps: float, tol: float) -> torch.Tensor:
    """The unrestricted ``ΔW`` (``[d, m]``) for targets ``R`` ``[d, n]``, keys ``K`` ``[m, n]``, preserved moment ``C`` ``[m, m]``."""
    R, K, C = R.double(), K.double(), C.double()
    m, n = K.shape
    eye = torch.eye(m, dtype=torch.float64, device=K.device)
    if preserve == "ridge":
        A = K @ K.T + lam * n * C + eps * eye  # symmetric positive definite
        return torch.linalg.solve(A, K @ R.T).T
    if preserve == "nullspace":
        P = null_projector(C, tol)
        return torch.linalg.solve(P @ (K @ K.T) + eps * eye, P @ K @ R.T).T  # = R Kᵀ P (K Kᵀ P + ε I)⁻¹
    raise ValueError(f"unknown preservation {preserve!r}; choose from {', '.join(PRESERVE)}")


def solve_unrestricted(R, K, C, preserve: str = "ridge", lam: float = 1.0, eps: float = 1e-6, tol: float = 1e-3) -> Solved:
    d, m = R.shape[0], K.shape[0]
    return Solved(_solve(R, K, C, preserve, lam, eps, tol).float(), d * m)


def solve_directions(R, K, C, directions: torch.Tensor, preserve: str = "ridge", lam: float = 1.0, eps: float = 1e-6,
                     tol: float = 1e-3) -> Solved:
    """``ΔW = U X`` within the span of ``directions`` (``[s, d]``): the unrestricted solution for the targets' part in
    that span (``Uᵀ R``), mapped back by ``U``."""
    U = orthonormal(directions).to(R.device)
    X = _solve(U.T @ R.double(), K, C, preserve, lam, eps, tol)  # [s, m]
    return Solved((U @ X).float(), U.shape[1] * K.shape[0])


def solve_columns(R, K, C, columns: Sequence[int], preserve: str = "ridge", lam: float = 1.0, eps: float = 1e-6,
                  tol: float = 1e-3) -> Solved:
    """``ΔW = Y E_Nᵀ``: only the ``columns`` of ``W`` change, solved on the keys' rows ``columns``."""
    idx = torch.as_tensor(list(columns), dtype=torch.long, device=K.device)
    Y = _solve(R, K[idx], C[idx][:, idx], preserve, lam, eps, tol)  # [d, n]
    delta = torch.zeros(R.shape[0], K.shape[0], dtype=torch.float32, device=R.device)
    delta[:, idx] = Y.float()
    return Solved(delta, R.shape[0] * len(idx))


def expressible(R: torch.Tensor, K: torch.Tensor, directions: torch.Tensor | None = None,
                columns: Sequence[int] | None = None) -> tuple[float, float]:
    """How much of the target a handle can hold at the keys, preservation aside: ``(‖proj R‖², ‖R‖²)`` where ``proj R`` is
    the part of ``R`` (``[d, n]``) an edit ``ΔW K`` can produce: within the span of ``directions`` (``[s, d]``) on the
    output side, through the rows ``columns`` of the keys ``K`` (``[m, n]``) on the input side. Their ratio separates
    geometry (what a subspace can hold) from location (which units were chosen)."""
    R, K = R.double(), K.double()
    total = float(R.pow(2).sum())
    if directions is not None:
        U = orthonormal(directions).to(R.device)
        R = U @ (U.T @ R)
    if columns is not None:
        K = K[torch.as_tensor(list(columns), dtype=torch.long, device=K.device)]
    P = torch.linalg.pinv(K) @ K  # [n, n]: the projector onto the row space of the keys the handle reads
    return float((R @ P).pow(2).sum()), total


def second_moment(keys: torch.Tensor) -> torch.Tensor:
    """``K Kᵀ / n`` of keys given as rows ``[n, m]`` (float64)."""
    k = keys.double()
    return k.T @ k / max(k.shape[0], 1)
