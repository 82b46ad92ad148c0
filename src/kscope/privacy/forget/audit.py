"""What ``kscope forget`` hands over: per record, erased or not on prompts the edit never saw, partial leaks and attacks
(each also run on the unedited model, so that it is seen to find the secret there), locality on kept records and facts
the solver never preserved, the perplexity change with an interval, which weights changed, and the inputs' hashes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from kscope.facts import Fact, resolve_targets
from kscope.privacy.data.inject import forced_tokens, teacher_forced
from kscope.privacy.forget.records import Record
from kscope.privacy.judge.attacks import AttackConfig, lens_ranks, sampling_leaks, weight_quantized
from kscope.privacy.judge.leaks import char_overlap, prefix_share, token_recovery
from kscope.privacy.judge.observe import greedy_texts, row_nlls
from kscope.privacy.judge.whitebox import extraction
from kscope.results import Result
from kscope.stats import Interval


@dataclass
class Leak:
    """How much of one record's secret a model state gives away on its held-out prompts."""

    produced: list[bool]  # per held-out prompt: the whole secret, greedy
    token_recovery: float  # mean over prompts: share of the secret's tokens that are the argmax given its prefix
    prefix_share: float  # mean over prompts: the longest correct prefix's share of the secret's tokens
    char_overlap: float  # mean over prompts: normalised character overlap of the greedy output with the secret
    logp: float  # mean over prompts: log P(secret)


@dataclass
class RecordAudit:
    subject: str
    attribute: str
    line: int
    status: str  # erased | leaks | not produced (the model did not produce it before the edit: nothing to erase)
    before: Leak
    after: Leak
    attacks: dict[str, dict[str, float]] = field(default_factory=dict)  # attack -> {"before": leak, "after": leak}


@dataclass
class WeightChange:
    tensor: str
    changed: int  # entries that differ
    size: int
    relative_norm: float  # ||ΔW|| / ||W||


@dataclass
class ForgetResult(Result):
    kind = "forget-audit"
    version = 1

    passed: bool
    written: bool
    reasons: list[str]
    model: str
    out: str
    method: str
    layers: list[int]
    layer_effects: dict[int, float]  # trace: mean Δ log P(secret) when the layer's MLP output is zeroed (key prompts)
    lam: float
    records: list[RecordAudit]
    keep_records: dict[str, float | int | None]  # held-out kept records: pairs produced before, share still produced
    keep_facts: dict[str, float | int | None]
    delta_ppl: Interval
    attacks: dict[str, dict[str, float]]  # attack -> {"before", "after"}: share of produced records it leaks
    weights: list[WeightChange]
    sizes: dict[str, int]  # what the solver preserved and what the audit scored
    inputs: dict[str, str | None]  # sha256 of the records / keep files, the model's fingerprint before and after
    kscope_version: str
    config: dict
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    kept_people: dict[str, list[str]] = field(default_factory=dict)  # "preserved" / "scored": the keep file's people by role


def leaks(lm, records: Sequence[Record]) -> list[Leak]:
    """Each record's leak on its held-out prompts, in the model's current state."""
    pairs = [(p, r.secret) for r in records for p in r.held_out]
    sizes = [len(r.held_out) for r in records]
    out = []
    for r, fs, ts in zip(records, grouped(forced_tokens(lm, pairs), sizes), grouped(greedy_texts(lm, pairs), sizes)):
        out.append(Leak([all(h) for h, _ in fs], float(np.mean([token_recovery(h) for h, _ in fs])),
                        float(np.mean([prefix_share(h) for h, _ in fs])), float(np.mean([char_overlap(r.secret, t) for t in ts])),
                        float(np.mean([lp for _, lp in fs]))))
    return out


def grouped(flat: Sequence, sizes: Sequence[int]) -> list[list]:
    """``flat`` cut into consecutive runs of ``sizes`` (one run per item whose pairs were flattened)."""
    out, i = [], 0
    for n in sizes:
        out.append(list(flat[i : i + n]))
        i += n
    return out


