"""What every editor is judged on: the erased secrets (edit and held-out prompts), the kept people's secrets, known
facts, perplexity on held-out text and the secret's rank among candidates of its format; tokenised once and
measured in batched teacher-forced passes, from the lowest edited block on when nothing below it changes."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kscope.facts import Fact
from kscope.model.head import plain_head
from kscope.model.hooks import BlockReplay, ReplayMismatch
from kscope.model.prefix import continuation_nlls_many
from kscope.model.readout import logits_where, pad_rows
from kscope.privacy.data.dataset import candidates
from kscope.privacy.data.inject import teacher_forced
from kscope.privacy.judge.metrics import erased_fraction, perplexity, rank_of, relative_ppl_change
from kscope.stats import Interval, mean_ci


@dataclass
class Observation:
    rel: list[list[bool]]  # per erased fact, per edit prompt: is the secret produced?
    gen: list[list[bool]]  # the same on its held-out prompts
    keep: list[list[bool]]  # the kept people's secrets
    unrel: list[list[bool]]  # known facts
    logp: list[float]  # per erased fact: mean log P(secret) over its edit prompts
    ranks: list[int] | None  # per erased fact: the secret's rank among its candidates (None: not measured)
    sizes: list[int] | None
    ppl: float


@torch.no_grad()
def text_nll(lm, rows: Sequence[Sequence[int]]) -> tuple[float, int]:
    """Summed next-token NLL of token ``rows`` and the number of tokens scored, in one right-padded batch."""
    if not rows:
        return 0.0, 0
    ids, mask = pad_rows(rows, lm.tokenizer.pad_token_id or 0)
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    r, pos = mask[:, 1:].nonzero().T  # each scored position predicts the token after it
    z = logits_where(lm.model, ids, mask, r, pos).float()
    nll = torch.logsumexp(z, -1) - z.gather(1, ids[r, pos + 1][:, None])[:, 0]
    return float(nll.sum()), int(mask[:, 1:].sum())


class Observer:
    """``replay_from``: edits never touch the blocks below this one, so after ``baseline()`` has recorded the hidden
    states entering it (and checked that a replay reproduces the baseline exactly), observations of edits at or
    above it run only the blocks from it on. Each part of an observation (teacher forcing, candidates, perplexity)
    has its own recording, so a part can be left out of a replayed observation."""

    PARTS = ("forced", "candidates", "perplexity")

    def __init__(self, lm, erase: Sequence[Fact], keep: Sequence[Fact], unrelated: Sequence[Fact], ppl_texts: Sequence[str],
                 n_candidates: int, replay_from: int = 0):
        self.lm = lm
        self.replays = {part: BlockReplay(lm.model, replay_from) for part in self.PARTS} if replay_from > 0 else None
        self.replay_ok = False
        self.start = replay_from
        plain_head(lm.model)  # its one-time check runs a forward: not in the recording
        self.groups: list[tuple[str, list[list[tuple[str, str]]]]] = [
            ("rel", [[(p, f.object) for p in f.prompts] for f in erase]),
            ("gen", [[(p, f.object) for p in f.heldout_prompts] for f in erase]),
            ("keep", [[(p, f.object) for p in f.prompts] for f in keep]),
            ("unrel", [[(p, f.object) for p in f.prompts[:2]] for f in unrelated]),
        ]
        self.people = [f.subject for f in erase]
        self.relations = [f.relation for f in erase]
        self.ppl_ids = [i for i in (lm.tokenizer(t).input_ids[:64] for t in ppl_texts) if len(i) >= 2]
        self.cands = []
        for f in erase:
            prompt = f.prompts[0]
            cs = candidates(f.relation, f.object, n_candidates)
            if f.object not in cs:
                cs = [f.object, *cs]
            n_prompt = len(lm.tokenizer(prompt).input_ids)
            self.cands.append((n_prompt, [lm.tokenizer(prompt + " " + c).input_ids for c in cs], cs.index(f.object)))

    def baseline(self) -> Observation:
        """The unedited observation (ranks included); records the states for replay and keeps replay only if it
        reproduces this."""
        if self.replays is None:
            return self._observe(True)
        base = self._observe(True, "recording")
        try:
            self.replay_ok = self._observe(True, "replaying") == base
        except ReplayMismatch:
            self.replay_ok = False
        return base

    def observe(self, lowest_edited: int = 0, ranks: bool = False) -> Observation:
        """The model as it is now; ``lowest_edited``: the lowest block any active edit touches; ``ranks``: also score the
        candidates (the slow part)."""
        return self._observe(ranks, self._mode(lowest_edited))

    def ranks(self, lowest_edited: int = 0) -> dict:
        """Only the candidate measures of the model as it is now (``compare``'s rank, exposure_all and exposure)."""
        return self.rank_measures(*self._ranks(self._mode(lowest_edited)))

    def _mode(self, lowest_edited: int) -> str | None:
        return "replaying" if self.replay_ok and lowest_edited >= self.start else None

    def _ranks(self, mode: str | None) -> tuple[list[int], list[int]]:
        with self._part("candidates", mode):
            nlls = continuation_nlls_many(self.lm.model, [(n_prompt, rows) for n_prompt, rows, _ in self.cands])
        return [rank_of(nll[j], nll) for nll, (_, _, j) in zip(nlls, self.cands)], [len(rows) for _, rows, _ in self.cands]

    def _part(self, part: str, mode: str | None):
        if mode is None:
            return nullcontext()
        return getattr(self.replays[part], mode)()

    @torch.no_grad()
    def _observe(self, ranks: bool, mode: str | None = None) -> Observation:
        flat = [pair for _, g in self.groups for rows in g for pair in rows]
        with self._part("forced", mode):
            res = teacher_forced(self.lm, flat)
        out, i = {}, 0
        logp_rows = []
        for name, g in self.groups:
            lists = []
            for rows in g:
                lists.append([ok for ok, _ in res[i : i + len(rows)]])
                if name == "rel":
                    logp_rows.append(float(np.mean([lp for _, lp in res[i : i + len(rows)]])))
                i += len(rows)
            out[name] = lists
        got_ranks, sizes = self._ranks(mode) if ranks else (None, None)
        with self._part("perplexity", mode):
            nll_sum, n_tok = text_nll(self.lm, self.ppl_ids)
        return Observation(out["rel"], out["gen"], out["keep"], out["unrel"], logp_rows, got_ranks, sizes, perplexity(nll_sum, n_tok))

    def compare(self, base: Observation, now: Observation) -> dict:
        """Rates and graded measures of ``now`` against the unedited ``base`` (rank measures only if ``now`` has ranks)."""
        retained = lambda b, a: 1.0 - erased_fraction(b, a)  # noqa: E731  share of produced pairs still produced
        loc_pararel, loc_private = retained(base.unrel, now.unrel), retained(base.keep, now.keep)
        row = dict(rel=erased_fraction(base.rel, now.rel), gen=erased_fraction(base.gen, now.gen),
                   loc_pararel=loc_pararel, loc_private=loc_private,
                   loc=float(np.nanmin([loc_pararel, loc_private])) if not (np.isnan(loc_pararel) and np.isnan(loc_private)) else None,
                   ppl=now.ppl, delta_ppl=relative_ppl_change(base.ppl, now.ppl),
                   dlogp=person_ci([a - b for a, b in zip(now.logp, base.logp)], self.people),
                   exposure=None, rank=None, exposure_all=None)
        if now.ranks is not None:
            row.update(self.rank_measures(now.ranks, now.sizes))
        return row

    def rank_measures(self, ranks: Sequence[int], sizes: Sequence[int]) -> dict:
        """The secrets' rank among their candidates, its exposure log2(candidates / rank), and the phones' exposure."""
        exp_all = [math.log2(n) - math.log2(r) for r, n in zip(ranks, sizes)]
        phone = [e for e, rel in zip(exp_all, self.relations) if rel == "phone"]
        return dict(exposure=float(np.mean(phone)) if phone else None, rank=person_ci(ranks, self.people),
                    exposure_all=person_ci(exp_all, self.people))


def person_ci(values: Sequence[float], people: Sequence[str]) -> Interval:
    """Mean over people of each person's mean, with the interval over people (one person's secrets are not independent)."""
    by: dict[str, list[float]] = {}
    for v, p in zip(values, people):
        by.setdefault(p, []).append(float(v))
    return mean_ci([float(np.mean(v)) for v in by.values()])
