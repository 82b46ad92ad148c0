"""The where-it-is-computed trace: whole blocks restored to the base model's, alone and cumulatively."""

import pytest
import torch

from kscope.model.loading import LoadedModel
from kscope.privacy.locate.trace import strongest_band, trace_secrets
from tests.helpers import capital_facts, tiny_llama, word_tokenizer


def _lm(seed):
    return LoadedModel(tiny_llama(seed).eval(), word_tokenizer(), f"tiny-{seed}")


def _facts(tok):
    facts = capital_facts()
    for f in facts:
        f.target_tokens = tok(" " + f.object).input_ids + tok(" and").input_ids  # two scored tokens
        f.target_id = f.target_tokens[0]
    return facts


def test_block_restores_are_exact_and_cumulative_ends_agree():
    lm, base = _lm(0), _lm(1)
    facts = _facts(lm.tokenizer)
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    tr = trace_secrets(lm, base, facts, band=[1, 2], blocks=True)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # every swap undone
    assert {(c.layer, c.scope) for c in tr.blocks} == {(L, s) for L in range(3) for s in ("block", "below", "above")}
    assert "norms" in {g.group for g in tr.groups}
    # blocks 0..last restored from either end is the same model; one block alone at the ends is its cumulative restore
    assert tr.block_effect(2, "below") == pytest.approx(tr.block_effect(0, "above"), abs=1e-5)
    assert tr.block_effect(0, "block") == pytest.approx(tr.block_effect(0, "below"), abs=1e-5)
    assert tr.block_effect(2, "block") == pytest.approx(tr.block_effect(2, "above"), abs=1e-5)
    # the replayed (block, above) passes equal a full forward with the same weights swapped
    from kscope.model.hooks import swapped_weights
    from kscope.privacy.locate.trace import _batch, _logp
    ids, mask, _, pred, tgt, _ = _batch(lm, facts)
    clean = _logp(lm, ids, mask, pred, tgt)
    new = {n: p for n, p in base.model.named_parameters() if n.startswith("model.layers.1.")}
    with swapped_weights(lm.model, new):
        full = _logp(lm, ids, mask, pred, tgt)
    assert float((full - clean).mean()) == pytest.approx(tr.block_effect(1, "block"), abs=1e-4)
    assert len(tr.computed) == 2 and tr.computed == strongest_band(
        dict(zip(range(3), [-tr.block_effect(0, "below"), tr.block_effect(0, "below") - tr.block_effect(1, "below"),
                            tr.block_effect(1, "below") - tr.block_effect(2, "below")])), 2)


def test_restoring_to_the_same_weights_changes_nothing_and_blocks_are_opt_in():
    lm = _lm(0)
    facts = _facts(lm.tokenizer)
    tr = trace_secrets(lm, _lm(0), facts, blocks=True)
    assert all(abs(c.dlogp.mean) < 1e-5 for c in tr.blocks)
    plain = trace_secrets(lm, _lm(1), facts)
    assert plain.blocks == [] and plain.computed == [] and "norms" not in {g.group for g in plain.groups}
    assert trace_secrets(lm, None, facts, blocks=True).blocks == []  # no base model: nothing to restore
