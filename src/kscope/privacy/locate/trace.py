"""Where a secret lives in a privacy model: which layers' MLPs, at which positions, carry it.

Per layer, the change of log P(secret) (teacher-forced, the secret's scored tokens) when the fine-tuned
model's MLP output is zeroed, or computed by the *base* model's MLP from the same input (the fine-tune's
change of that MLP undone), at the subject's last token or at the positions that read the secret out (the
prompt's last token and the secret's own tokens). Beside it, whole groups of weights (every MLP, every
attention block, the embeddings) restored to the base model's. With ``blocks``, where the secret is computed:
each block's whole weights (attention, MLP and norms) restored at every position, and the blocks restored
cumulatively from the bottom (0..L) and from the top (L..last). Facts are averaged per person first and
intervals are over people, since one person's secrets share a name.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from kscope.facts import Fact
from kscope.model.head import plain_head
from kscope.model.hooks import BlockReplay, mlp_output_from, swapped_weights
from kscope.model.readout import logits_per_row, pad_rows
from kscope.model.sites import decoder_layers, mlp_module, n_layers
from kscope.stats import Interval, mean_ci

POSITIONS = ("subject", "answer")
INTERVENTIONS = ("zero", "restore")
GROUPS = {"mlp": r"\.mlp\.", "attention": r"(self_attn|\.attn\.)", "embeddings": r"(embed|wte|wpe)"}
GROUP_LABELS = {"mlp": "every MLP", "attention": "every attention layer", "embeddings": "the embeddings", "norms": "every norm"}
NORMS = r"(norm|\.ln_)"  # every norm's weights (LLaMA's *_layernorm and final norm, GPT-2's ln_*): with ``blocks`` only
SCOPES = ("block", "below", "above")  # layer L's block alone; blocks 0..L; blocks L..last (each restored at every position)


@dataclass
class TraceCell:
    layer: int
    position: str  # subject | answer
    intervention: str  # zero | restore
    dlogp: Interval  # change of log P(secret), mean over people


@dataclass
class GroupEffect:
    group: str  # mlp | attention | embeddings | norms (every layer's, restored to the base model's)
    dlogp: Interval

    @property
    def label(self) -> str:
        return GROUP_LABELS.get(self.group, f"every {self.group}")


@dataclass
class BlockCell:
    layer: int
    scope: str  # block | below | above
    dlogp: Interval  # change of log P(secret) with those blocks' weights restored to the base model's


@dataclass
class SecretTrace:
    """Where the secrets of a privacy model live; ``band``: the layers whose MLPs matter most (the suggested edit band)."""

    n_facts: int
    n_people: int
    logp: Interval  # clean log P(secret)
    cells: list[TraceCell] = field(default_factory=list)
    groups: list[GroupEffect] = field(default_factory=list)
    band: list[int] = field(default_factory=list)  # the edited band
    band_restore: Interval | None = None  # the band's MLPs restored to the base model's together
    suggested: list[int] = field(default_factory=list)  # where zeroing the MLP output at the answer positions matters most
    blocks: list[BlockCell] = field(default_factory=list)  # whole blocks restored (``trace_secrets(blocks=True)``)
    computed: list[int] = field(default_factory=list)  # where restoring blocks from the bottom removes the secret fastest

    def effect(self, layer: int, position: str, intervention: str) -> float:
        c = next(c for c in self.cells if (c.layer, c.position, c.intervention) == (layer, position, intervention))
        return c.dlogp.mean if c.dlogp.mean is not None else 0.0

    def block_effect(self, layer: int, scope: str) -> float:
        c = next(c for c in self.blocks if (c.layer, c.scope) == (layer, scope))
        return c.dlogp.mean if c.dlogp.mean is not None else 0.0


def subject_last(tokenizer, prompt: str, subject: str) -> int:
    """Index of the subject's last token in ``prompt``'s tokens (special tokens included)."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.rfind(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} not in prompt {prompt!r}")
    end = start + len(subject)
    idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end]
    return idx[-1]


def _batch(lm, facts: Sequence[Fact], prompts: int | None = None):
    """Teacher-forced rows of the first ``prompts`` edit prompts (default: all) of ``facts``: ids, mask, the subject and answer position masks, the
    positions predicting each scored token, the scored tokens, and each row's fact."""
    tok = lm.tokenizer
    rows, subj, ans, pred, tgt, owner = [], [], [], [], [], []
    for i, f in enumerate(facts):
        secret = list(f.target_tokens)
        for p in f.prompts[:prompts]:
            ids = tok(p).input_ids
            rows.append(ids + secret[:-1])
            subj.append(subject_last(tok, p, f.subject))
            ans.append(len(ids) - 1)
            pred.append([len(ids) - 1 + t for t in range(f.score_from, len(secret))])
            tgt.append(secret[f.score_from:])
            owner.append(i)
    ids, mask = pad_rows(rows, tok.pad_token_id or 0)
    width = ids.shape[1]
    pos = torch.arange(width)[None]
    lens = mask.sum(1)[:, None]
    at_subject = pos == torch.tensor(subj)[:, None]
    at_answer = (pos >= torch.tensor(ans)[:, None]) & (pos < lens)
    return ids, mask, {"subject": at_subject, "answer": at_answer}, pred, tgt, owner


@torch.no_grad()
def _logp(lm, ids, mask, pred, tgt) -> np.ndarray:
    """log P of each row's scored tokens, ``[rows]`` (the head runs only at the positions that predict them)."""
    logits = logits_per_row(lm.model, ids.to(lm.device), mask.to(lm.device), pred)
    return np.array([float(z.log_softmax(-1)[torch.arange(len(ts)), torch.tensor(ts, device=z.device)].sum())
                     for z, ts in zip(logits, tgt)])


