"""A prompt's prefix run once; its KV cache reused by many continuations of it.

Continuations may edit the last token (hooks set by the caller apply) or grow the batch as it flows
up (``hooks.grown_batch``). The cache is never copied per row: each pass gets its own copy of the
batch-1 prefix cache, expanded as views to the rows that reach each block.
"""

from __future__ import annotations

import copy
import inspect
from typing import Sequence

import torch

from kscope.model.hooks import grown_batch
from kscope.model.readout import pad_rows


def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


class PrefixRunner:
    """Runs a prompt's prefix (all tokens but the last) once; then forwards from its last token.

    ``ids``: ``[seq]`` token ids of one prompt.
    """

    def __init__(self, model, ids: Sequence[int]):
        self.model = model
        device = next(model.parameters()).device
        ids = torch.as_tensor(list(ids), dtype=torch.long, device=device)
        self.last = ids[-1:]
        self.cache = None
        if ids.numel() > 1:
            with torch.no_grad():  # the prefix needs no logits
                self.cache = _out_cache(model.base_model(input_ids=ids[None, :-1], use_cache=True))

    def _kwargs(self, model, rows: Sequence[int]) -> dict:
        """Cache arguments for a pass where ``rows[l]`` rows reach block ``l`` (the last entry for the rest)."""
        if self.cache is None:
            return {"use_cache": False}
        cache = copy.deepcopy(self.cache)
        for l, layer in enumerate(cache.layers):
            b = rows[min(l, len(rows) - 1)]
            layer.keys = layer.keys.expand(b, *layer.keys.shape[1:])
            layer.values = layer.values.expand(b, *layer.values.shape[1:])
        return {_cache_kw(model): cache, "use_cache": True}

    def logits(self, batch: int) -> torch.Tensor:
        """Next-token logits of the last token, ``[batch, vocab]``."""
        return self.model(input_ids=self.last.expand(batch, 1), **self._kwargs(self.model, [batch])).logits[:, -1]

    def grown(self, new_rows: Sequence[int], head: bool = True) -> torch.Tensor:
        """Last-token output for a batch that grows: row 0 is the plain forward and ``new_rows[l]``
        copies of it join at block ``l`` (the caller's hooks edit them). ``[1 + sum(new_rows), vocab]``
        logits, or with ``head=False`` the final-norm hidden states ``[rows, d]``.
        """
        rows = torch.cumsum(torch.tensor([1, *new_rows]), 0)[1:].tolist() or [1]
        model = self.model if head else self.model.base_model
        with grown_batch(self.model, dict(enumerate(new_rows))):
            out = model(input_ids=self.last[None], **self._kwargs(model, rows))
        return out.logits[:, -1] if head else out.last_hidden_state[:, -1]

    def continuation_logits(self, suffix: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, 1 + S, vocab]`` at the last token and then each token of ``suffix`` ``[batch, S]``.

        Rows may be right-padded: in a causal LM no earlier position sees the padding.
        """
        tokens = torch.cat([self.last.expand(suffix.shape[0], 1), suffix.to(self.last.device)], 1)
        return self.model(input_ids=tokens, **self._kwargs(self.model, [suffix.shape[0]])).logits


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``rows``."""
    n = min(len(r) for r in rows)
    for i in range(n):
        t = rows[0][i]
        if any(r[i] != t for r in rows):
            return i
    return n


@torch.no_grad()
def continuation_nlls(model, n_prompt: int, rows: Sequence[Sequence[int]], batch_size: int = 150) -> list[float]:
    """NLL of each row's tokens after its first ``n_prompt`` (``sum -log P(t_i | t_<i)``, ``i >= n_prompt``).

    Candidate answers to one prompt share most tokens: the shared prefix is run once and only each
    row's remaining tokens are forwarded. Equals scoring each full row on its own (tested).
    """
    if any(len(r) <= n_prompt for r in rows):
        raise ValueError("every row needs a token after the prompt")
    shared = max(1, min(common_prefix(rows), min(len(r) for r in rows) - 1))
    device = next(model.parameters()).device
    base = 0.0  # NLL of the shared tokens after the prompt, the same for every row
    if shared > n_prompt:
        ids = torch.as_tensor(list(rows[0][:shared]), device=device)
        logp = model(input_ids=ids[None], use_cache=False).logits[0].float().log_softmax(-1)
        base = -float(logp[n_prompt - 1 : shared - 1].gather(1, ids[n_prompt:shared, None]).sum())
    runner = PrefixRunner(model, rows[0][:shared])  # cache: tokens [0, shared - 1)
    start = max(shared, n_prompt)  # first scored token; position i - shared of the continuation predicts token i
    out: list[float] = []
    for s in range(0, len(rows), batch_size):
        part = rows[s : s + batch_size]
        suffix, mask = pad_rows([r[shared:] for r in part], 0)
        logp = runner.continuation_logits(suffix).float().log_softmax(-1)  # [b, 1 + S, vocab]
        tgt = suffix.to(device)[:, start - shared :]  # tokens start.. of each row
        scored = mask.to(device)[:, start - shared :].bool()
        lp = logp[:, start - shared : start - shared + tgt.shape[1]].gather(2, tgt[..., None])[..., 0]
        out.extend((base - (lp * scored).sum(1)).tolist())
    return out
