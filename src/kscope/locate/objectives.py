"""What attribution explains: the probability of the answer's first token, or the log-probability of
the whole answer under teacher forcing.

The prompt's last token and the answer's tokens but the last form the *continuation*: position ``p``
of it predicts answer token ``p``. ``first``: ``P(answer[0])`` at the prompt's last token (Dai et al.).
``whole``: ``sum_{p in scored} log P(answer[p] | prompt, answer[:p])``, where ``scored`` is every
answer token, or (``distinct``) only those after the prefix that all answers of the relation share
(for ``555-0ddd`` phone numbers: the last three digits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Objective:
    """``tokens``: the answer's token ids; ``start``: first scored token; ``kind``: ``prob`` (first token) or ``logprob``."""

    tokens: tuple[int, ...]
    start: int = 0
    kind: str = "prob"

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("an objective needs at least one answer token")
        if self.kind == "prob" and len(self.tokens) != 1:
            raise ValueError("the 'prob' objective scores one token")
        if not 0 <= self.start < len(self.tokens):
            raise ValueError(f"scored tokens start at {self.start}, beyond the answer's {len(self.tokens)} tokens")

    @classmethod
    def first_token(cls, token_id: int) -> "Objective":
        return cls((int(token_id),), 0, "prob")

    @property
    def continuation(self) -> list[int]:
        """Answer tokens fed after the prompt's last token (teacher forcing): all but the last."""
        return list(self.tokens[:-1])

    @property
    def length(self) -> int:
        """Positions of the continuation, counting the prompt's last token."""
        return len(self.tokens)

    def _targets(self, device) -> torch.Tensor:
        return torch.tensor(self.tokens[self.start :], device=device)

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """``[rows]`` objective from continuation logits ``[rows, length, vocab]``."""
        z = logits[:, self.start :].float()
        tgt = self._targets(z.device)[None, :, None].expand(z.shape[0], -1, 1)
        if self.kind == "prob":
            return z.softmax(-1).gather(-1, tgt)[..., 0].sum(-1)
        return z.log_softmax(-1).gather(-1, tgt)[..., 0].sum(-1)

    def log_value(self, logits: torch.Tensor) -> torch.Tensor:
        """``[rows]`` log of the objective's probability (``log P(answer)``) from continuation logits, exact in the tail."""
        z = logits[:, self.start :].float()
        tgt = self._targets(z.device)[None, :, None].expand(z.shape[0], -1, 1)
        return z.log_softmax(-1).gather(-1, tgt)[..., 0].sum(-1)

    def value_grad(self, head: nn.Linear, h: torch.Tensor, logits_fn, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective ``[rows]`` and its gradient w.r.t. the final hidden states ``h`` ``[rows, length, d]``, in closed form.

        ``prob``: ``dP/dz = P (e_t - p)``; ``logprob``: ``d log p_t / dz = e_t - p``; then ``dh = dz @ W``
        (no autograd through the vocabulary). ``logits_fn(head, h2d)`` computes ``head(h2d)``; rows go
        ``chunk`` at a time to bound the ``[rows, scored, vocab]`` memory.
        """
        rows, _, d = h.shape
        hs = h[:, self.start :].detach()
        n = hs.shape[1]
        tgt = self._targets(h.device)
        value = torch.empty(rows, device=h.device)
        dh = torch.zeros_like(h)
        with torch.no_grad():
            for a in range(0, rows, chunk):
                b = min(rows, a + chunk)
                logp = logits_fn(head, hs[a:b].reshape((b - a) * n, d)).float().log_softmax(-1).view(b - a, n, -1)
                idx = tgt[None, :, None].expand(b - a, n, 1)
                lpt = logp.gather(-1, idx)[..., 0]  # [r, n]
                p = logp.exp_()
                if self.kind == "prob":
                    pt = lpt.exp()
                    value[a:b] = pt.sum(-1)
                    g = p.mul_(-pt[..., None]).scatter_add_(-1, idx, pt[..., None])
                else:
                    value[a:b] = lpt.sum(-1)
                    g = p.neg_().scatter_add_(-1, idx, torch.ones_like(lpt)[..., None])
                dh[a:b, self.start :] = (g.to(head.weight.dtype) @ head.weight).view(b - a, n, d)
        return value, dh


def fact_objective(fact) -> Objective:
    """A resolved fact's objective: its whole answer when ``target_tokens`` is set, else its first token."""
    if fact.target_tokens:
        return Objective(tuple(fact.target_tokens), fact.score_from, "logprob")
    if fact.target_id is None:
        raise ValueError(f"fact {fact.uid} has no resolved answer token")
    return Objective.first_token(fact.target_id)