def _per_person(values: np.ndarray, owner: Sequence[int], facts: Sequence[Fact]) -> Interval:
    """Mean over rows per fact, over facts per person, then the interval over people."""
    per_fact: dict[int, list[float]] = {}
    for v, o in zip(values, owner):
        per_fact.setdefault(o, []).append(float(v))
    per_person: dict[str, list[float]] = {}
    for o, vs in per_fact.items():
        per_person.setdefault(facts[o].subject, []).append(float(np.mean(vs)))
    return mean_ci([float(np.mean(v)) for v in per_person.values()])


def trace_secrets(lm, base_lm, facts: Sequence[Fact], layers: Sequence[int] | None = None, band: Sequence[int] = (),
                  progress=None, prompts: int | None = None, blocks: bool = False) -> SecretTrace:
    """The trace of ``facts`` (resolved to whole-answer targets) in ``lm``, against ``base_lm`` (the model before the
    secrets were injected; ``None``: the zeroing interventions alone, as ``kscope forget`` has no such model), with the
    edited ``band``'s MLPs restored together; ``suggested``: the ``len(band)``
    consecutive traced layers where zeroing the MLP output at the answer positions lowers log P(secret) most (where an
    edit of the MLP output reaches the secret). ``blocks`` (with a base model): whole blocks and every norm restored,
    and ``computed``, the ``len(band)`` consecutive traced layers whose cumulative restore from the bottom lowers
    log P(secret) most (where the secret is computed)."""
    layers = list(range(n_layers(lm.model))) if layers is None else list(layers)
    ids, mask, where, pred, tgt, owner = _batch(lm, facts, prompts)
    replays = {L: BlockReplay(lm.model, L) for L in layers if L > 0}  # blocks below an intervention need not run again
    plain_head(lm.model)  # its one-time check runs a forward: not in the recordings
    with ExitStack() as stack:
        for r in replays.values():
            stack.enter_context(r.recording())
        clean = _logp(lm, ids, mask, pred, tgt)
    out = SecretTrace(len(facts), len({f.subject for f in facts}), _per_person(clean, owner, facts))
    restores = base_lm is not None
    blocks = blocks and restores
    total = len(layers) * (4 if restores else 2) + (len(GROUPS) + bool(band) if restores else 0) + (len(layers) * 3 + 1) * blocks
    task = progress.add_task("where the secrets live", total=total) if progress else None
    for L in layers:
        fns = {"zero": lambda x, y: torch.zeros_like(y)}
        if restores:
            fns["restore"] = lambda x, y, m=mlp_module(base_lm.model, L): m(x)
        for position in POSITIONS:
            for name, fn in fns.items():
                with mlp_output_from(lm.model, L, fn, where[position].to(lm.device)), \
                        (replays[L].replaying() if L in replays else nullcontext()):
                    d = _logp(lm, ids, mask, pred, tgt) - clean
                out.cells.append(TraceCell(L, position, name, _per_person(d, owner, facts)))
                if progress:
                    progress.advance(task)
    base = dict(base_lm.model.named_parameters()) if restores else {}
    prefix = {id(m): n for n, m in lm.model.named_modules()}
    restore = {**GROUPS, **({"norms": NORMS} if blocks else {}),
               **({"band": "^(" + "|".join(re.escape(prefix[id(mlp_module(lm.model, L))]) for L in band) + r")\."}
                  if band else {})} if restores else {}
    for group, pattern in restore.items():
        new = {n: base[n] for n, _ in lm.model.named_parameters() if re.search(pattern, n)}
        with swapped_weights(lm.model, new):
            d = _per_person(_logp(lm, ids, mask, pred, tgt) - clean, owner, facts)
        if group == "band":
            out.band, out.band_restore = list(band), d
        else:
            out.groups.append(GroupEffect(group, d))
        if progress:
            progress.advance(task)
    if blocks:
        _trace_blocks(lm, base, prefix, layers, replays, (ids, mask, pred, tgt), clean, owner, facts, out, progress, task)
        below = [0.0] + [-out.block_effect(L, "below") for L in layers]
        out.computed = strongest_band({L: below[i + 1] - below[i] for i, L in enumerate(layers)}, max(1, len(band)))
    out.suggested = strongest_band({L: -out.effect(L, "answer", "zero") for L in layers}, max(1, len(band)))
    return out


def _trace_blocks(lm, base, prefix, layers, replays, batch, clean, owner, facts, out: SecretTrace, progress, task) -> None:
    """``out.blocks``: per traced layer L, block L's weights, blocks 0..L's and blocks L..last's restored to the base
    model's (blocks below L replay their recorded states where nothing below L changes)."""
    names = [[n for n, _ in blk.named_parameters(prefix=prefix[id(blk)])] for blk in decoder_layers(lm.model)]
    last = len(names) - 1
    for L in layers:
        for scope, span in zip(SCOPES, ([L], range(L + 1), range(L, last + 1))):
            new = {n: base[n] for i in span for n in names[i]}
            replay = replays.get(L) if scope != "below" else None
            with swapped_weights(lm.model, new), (replay.replaying() if replay else nullcontext()):
                d = _logp(lm, *batch) - clean
            out.blocks.append(BlockCell(L, scope, _per_person(d, owner, facts)))
            if progress:
                progress.advance(task)


def strongest_band(score: dict[int, float], size: int) -> list[int]:
    """The ``size`` consecutive entries of the traced layers (in ``score``'s order) with the largest summed score."""
    layers = list(score)
    windows = [layers[i : i + size] for i in range(max(1, len(layers) - size + 1))]
    return max(windows, key=lambda w: sum(score[L] for L in w))
