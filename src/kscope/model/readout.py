"""Batched next-token scoring of prompts, with optional site edits at each prompt's last token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from kscope.model.head import head_logits, plain_head
from kscope.model.hooks import EditFn, at_positions, hooked, site_activations
from kscope.model.sites import Site

UnitEdit = Callable[[torch.Tensor], torch.Tensor]


def pad_rows(rows: Sequence[Sequence[int]], pad: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows: ``ids`` and ``mask`` of shape ``[len(rows), width or longest]``."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass
class PromptBatch:
    """Right-padded prompts. ``ids``/``mask``: ``[batch, seq]``; ``last``: ``[batch]`` index of each last token."""

    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], device: torch.device | str = "cpu") -> "PromptBatch":
        rows = [tokenizer(t, add_special_tokens=True).input_ids for t in texts]
        if any(len(r) == 0 for r in rows):
            raise ValueError("a prompt tokenized to nothing")
        ids, mask = pad_rows(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        last = torch.tensor([len(r) - 1 for r in rows])
        return cls(ids.to(device), mask.to(device), last.to(device))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def slice(self, start: int, stop: int) -> "PromptBatch":
        return PromptBatch(self.ids[start:stop], self.mask[start:stop], self.last[start:stop])


def logits_at(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """Logits at ``positions`` ``[batch, P]`` of each row, ``[batch, P, vocab]``: the LM head runs only there
    (when the model's head is a plain linear map; else it runs everywhere and is gathered)."""
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(positions)
    return logits_where(model, ids, mask, rows.reshape(-1), positions.reshape(-1)).view(*positions.shape, -1)


def logits_where(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """Logits at the ``(rows[i], positions[i])`` pairs, ``[n, vocab]``; the head runs only there when it is plain."""
    head = plain_head(model)
    if head is None:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, positions]
    h = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[rows, positions]
    return head_logits(head, h)


def logits_per_row(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
                   positions: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
    """Per row of ``ids``, float logits at its own ``positions`` (``[len, vocab]``, rows of any lengths, no padding
    positions scored); one forward, the head only there when it is plain."""
    rows, pos = torch.tensor([(r, q) for r, ps in enumerate(positions) for q in ps], device=ids.device).T
    return logits_where(model, ids, mask, rows, pos).float().split([len(ps) for ps in positions])


def last_logits(
    model: nn.Module,
    batch: PromptBatch,
    edits: Mapping[Site, EditFn] | None = None,
    positions: str = "last",
) -> torch.Tensor:
    """Logits at each prompt's last token, ``[batch, vocab]``.

    ``edits`` rewrite site activations; with ``positions="last"`` only at the last token of each
    prompt, with ``"all"`` at every position.
    """
    pos = batch.last if positions == "last" else None
    wrapped = {s: at_positions(fn, pos) for s, fn in (edits or {}).items()}
    with hooked(model, wrapped):
        out = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    rows = torch.arange(len(batch), device=batch.ids.device)
    return out.logits[rows, batch.last]


@torch.no_grad()
def answer_probs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[int],
    edits: Mapping[Site, EditFn] | None = None,
    positions: str = "last",
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability and rank (0 = top-1) of each target token after each prompt. Both ``[n]``."""
    device = next(model.parameters()).device
    probs, ranks = [], []
    for start in range(0, len(prompts), batch_size):
        b = PromptBatch.from_texts(tokenizer, prompts[start : start + batch_size], device)
        logits = last_logits(model, b, edits, positions).float()
        tgt = torch.tensor(targets[start : start + batch_size], device=device)
        p = logits.softmax(-1)
        pt = p.gather(1, tgt[:, None])[:, 0]
        probs.append(pt.cpu())
        ranks.append((logits > logits.gather(1, tgt[:, None])).sum(-1).cpu())
    if not probs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(ranks)


def from_positions(edit: EditFn, starts: torch.Tensor) -> EditFn:
    """Apply ``edit`` (a per-token map) at positions ``>= starts[row]`` of each row, ``[batch]``."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)[None, :, None]
        return torch.where(pos >= starts.to(x.device)[:, None, None], edit(x).to(x.dtype), x)

    return fn


@torch.no_grad()
def answer_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answer: Sequence[int],
    start: int = 0,
    edits: Mapping[Site, EditFn] | None = None,
    positions: str = "last",
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced ``sum log P(answer[t] | prompt, answer[:t])`` over ``t >= start``, and the worst rank
    (0 = top-1) of any answer token, after each prompt. Both ``[n]``.

    ``positions="last"`` edits from each prompt's last token on (the positions that predict the
    answer), ``"all"`` everywhere.
    """
    device = next(model.parameters()).device
    answer = list(answer)
    n = len(answer)
    sums, worst = [], []
    for s in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts[s : s + batch_size]]
        ids, mask = pad_rows([r + answer[:-1] for r in rows], tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        wrapped = {site: (from_positions(fn, last) if positions == "last" else fn) for site, fn in (edits or {}).items()}
        with hooked(model, wrapped):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        idx = last[:, None] + torch.arange(n, device=device)[None]  # [b, n] positions predicting each answer token
        z = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1])).float()  # [b, n, vocab]
        tgt = torch.tensor(answer, device=device)[None, :, None].expand(z.shape[0], n, 1)
        sums.append(z.log_softmax(-1).gather(-1, tgt)[..., 0][:, start:].sum(-1).cpu())
        worst.append((z > z.gather(-1, tgt)).sum(-1).max(-1).values.cpu())
    if not sums:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(sums), torch.cat(worst)


def fact_probs(model: nn.Module, tokenizer, fact, prompts: Sequence[str] | None = None,
               edits: Mapping[Site, EditFn] | None = None, positions: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """``P(answer)`` and the answer's rank after each prompt of ``fact`` (default: its prompts): the first
    token's, or for a whole-answer fact ``exp(sum log P)`` over its scored tokens and the worst token rank."""
    prompts = list(fact.prompts if prompts is None else prompts)
    if fact.target_tokens:
        lp, rank = answer_logprobs(model, tokenizer, prompts, fact.target_tokens, fact.score_from, edits, positions)
        return lp.exp(), rank
    return answer_probs(model, tokenizer, prompts, [fact.target_id] * len(prompts), edits, positions)


@torch.no_grad()
def unit_activations(model: nn.Module, tokenizer, units, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Unit activations at each prompt's last token, ``[n_prompts, n_units]``."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(prompts), batch_size):
        b = PromptBatch.from_texts(tokenizer, prompts[start : start + batch_size], device)
        x = site_activations(model, [units.site], b.ids, b.mask)[units.site][torch.arange(len(b), device=device), b.last]
        rows.append(units.encode(x).float().cpu())
    return torch.cat(rows) if rows else torch.zeros(0, units.n_units)


@torch.no_grad()
def last_token_activations(lm, unit_sets, prompts: Sequence[str], progress=None, batch_size: int = 32) -> list[torch.Tensor]:
    """Each unit set's activations at each prompt's last token, ``[n_prompts, n_units]``; one pass per batch for all sets."""
    sites = list(dict.fromkeys(u.site for u in unit_sets))
    rows: list[list[torch.Tensor]] = [[] for _ in unit_sets]
    task = progress.add_task("activations at the last token", total=len(prompts)) if progress else None
    for start in range(0, len(prompts), batch_size):
        b = PromptBatch.from_texts(lm.tokenizer, prompts[start : start + batch_size], lm.device)
        xs = site_activations(lm.model, sites, b.ids, b.mask)
        r = torch.arange(len(b), device=b.ids.device)
        for j, u in enumerate(unit_sets):
            rows[j].append(u.encode(xs[u.site][r, b.last]).float().cpu())
        if progress:
            progress.advance(task, len(b))
    return [torch.cat(r) if r else torch.zeros(0, u.n_units) for r, u in zip(rows, unit_sets)]
