"""Batched ancestral sampling with a KV cache: the SAE corpus is text the model writes itself.

``generate`` in transformers samples from the same distribution (top-k, then top-p over the
renormalised top-k), but spends most of a CPU's time outside the matrix products. Here each step
is one forward of one token per row over the cache, the head runs only at that token in
vocabulary slices, and sampling looks at the top-k tokens alone (``torch.topk``, no sort of the
vocabulary). Draws come from an explicit ``torch.Generator`` as one uniform number per row and step,
inverted through the cumulative distribution: the text depends on the seed, not on the thread count.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from kscope.model.head import head_logits, plain_head
from kscope.model.prefix import _cache_kw, _out_cache


class _BufferLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers allocated once for the whole sequence: each step
    writes its token in place, where ``DynamicLayer`` concatenates (copies) the whole cache (measured: ~30 % of a
    256-row sampling step). The views hold the same numbers as the concatenation, so attention is unchanged."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty(b, h, self.capacity, d)
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self._n = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._n + key_states.shape[-2]
        if end > self.capacity:  # never by ``sample``'s own use; grow as the plain layer would
            self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]
            self._k = self._v = None
            self.__class__ = DynamicLayer
            return self.update(key_states, value_states)
        self._k[..., self._n : end, :] = key_states
        self._v[..., self._n : end, :] = value_states
        self._n = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times, buffers included (a prefix run once per row, then continued by many)."""
        if self.is_initialized:
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]


def preallocated_cache(model, capacity: int):
    """A cache for ``capacity`` tokens per row whose full-attention layers write in place (``_BufferLayer``); ``None``
    (the model builds its own) when its layers are not all plain ``DynamicLayer``s (sliding windows, linear attention)."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001  a config the cache cannot read: the model's own cache
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [_BufferLayer(capacity) for _ in cache.layers]
    return cache


def warped_probs(logits: torch.Tensor, top_k: int | None = 50, top_p: float = 0.95,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution of ``generate(do_sample=True, top_k, top_p, temperature)``: the ``top_k`` most likely
    tokens, renormalised, then the smallest prefix of them whose mass reaches ``top_p`` (a token is kept when the
    mass of the tokens ranked above it is below ``top_p``; the first always is). ``logits``: ``[rows, vocab]``.
    Returns ``(probs [rows, k], token ids [rows, k])``, most likely first, zero past each row's nucleus.
    ``top_k=None`` and ``top_p >= 1``: the whole softmax, in vocabulary order (nothing to sort)."""
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature  # x / 1.0 == x: no copy
    if top_k is None and top_p >= 1:
        return logits.softmax(-1), torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    vals, idx = logits.topk(min(top_k or logits.shape[-1], logits.shape[-1]), dim=-1)
    p = vals.softmax(-1)
    above = p.cumsum(-1) - p  # mass of the more likely tokens
    p = torch.where(above < top_p, p, torch.zeros_like(p))
    p[:, 0] = torch.where(p[:, 0] > 0, p[:, 0], torch.ones_like(p[:, 0]))
    return p / p.sum(-1, keepdim=True), idx


def draw(probs: torch.Tensor, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from ``warped_probs``: the first whose cumulative probability exceeds a uniform draw."""
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64).to(probs.device)
    cum = probs.double().cumsum(-1)
    pick = (cum <= u * cum[:, -1:]).sum(-1).clamp_max(probs.shape[-1] - 1)
    return idx.gather(1, pick[:, None])[:, 0]


@torch.no_grad()
def sample(model, ids: torch.Tensor, n_new: int, generator: torch.Generator, top_k: int | None = 50, top_p: float = 0.95,
           eos: int | None = None, pad: int = 0, temperature: float = 1.0, on_step=None, copies: int = 1) -> torch.Tensor:
    """``ids`` ``[rows, prompt]`` (no padding) followed by up to ``n_new`` sampled tokens; a row that samples ``eos`` is
    filled with ``pad`` after it, and sampling stops once every row has (as ``generate`` does). ``on_step()`` is called
    after each new token (progress). ``copies``: each row is sampled that many times (rows ``i * copies ..``), its
    prompt run once; the draws are those of ``ids.repeat_interleave(copies, 0)``."""
    head = plain_head(model)
    rows = ids.shape[0] * copies
    out = [ids.repeat_interleave(copies, 0)]
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    cache, step_ids = preallocated_cache(model, ids.shape[1] + n_new), ids
    kw = _cache_kw(model)
    for step in range(n_new):
        if head is not None:
            o = model.base_model(input_ids=step_ids, use_cache=True, **{kw: cache})
            logits = head_logits(head, o.last_hidden_state[:, -1])
        else:
            o = model(input_ids=step_ids, use_cache=True, **{kw: cache})
            logits = o.logits[:, -1]
        cache = _out_cache(o)
        if step == 0 and copies > 1:
            cache.batch_repeat_interleave(copies)
            logits = logits.repeat_interleave(copies, 0)
        nxt = draw(*warped_probs(logits, top_k, top_p, temperature), generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out.append(nxt[:, None])
        if on_step is not None:
            on_step()
        if eos is not None:
            done |= nxt == eos
            if bool(done.all()):
                break
        step_ids = nxt[:, None]
    return torch.cat(out, 1)


def sample_texts(lm, prompts: list[str], n_new: list[int], generator: torch.Generator, copies: int = 1,
                 top_k: int | None = None, top_p: float = 1.0) -> list[list[str]]:
    """Per prompt, ``copies`` continuations of up to ``n_new[i]`` tokens (decoded, special tokens dropped): prompts of one
    tokenised length share a batch (no padding), the groups run shortest first, each drawing on ``generator`` in turn;
    a group samples the most new tokens any of its prompts asks for."""
    tok = lm.tokenizer
    ids = [tok(p).input_ids for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(ids):
        by_len.setdefault(len(r), []).append(i)
    out: list[list[str]] = [[] for _ in prompts]
    for n, group in sorted(by_len.items()):
        got = sample(lm.model, torch.tensor([ids[i] for i in group], device=lm.device), max(n_new[i] for i in group), generator,
                     top_k=top_k, top_p=top_p, copies=copies)
        for j, i in enumerate(group):
            out[i] = tok.batch_decode(got[j * copies : (j + 1) * copies, n:], skip_special_tokens=True)
    return out
