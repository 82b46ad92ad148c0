"""What every editor is judged on, split by what fitted it: the erased secrets on their held-out edit template (Rel) and
held-out phrasings (Gen), the kept people the solver never saw and known facts it never preserved (Loc), perplexity
on held-out text, the secret's rank among candidates of its format; and, labelled as in-sample, the same measures on
what the edit was fitted to (the key prompts, the preserved people and facts). Each scored item belongs to a split,
``val`` (settings are chosen there) or ``test`` (reported); tokenised once, measured in batched teacher-forced
passes, from the lowest edited block on when nothing below it changes."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from kscope.facts import Fact
from kscope.model.head import plain_head
from kscope.model.hooks import BlockReplay, ReplayMismatch
from kscope.model.prefix import continuation_nlls_many
from kscope.model.readout import logits_where, pad_rows
from kscope.privacy.data.dataset import candidates
from kscope.privacy.data.inject import forced_tokens
from kscope.privacy.judge.leaks import prefix_share, token_recovery, truth_ratio
from kscope.privacy.judge.metrics import erased_fraction, perplexity, rank_of, relative_ppl_change
from kscope.stats import Interval, mean_ci

SCOPES = ("val", "test")


@dataclass
class Scored:
    """What an observation scores, each item with its split: ``fit`` (the edit saw it), ``val`` or ``test``.

    ``erased``: the erased facts with only their key prompts; ``held_prompt``: each one's held-out edit prompt."""

    erased: list[Fact]
    held_prompt: list[str]
    erased_scope: list[str]
    kept: list[Fact]
    kept_scope: list[str]
    unrelated: list[Fact]
    unrelated_scope: list[str]
    texts: list[str]
    text_scope: list[str]

    def __post_init__(self) -> None:
        for items, scopes in ((self.erased, self.erased_scope), (self.held_prompt, self.erased_scope), (self.kept, self.kept_scope),
                              (self.unrelated, self.unrelated_scope), (self.texts, self.text_scope)):
            if len(items) != len(scopes):
                raise ValueError("every scored item needs its split")


@dataclass
class Observation:
    ok: dict[str, list[list[bool]]]  # group -> per fact -> per prompt: is the whole secret / object produced?
    hits: dict[str, list[list[list[bool]]]]  # 'rel', 'gen': per fact, per prompt, per token: argmax given its prefix?
    logp: list[float]  # per erased fact: log P(secret) on its held-out edit prompt
    ranks: list[int] | None  # per erased fact, on its held-out edit prompt: the secret's rank among its candidates
    sizes: list[int] | None
    truth: list[float] | None  # per erased fact: the truth ratio over its candidates (``leaks.truth_ratio``)
    ppl: dict[str, float] = field(default_factory=dict)  # per split of the held-out texts
    text_nlls: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # per split, per text: (NLL sum, tokens)


@torch.no_grad()
def text_nll(lm, rows: Sequence[Sequence[int]]) -> tuple[float, int]:
    """Summed next-token NLL of token ``rows`` and the number of tokens scored, in one right-padded batch."""
    per = row_nlls(lm, rows)
    return float(sum(s for s, _ in per)), int(sum(n for _, n in per))


@torch.no_grad()
def row_nlls(lm, rows: Sequence[Sequence[int]]) -> list[tuple[float, int]]:
    """Per token row: its summed next-token NLL and the number of tokens scored, in one right-padded batch."""
    if not rows:
        return []
    ids, mask = pad_rows(rows, lm.tokenizer.pad_token_id or 0)
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    r, pos = mask[:, 1:].nonzero().T  # each scored position predicts the token after it
    z = logits_where(lm.model, ids, mask, r, pos).float()
    nll = torch.logsumexp(z, -1) - z.gather(1, ids[r, pos + 1][:, None])[:, 0]
    sums = torch.zeros(len(rows), dtype=torch.float64, device=nll.device).index_add(0, r, nll.double())
    return [(float(s), int(n)) for s, n in zip(sums.tolist(), mask[:, 1:].sum(1).tolist())]


