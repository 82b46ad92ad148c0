"""Batched next-token scoring of prompts, with optional site edits at each prompt's last token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

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
