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


def _cache_rows(template, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor):
    """A cache like ``template`` (its layer types) holding rows ``rows`` of the per-layer ``kv``."""
    cache = copy.copy(template)
    cache.layers = [copy.copy(layer) for layer in template.layers]
    for layer, (k, v) in zip(cache.layers, kv):
        layer.keys, layer.values = k[rows], v[rows]
    return cache


@torch.no_grad()
def continuation_nlls_many(model, sets: Sequence[tuple[int, Sequence[Sequence[int]]]], batch_size: int = 128,
                           ) -> list[list[float]]:
    """``continuation_nlls`` of several ``(n_prompt, rows)`` sets in shared batched passes.

    Each set's shared prefix runs once, all sets right-padded in one batch (KV cache, padding masked).
    Below it, while a set's paths still branch (at least two paths per next token on average), that
    token runs once per distinct path (a level of the tree, its cache gathered from its parents'); then
    each remaining path runs whole. A row's last token is never forwarded. The 900 phone numbers
    ``555-0ddd`` need 9 + 90 one-token rows; 20 e-mails, 20 rows. On a CPU a forward costs at least the
    read of every weight, so the sets share their forwards. Equals scoring each row on its own (tested).
    """
    if any(len(r) <= n for n, rows in sets for r in rows):
        raise ValueError("every row needs a token after the prompt")
    groups: dict[tuple[int, int], list[int]] = {}  # (set, first token) -> its rows: a prefix needs a shared first token
    for s, (_, rows) in enumerate(sets):
        for i, r in enumerate(rows):
            groups.setdefault((s, r[0]), []).append(i)
    parts = [(sets[s][0], [list(sets[s][1][i]) for i in idx]) for (s, _), idx in groups.items()]
    nlls = _grouped_nlls(model, parts, batch_size)
    out = [[0.0] * len(rows) for _, rows in sets]
    for ((s, _), idx), got in zip(groups.items(), nlls):
        for i, v in zip(idx, got):
            out[s][i] = v
    return out


def _grouped_nlls(model, sets: list[tuple[int, list[list[int]]]], batch_size: int) -> list[list[float]]:
    """``continuation_nlls_many`` of sets whose rows share at least their first token."""
    device = next(model.parameters()).device
    shared = [max(1, min(common_prefix(rows), min(len(r) for r in rows) - 1)) for _, rows in sets]
    wanted: dict[tuple, set[int]] = {}  # (set, path below its shared prefix) -> tokens whose log P is needed after it
    for s, ((n, rows), sh) in enumerate(zip(sets, shared)):
        for r in rows:
            for i in range(max(sh, n), len(r)):
                wanted.setdefault((s, tuple(r[sh:i])), set()).add(r[i])
    logp: dict[tuple, dict[int, float]] = {}

    def keep(s: int, path: tuple, lp: torch.Tensor) -> None:
        toks = wanted.get((s, path))
        if toks:
            logp[(s, path)] = {t: float(lp[t]) for t in toks}

    ids, mask = pad_rows([rows[0][:sh] for (_, rows), sh in zip(sets, shared)], 0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
    lp0 = out.logits.float().log_softmax(-1)  # [set, position, vocab]; position j predicts token j + 1
    base = []  # NLL of each set's shared tokens after its prompt, the same for all its rows
    for s, ((n, rows), sh) in enumerate(zip(sets, shared)):
        tgt = ids[s, n:sh].to(device)
        base.append(-float(lp0[s, n - 1 : sh - 1].gather(1, tgt[:, None]).sum()) if sh > n else 0.0)
        keep(s, (), lp0[s, sh - 1])
    del lp0
    template = _out_cache(out)
    kv = [(layer.keys, layer.values) for layer in template.layers]  # one cache row per node of the current depth
    past = mask.to(device)  # which cached positions are real, per node
    index = {(s, ()): s for s in range(len(sets))}

    def run(items: list[tuple[int, tuple]], depth: int, cached: bool):
        """Forward each item's path from token ``depth`` on, from its parent's cache; keep the wanted log P."""
        level = []
        for c in range(0, len(items), batch_size):
            part = items[c : c + batch_size]
            parents = torch.tensor([index[(s, p[:depth])] for s, p in part], device=device)
            tok, tok_mask = pad_rows([p[depth:] for _, p in part], 0)
            tok, tok_mask = tok.to(device), tok_mask.to(device)
            before = past[parents]
            positions = before.sum(1, keepdim=True) + torch.arange(tok.shape[1], device=device)
            o = model(input_ids=tok, attention_mask=torch.cat([before, tok_mask], 1), position_ids=positions,
                      **{_cache_kw(model): _cache_rows(template, kv, parents)}, use_cache=True)
            lp = o.logits.float().log_softmax(-1)
            for i, (s, p) in enumerate(part):
                for j in range(len(p) - depth):
                    keep(s, p[: depth + j + 1], lp[i, j])
            if cached:
                level.append(([(layer.keys, layer.values) for layer in _out_cache(o).layers], torch.cat([before, tok_mask], 1)))
        return level

    depth, branching = 0, set(range(len(sets)))
    while True:
        tree, whole = [], []
        for s in sorted(branching):
            (_, rows), sh = sets[s], shared[s]
            paths = list(dict.fromkeys(tuple(r[sh:-1]) for r in rows if len(r) - sh - 1 > depth))  # tokens to forward
            heads = list(dict.fromkeys(p[: depth + 1] for p in paths))
            if not paths or 2 * len(heads) > len(paths):  # nothing left to forward, or little branching: run whole
                whole += [(s, p) for p in paths]
                branching.discard(s)
            else:
                tree += [(s, h) for h in heads]
        run(sorted(whole, key=lambda it: len(it[1])), depth, cached=False)
        if not tree:
            break
        level = run(tree, depth, cached=True)
        kv = [(torch.cat([c[0][l][0] for c in level]), torch.cat([c[0][l][1] for c in level])) for l in range(len(kv))]
        past = torch.cat([c[1] for c in level])
        index, depth = {it: i for i, it in enumerate(tree)}, depth + 1
    return [[base[s] - sum(logp[(s, tuple(r[sh:i]))][r[i]] for i in range(max(sh, n), len(r))) for r in rows]
            for s, ((n, rows), sh) in enumerate(zip(sets, shared))]


def continuation_nlls(model, n_prompt: int, rows: Sequence[Sequence[int]], batch_size: int = 128) -> list[float]:
    """NLL of each row's tokens after its first ``n_prompt`` (``sum -log P(t_i | t_<i)``, ``i >= n_prompt``).

    Candidate answers to one prompt share most tokens; see ``continuation_nlls_many`` for how they are run."""
    return continuation_nlls_many(model, [(n_prompt, rows)], batch_size)[0]