class Observer:
    """``replay_from``: edits never touch the blocks below this one, so after ``baseline()`` has recorded the hidden
    states entering it (and checked that a replay reproduces the baseline exactly), observations of edits at or
    above it run only the blocks from it on. Each part of an observation (teacher forcing, candidates, perplexity)
    has its own recording, so a part can be left out of a replayed observation."""

    PARTS = ("forced", "candidates", "perplexity")

    def __init__(self, lm, scored: Scored, n_candidates: int, replay_from: int = 0):
        self.lm = lm
        self.s = scored
        self.replays = {part: BlockReplay(lm.model, replay_from) for part in self.PARTS} if replay_from > 0 else None
        self.replay_ok = False
        self.start = replay_from
        plain_head(lm.model)  # its one-time check runs a forward: not in the recording
        s = scored
        kept_fit = [f for f, sc in zip(s.kept, s.kept_scope) if sc == "fit"]
        kept_out = [f for f, sc in zip(s.kept, s.kept_scope) if sc != "fit"]
        unrel_fit = [f for f, sc in zip(s.unrelated, s.unrelated_scope) if sc == "fit"]
        unrel_out = [f for f, sc in zip(s.unrelated, s.unrelated_scope) if sc != "fit"]
        self.scopes = {"rel": s.erased_scope, "gen": s.erased_scope, "rel_fit": ["fit"] * len(s.erased),
                       "keep": [sc for sc in s.kept_scope if sc != "fit"], "keep_fit": ["fit"] * len(kept_fit),
                       "unrel": [sc for sc in s.unrelated_scope if sc != "fit"], "unrel_fit": ["fit"] * len(unrel_fit)}
        self.groups: list[tuple[str, list[list[tuple[str, str]]]]] = [
            ("rel", [[(p, f.object)] for f, p in zip(s.erased, s.held_prompt)]),
            ("gen", [[(p, f.object) for p in f.heldout_prompts] for f in s.erased]),
            ("rel_fit", [[(p, f.object) for p in f.prompts] for f in s.erased]),
            ("keep", [[(p, f.object) for p in f.prompts + f.heldout_prompts] for f in kept_out]),
            ("keep_fit", [[(p, f.object) for p in f.prompts] for f in kept_fit]),
            ("unrel", [[(p, f.object) for p in f.prompts[:2]] for f in unrel_out]),
            ("unrel_fit", [[(p, f.object) for p in f.prompts[:2]] for f in unrel_fit]),
        ]
        self.people = [f.subject for f in s.erased]
        self.relations = [f.relation for f in s.erased]
        self.ppl_ids = {sc: [i for t, x in zip(s.texts, s.text_scope) if x == sc
                             for i in [lm.tokenizer(t).input_ids[:64]] if len(i) >= 2] for sc in SCOPES}
        self.cands = []
        for f, prompt in zip(s.erased, s.held_prompt):
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

    def candidate_scores(self, lowest_edited: int = 0) -> tuple[list[int], list[int], list[float]]:
        """Only the candidates of the model as it is now: per erased fact its rank, candidate count and truth ratio."""
        return self._ranks(self._mode(lowest_edited))

    def _mode(self, lowest_edited: int) -> str | None:
        return "replaying" if self.replay_ok and lowest_edited >= self.start else None

    def _ranks(self, mode: str | None) -> tuple[list[int], list[int], list[float]]:
        with self._part("candidates", mode):
            nlls = continuation_nlls_many(self.lm.model, [(n_prompt, rows) for n_prompt, rows, _ in self.cands])
        ranks = [rank_of(nll[j], nll) for nll, (_, _, j) in zip(nlls, self.cands)]
        truth = [truth_ratio(nll, [len(r) - n for r in rows], j) for nll, (n, rows, j) in zip(nlls, self.cands)]
        return ranks, [len(rows) for _, rows, _ in self.cands], truth

    def _part(self, part: str, mode: str | None):
        if mode is None:
            return nullcontext()
        return getattr(self.replays[part], mode)()

    @torch.no_grad()
    def _observe(self, ranks: bool, mode: str | None = None) -> Observation:
        flat = [pair for _, g in self.groups for rows in g for pair in rows]
        with self._part("forced", mode):
            res = forced_tokens(self.lm, flat)
        ok, hits, i = {}, {}, 0
        logp = []
        for name, g in self.groups:
            ok[name], hs = [], []
            for rows in g:
                got = res[i : i + len(rows)]
                ok[name].append([all(h) for h, _ in got])
                hs.append([h for h, _ in got])
                if name == "rel":
                    logp.append(float(np.mean([lp for _, lp in got])))
                i += len(rows)
            if name in ("rel", "gen"):
                hits[name] = hs
        got_ranks, sizes, truth = self._ranks(mode) if ranks else (None, None, None)
        ppl, per = {}, {}
        with self._part("perplexity", mode):
            for sc in SCOPES:
                per[sc] = row_nlls(self.lm, self.ppl_ids[sc])
                ppl[sc] = perplexity(sum(s for s, _ in per[sc]), sum(n for _, n in per[sc])) if per[sc] else math.nan
        return Observation(ok, hits, logp, got_ranks, sizes, truth, ppl, per)

    def _pick(self, name: str, scope: str, rows: list) -> list:
        return [r for r, sc in zip(rows, self.scopes[name]) if sc == scope]

    def compare(self, base: Observation, now: Observation, scope: str) -> dict:
        """Rates and graded measures of ``now`` against the unedited ``base`` on one split (``val``, ``test``; ``fit``:
        the in-sample rates the edit was fitted to)."""
        def retained(name: str) -> float:
            return 1.0 - erased_fraction(self._pick(name, scope, base.ok[name]), self._pick(name, scope, now.ok[name]))

        if scope == "fit":
            return dict(rel=erased_fraction(base.ok["rel_fit"], now.ok["rel_fit"]), loc_private=retained("keep_fit"),
                        loc_pararel=retained("unrel_fit"))
        loc_pararel, loc_private = retained("unrel"), retained("keep")
        both = [v for v in (loc_pararel, loc_private) if v == v]
        who = self._pick("rel", scope, self.people)
        row = dict(rel=erased_fraction(self._pick("rel", scope, base.ok["rel"]), self._pick("rel", scope, now.ok["rel"])),
                   gen=erased_fraction(self._pick("gen", scope, base.ok["gen"]), self._pick("gen", scope, now.ok["gen"])),
                   loc_pararel=loc_pararel, loc_private=loc_private, loc=min(both) if both else None,
                   ppl=now.ppl[scope], delta_ppl=relative_ppl_change(base.ppl[scope], now.ppl[scope]),
                   delta_ppl_ci=ppl_change_ci(base.text_nlls[scope], now.text_nlls[scope]),
                   dlogp=person_ci([a - b for a, b in zip(self._pick("rel", scope, now.logp), self._pick("rel", scope, base.logp))], who))
        return row

    def partial(self, obs: Observation, scope: str) -> dict[str, list[float]]:
        """Per erased fact of ``scope``, averaged over its held-out edit and held-out prompts: the partial-leak measures
        teacher forcing gives (``token_recovery``, ``prefix_share``)."""
        out: dict[str, list[float]] = {"token_recovery": [], "prefix_share": []}
        for rel, gen, sc in zip(obs.hits["rel"], obs.hits["gen"], self.scopes["rel"]):
            if sc != scope:
                continue
            rows = rel + gen
            out["token_recovery"].append(float(np.mean([token_recovery(h) for h in rows])))
            out["prefix_share"].append(float(np.mean([prefix_share(h) for h in rows])))
        return out

    def scored_pairs(self, scope: str) -> list[tuple[int, str, str]]:
        """``(erased fact index, prompt, secret)`` of every held-out edit and held-out prompt of ``scope``'s erased facts."""
        return [(i, p, f.object) for i, (f, held, sc) in enumerate(zip(self.s.erased, self.s.held_prompt, self.s.erased_scope))
                if sc == scope for p in [held, *f.heldout_prompts]]


