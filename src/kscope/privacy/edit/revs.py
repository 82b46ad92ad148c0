"""REVS (Ashuach, Tutek, Belinkov, ACL Findings 2025): rank editing in vocabulary space, the neuron-level baseline.

Followed: ``Tomertech/REVS`` ``revs/revs.py`` (``get_selected_neurons_indices_scores``, ``calc_deltas_delete``,
``edit_layer_rank_iter``), ``utils/hidden_state_ops.py`` (``logits_to_hs``) and ``utils/data.py`` (target tokens).
For each erased secret, prompt and target token (the secret's ``max_tokens`` rarest scored tokens, "rarest" being the
highest token id as in the code), each band layer in order: skip it if the logit lens already ranks the token low;
else take the neurons among the ``act_top`` most active at the last position whose own logit-lens rank of the token
is lowest, and move each one's down-projection column along the token's pseudo-inverse unembedding direction until
its rank falls in the neuron band; grow or shrink how many neurons are edited until the MLP output's and the
residual's ranks fall in their bands. Edits apply at once, so later tokens and facts see them (the code's default).

Ranks are 0-based (0 = top-1). The code's bands are for 50-128k vocabularies; kscope states them as shares of the
vocabulary, from the GPT-J demo's values (V = 50400: neuron 30k-45k, residual 1k-10k, MLP 1k-45k). The inverse of the
final norm uses the column's own RMS (the code's unbiased variance plus mean differs by ~1/(2d)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kscope.config import Config, option
from kscope.facts import Fact
from kscope.model.head import plain_head
from kscope.model.hooks import hooked
from kscope.model.sites import Site, down_proj_weight, final_norm


@dataclass
class RevsConfig(Config):
    """REVS, the neuron-level baseline (rank editing in vocabulary space)."""

    act_top: int = option(20, "Candidate neurons: the most active at the prompt's last position (REVS: 100 of 14-16k; "
                              "scaled to 1536).", min=1, max=100_000)
    max_tokens: int = option(2, "Target tokens per secret: its rarest scored tokens (highest token id, as REVS does).", min=1,
                             max=100)
    prompts: int = option(1, "Edit prompts per secret that REVS edits on.", min=1, max=100)
    neuron_band: list[float] = option(help="Rank band a neuron's column is moved to, as shares of the vocabulary.",
                                      factory=lambda: [0.595, 0.893], min=0.0, max=1.0)
    resid_band: list[float] = option(help="Residual rank band that ends the neuron-count search, as shares of the vocabulary.",
                                     factory=lambda: [0.0198, 0.198], min=0.0, max=1.0)
    mlp_band: list[float] = option(help="MLP-output rank band, as shares of the vocabulary.", factory=lambda: [0.0198, 0.893],
                                   min=0.0, max=1.0)
    max_iter: int = option(100, "Most iterations of the per-neuron and the neuron-count loops (REVS: 100).", min=1, max=10_000)


class _Lens:
    """The logit lens ``head(final_norm(h))`` and its inverse for one token direction."""

    def __init__(self, model):
        self.norm = final_norm(model)
        self.rms = getattr(self.norm, "bias", None) is None and hasattr(self.norm, "weight")  # RMSNorm: scale-invariant ranks
        head = plain_head(model) or model.get_output_embeddings()
        self.W_U = head.weight.float()
        self.gram = self.W_U.T.double() @ self.W_U.double()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h.to(self.W_U.dtype)) @ self.W_U.T

    def rank(self, h: torch.Tensor, token: int) -> torch.Tensor:
        """0-based rank of ``token`` in the lens of each row of ``h`` ``[n, d]``."""
        z = self.logits(h)
        return (z > z[:, token : token + 1]).sum(-1)

    def direction(self, token: int) -> torch.Tensor:
        """``pinv(W_U)[:, token]``: the hidden change that raises the token's logit by 1 and no other."""
        return torch.linalg.solve(self.gram, self.W_U[token].double()).float()

    def unnorm_scale(self, cols: torch.Tensor) -> torch.Tensor:
        """Per row of ``cols``, the factor from normalised back to raw space (``rms / gain``, elementwise)."""
        eps = getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", 1e-6))
        rms = cols.float().pow(2).mean(-1, keepdim=True).add(eps).sqrt()
        return rms / self.norm.weight.float()