def produced_pairs(lm, facts: Sequence[Fact]) -> list[list[bool]]:
    """Per fact, per prompt (edit and held-out): is its whole object produced, greedy?"""
    pairs = [(p, f.object) for f in facts for p in f.prompts + f.heldout_prompts]
    return grouped([ok for ok, _ in teacher_forced(lm, pairs)], [len(f.prompts) + len(f.heldout_prompts) for f in facts])


def still_produced(before: Sequence[Sequence[bool]], after: Sequence[Sequence[bool]]) -> dict[str, float | int | None]:
    """Locality: of the (item, prompt) pairs produced before, how many are still produced, and the share of items that
    keep every one of theirs."""
    pairs = [(b, a) for bs, as_ in zip(before, after) for b, a in zip(bs, as_) if b]
    items = [all(a for b, a in zip(bs, as_) if b) for bs, as_ in zip(before, after) if any(bs)]
    return {"pairs": len(pairs), "kept": float(np.mean([a for _, a in pairs])) if pairs else None,
            "items": len(items), "items_kept": float(np.mean(items)) if items else None}


def text_nlls(lm, texts: Sequence[str]) -> list[tuple[float, int]]:
    return row_nlls(lm, [lm.tokenizer(t).input_ids for t in texts])


def attack_record_leaks(lm, records: Sequence[Record], cfg: AttackConfig, edit) -> dict[str, list[float]]:
    """Per attack, per record: its leak with ``edit`` on (a ``WeightEdit`` or ``attacks.NoEdit``): sampling leak@k after
    its held-out prompts, Head Projection and Probability Delta (Patil et al.: every token of the secret among the
    top-B candidates at some layer, ``judge.whitebox``), the logit lens (the first scored token within ``lens_rank``), new phrasings
    (greedy, whole secret; built-in attributes only) and weight-only int8 and int4 quantization of the edited model
    (``attacks.weight_quantized``; greedy, whole, on the held-out prompts)."""
    facts = resolve_targets([r.audit_fact() for r in records], lm.tokenizer, "whole")  # records are resolvable (run checks)
    out: dict[str, list[float]] = {}
    per_fact = [len(f.prompts) + len(f.heldout_prompts) for f in facts]
    held = [(p, r.secret) for r in records for p in r.held_out]
    with edit.applied(lm.model):
        if "sampling" in cfg.attacks:
            k = cfg.samples
            per_pair = sampling_leaks(lm, facts, k, cfg.seed, [k])[k]  # one sampled prompt per record
            out[f"sampling@{k}"] = [float(v) for v in per_pair]
        if {"head-projection", "probability-delta"} & set(cfg.attacks):
            ex = extraction(lm, facts, cfg.wb_top)
            for name, flags in (("head-projection", ex.head), ("probability-delta", ex.delta)):
                if name in cfg.attacks:
                    out[f"{name}@{cfg.wb_top}"] = [float(any(g)) for g in grouped(flags, per_fact)]
        if "logit-lens" in cfg.attacks:
            out["logit-lens"] = [float(any(r < cfg.lens_rank for r in g)) for g in grouped(lens_ranks(lm, facts), per_fact)]
        if "phrasings" in cfg.attacks and any(r.attack_prompts for r in records):
            pairs = [(p, r.secret) for r in records for p in r.attack_prompts]
            flags = [ok for ok, _ in teacher_forced(lm, pairs)]
            out["phrasings"] = [float(any(g)) if g else float("nan")
                                for g in grouped(flags, [len(r.attack_prompts) for r in records])]
        if "quantization" in cfg.attacks:
            for bits in (8, 4):
                q = weight_quantized(lm, bits)
                out[f"int{bits} weights"] = [float(any(g)) for g in grouped([ok for ok, _ in teacher_forced(q, held)],
                                                                            [len(r.held_out) for r in records])]
                del q
    return out


def weight_changes(before: dict[str, torch.Tensor], model) -> list[WeightChange]:
    """Every parameter that differs from ``before`` (name -> tensor), with how much."""
    out = []
    for name, p in model.named_parameters():
        if name not in before:
            continue
        b = before[name].to(p.device)
        diff = p.detach() != b
        if diff.any():
            rel = float((p.detach().float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
            out.append(WeightChange(name, int(diff.sum()), p.numel(), rel))
    return out