def person_ci(values: Sequence[float], people: Sequence[str]) -> Interval:
    """Mean over people of each person's mean, with the interval over people (one person's secrets are not independent)."""
    by: dict[str, list[float]] = {}
    for v, p in zip(values, people):
        by.setdefault(p, []).append(float(v))
    return mean_ci([float(np.mean(v)) for v in by.values()])


@torch.no_grad()
def greedy_texts(lm, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Greedy decoding after each ``(prompt, secret)``'s prompt, as many tokens as the secret has plus two."""
    from kscope.model.sampling import sample_texts

    n_new = [len(lm.tokenizer(" " + s, add_special_tokens=False).input_ids) + 2 for _, s in pairs]
    g = torch.Generator().manual_seed(0)  # top-1: the draw never matters
    return [ts[0] for ts in sample_texts(lm, [p for p, _ in pairs], n_new, g, top_k=1)]


def ppl_change_ci(base: Sequence[tuple[float, int]], now: Sequence[tuple[float, int]], n_boot: int = 2000, seed: int = 0,
                  conf: float = 0.95) -> Interval:
    """The relative perplexity change with a percentile interval from a paired bootstrap over texts (each resample draws
    texts, both models' NLL on the same draw)."""
    b, a = np.asarray(base, float), np.asarray(now, float)
    if not len(b):
        return Interval(None, None, None, 0)
    point = math.exp((a[:, 0].sum() - b[:, 0].sum()) / b[:, 1].sum()) - 1
    idx = np.random.default_rng(seed).integers(0, len(b), (n_boot, len(b)))
    tokens = b[idx, 1].sum(1)
    boots = np.exp((a[idx, 0].sum(1) - b[idx, 0].sum(1)) / tokens) - 1
    lo, hi = np.quantile(boots, [(1 - conf) / 2, (1 + conf) / 2])
    return Interval(float(point), float(lo), float(hi), len(b))
