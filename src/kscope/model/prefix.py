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

    def _tokens(self, continuation: Sequence[int]) -> torch.Tensor:
        """The prompt's last token, then ``continuation``: ``[1, 1 + len(continuation)]``."""
        cont = torch.as_tensor(list(continuation), dtype=torch.long, device=self.last.device)
        return torch.cat([self.last, cont])[None]

    def logits(self, batch: int, continuation: Sequence[int] = ()) -> torch.Tensor:
        """Next-token logits of the last token, ``[batch, vocab]``; with a ``continuation``, at every
        position from the last token on, ``[batch, 1 + len(continuation), vocab]``."""
        out = self.model(input_ids=self._tokens(continuation).expand(batch, -1), **self._kwargs(self.model, [batch])).logits
        return out if len(continuation) else out[:, -1]

    def grown(self, new_rows: Sequence[int], head: bool = True, continuation: Sequence[int] = ()) -> torch.Tensor:
        """Output from the last token on for a batch that grows: row 0 is the plain forward and
        ``new_rows[l]`` copies of it join at block ``l`` (the caller's hooks edit them).
        ``[1 + sum(new_rows), 1 + len(continuation), vocab]`` logits, or with ``head=False`` the
        final-norm hidden states ``[rows, 1 + len(continuation), d]``.
        """
        rows = torch.cumsum(torch.tensor([1, *new_rows]), 0)[1:].tolist() or [1]
        model = self.model if head else self.model.base_model
        with grown_batch(self.model, dict(enumerate(new_rows))):
            out = model(input_ids=self._tokens(continuation), **self._kwargs(model, rows))
        return out.logits if head else out.last_hidden_state


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``rows``."""
    n = min(len(r) for r in rows)
    for i in range(n):
        t = rows[0][i]
        if any(r[i] != t for r in rows):
            return i
    return n


@torch.no_grad()
def continuation_nlls(model, n_prompt: int, rows: Sequence[Sequence[int]], batch_size: int = 128) -> list[float]:
    """NLL of each row's tokens after its first ``n_prompt`` (``sum -log P(t_i | t_<i)``, ``i >= n_prompt``).

    Candidate answers to one prompt share most tokens. The prefix all rows share is run once (KV cache);
    rows that differ only in their last token need the same distributions, so one of them is forwarded
    for all (900 phone numbers ``555-0ddd`` need 90 rows, not 900). Equals scoring each row on its own (tested).
    """
    if any(len(r) <= n_prompt for r in rows):
        raise ValueError("every row needs a token after the prompt")
    rows = [list(r) for r in rows]
    shared = max(1, min(common_prefix(rows), min(len(r) for r in rows) - 1))
    device = next(model.parameters()).device
    base = 0.0  # NLL of the shared tokens after the prompt, the same for every row
    if shared > n_prompt:
        ids = torch.as_tensor(rows[0][:shared], device=device)
        logp = model(input_ids=ids[None], use_cache=False).logits[0].float().log_softmax(-1)
        base = -float(logp[n_prompt - 1 : shared - 1].gather(1, ids[n_prompt:shared, None]).sum())
    runner = PrefixRunner(model, rows[0][:shared])  # cache: tokens [0, shared - 1); the continuation starts at shared - 1
    start = max(shared, n_prompt)  # first scored token
    reps = list(dict.fromkeys(tuple(r[shared:-1]) for r in rows))  # one forwarded row per distinct all-but-last path
    logps: dict[tuple, torch.Tensor] = {}
    for s in range(0, len(reps), batch_size):
        part = reps[s : s + batch_size]
        width = max(len(p) for p in part)
        cont = torch.zeros(len(part), width, dtype=torch.long)
        for i, p in enumerate(part):
            cont[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        tokens = torch.cat([runner.last.expand(len(part), 1), cont.to(device)], 1)  # right-padded: causal, never seen
        lp = model(input_ids=tokens, **runner._kwargs(model, [len(part)])).logits.float().log_softmax(-1)
        logps.update({p: lp[i, : len(p) + 1] for i, p in enumerate(part)})  # position j predicts token shared + j
    out = []
    for r in rows:
        lp = logps[tuple(r[shared:-1])]
        out.append(base - sum(float(lp[i - shared, r[i]]) for i in range(start, len(r))))
    return out