def demote(lens: _Lens, cols: torch.Tensor, token: int, band: tuple[int, int], max_iter: int) -> torch.Tensor:
    """New columns ``[n, d]`` whose own lens ranks ``token`` inside ``band`` (REVS' ``calc_deltas_delete``): each column
    moves along the token's pseudo-inverse direction by ``δ`` (in logits), ``δ`` x1.3 while the rank is above the band's
    bottom, x0.8 while below its top. With an RMS norm (no bias), ``norm(N + c v) W_Uᵀ`` is a positive multiple of
    ``(N + c v) ⊙ γ W_Uᵀ``, so ranks along the move come from two logit vectors per column computed once."""
    lo, hi = band
    u = lens.direction(token)
    step = lens.unnorm_scale(cols) * u[None]  # [n, d]: the move of one unit of δ
    if lens.rms:
        g = lens.norm.weight.float()
        a, b = (cols.float() * g) @ lens.W_U.T, (step * g) @ lens.W_U.T  # [n, V] each
        rank = lambda d: ((a + d[:, None] * b) > (a[:, token] + d * b[:, token])[:, None]).sum(-1)  # noqa: E731
    else:
        rank = lambda d: lens.rank(cols + d[:, None] * step, token)  # noqa: E731
    r = rank(torch.zeros(cols.shape[0], device=cols.device))
    delta = torch.where(r < lo, torch.full(r.shape, -10.0, device=cols.device), torch.zeros(r.shape, device=cols.device))
    for _ in range(max_iter):
        r = rank(delta)
        below, above = r < lo, r > hi
        if not bool((below | above).any()):
            break
        delta = torch.where(below, delta * 1.3, torch.where(above, delta * 0.8, delta))
    return cols + delta[:, None] * step


def target_tokens(fact: Fact, n: int) -> list[int]:
    """Positions (in the secret's tokens) of its ``n`` rarest scored tokens: the highest token ids."""
    scored = list(range(fact.score_from, len(fact.target_tokens)))
    return sorted(sorted(scored, key=lambda t: -fact.target_tokens[t])[:n])


@torch.no_grad()
def _acts(lm, ids: list[int], layer: int) -> dict[str, torch.Tensor]:
    sites = {k: Site(layer, k) for k in ("mlp.neurons", "mlp.out", "resid.post")}
    with hooked(lm.model, capture=list(sites.values())) as cap:
        lm.model.base_model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False)
    return {k: cap[s][0, -1].float() for k, s in sites.items()}


@torch.no_grad()
def revs(lm, facts: Sequence[Fact], layers: Sequence[int], n_neurons: int, cfg: RevsConfig) -> tuple[dict[int, torch.Tensor], set]:
    """REVS over ``facts`` at ``layers`` with at most ``n_neurons`` neurons per token and layer. Returns the new down
    projections and the ``(layer, neuron)`` pairs edited; the model is restored before returning."""
    model = lm.model
    lens = _Lens(model)
    V = lens.W_U.shape[0]
    band = lambda b: (int(b[0] * V), int(b[1] * V))  # noqa: E731
    nb, rb, mb = band(cfg.neuron_band), band(cfg.resid_band), band(cfg.mlp_band)
    clean = {L: down_proj_weight(model, L).clone() for L in layers}
    touched: set[tuple[int, int]] = set()
    try:
        for f in facts:
            for prompt in f.prompts[: cfg.prompts]:
                p_ids = lm.tokenizer(prompt).input_ids
                for t in target_tokens(f, cfg.max_tokens):
                    ids, token = p_ids + list(f.target_tokens[:t]), f.target_tokens[t]
                    for L in sorted(layers):
                        a = _acts(lm, ids, L)
                        if int(lens.rank(a["resid.post"][None], token)) >= rb[0] or int(lens.rank(a["mlp.out"][None], token)) >= mb[1]:
                            continue
                        W = down_proj_weight(model, L)
                        cand = torch.topk(a["mlp.neurons"], min(cfg.act_top, a["mlp.neurons"].numel())).indices
                        order = torch.argsort(lens.rank(W[:, cand].T.float(), token))
                        idx = cand[order][:n_neurons]
                        k, tried, new = 5, set(), None
                        before = W[:, idx].T.float()
                        moved = demote(lens, before, token, nb, cfg.max_iter)  # each column on its own: once
                        for _ in range(cfg.max_iter):
                            k = min(k, len(idx))
                            cols = moved[:k]
                            new = (idx[:k], cols)
                            out = a["mlp.out"] + (cols - before[:k]).T @ a["mlp.neurons"][idx[:k]]
                            resid = a["resid.post"] - a["mlp.out"] + out
                            rm, rr = int(lens.rank(out[None], token)), int(lens.rank(resid[None], token))
                            if mb[0] <= rm <= mb[1]:
                                if rb[0] <= rr <= rb[1]:
                                    break
                                k = min(k + 1, len(idx)) if rr < rb[0] else max(k - 1, 1)
                            else:
                                k = int(min(k * 1.6, len(idx))) if rm < mb[0] else int(max(k * 0.8, 2))
                            if k in tried:
                                break
                            tried.add(k)
                        sel, cols = new
                        W[:, sel] = cols.T.to(W.dtype)
                        touched.update((L, int(j)) for j in sel)
        return {L: down_proj_weight(model, L).clone() for L in layers}, touched
    finally:
        for L, W in clean.items():
            down_proj_weight(model, L).copy_(W)
