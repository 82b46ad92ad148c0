import math

import numpy as np
import pytest
import torch

from kscope.facts import resolve_targets
from kscope.locate.delta_prob import DeltaProbConfig, aggregate, fact_delta_prob
from kscope.units.provision import neuron_units
from kscope.model.readout import PromptBatch, answer_probs
from kscope.stats import mean_ci, relative_change


def test_relative_change_and_ci():
    assert relative_change([0.0, 0.2, 0.1], [0.1, 0.1, 0.1]).tolist() == pytest.approx([-1.0, 1.0, 0.0])
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    # t(0.975, 2) = 4.303; sd = 1; half-width = 4.303 / sqrt(3)
    assert ci.hi - 2.0 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-3)
    assert mean_ci([1.0]).lo is None
    assert mean_ci([]).n == 0


def test_padded_batch_matches_single_prompts(lm):
    prompts = ["the capital of france is", "people in spain speak", "it"]
    target = [lm.tokenizer(" paris", add_special_tokens=False).input_ids[0]] * 3
    batched, _ = answer_probs(lm.model, lm.tokenizer, prompts, target, batch_size=3)
    single = torch.cat([answer_probs(lm.model, lm.tokenizer, [p], target[:1])[0] for p in prompts])
    assert torch.allclose(batched, single, atol=1e-5)
    b = PromptBatch.from_texts(lm.tokenizer, prompts)
    assert b.last.tolist() == [4, 3, 0]


def test_delta_prob_suppress_all_neurons_differs_from_none(lm, facts):
    facts = resolve_targets(facts, lm.tokenizer)
    units = neuron_units(lm, 1)
    cfg = DeltaProbConfig(ks=[1, units.n_units], ops=["suppress", "enhance"])
    f = facts[0]
    res = fact_delta_prob(lm, f, units, list(range(units.n_units)), cfg)
    assert set(res) == {"suppress", "enhance"} and set(res["suppress"]) == {1, units.n_units}
    assert res["suppress"][units.n_units] != pytest.approx(0.0, abs=1e-6)
    # Enhancing by x1 is a no-op: check through the same path with a custom factor.
    from kscope.units.base import enhance

    targets = [f.target_id] * len(f.prompts)
    p0, _ = answer_probs(lm.model, lm.tokenizer, f.prompts, targets)
    p1, _ = answer_probs(lm.model, lm.tokenizer, f.prompts, targets, {units.site: units.edit_fn(enhance([0, 1], 1.0))})
    assert torch.allclose(p0, p1, atol=1e-6)
    agg = aggregate([res, res])
    assert agg["suppress"][1].mean == pytest.approx(res["suppress"][1])


def test_last_vs_all_positions_differ(lm, facts):
    facts = resolve_targets(facts, lm.tokenizer)
    units = neuron_units(lm, 0)
    f = facts[0]
    idx = list(range(units.n_units))
    a = fact_delta_prob(lm, f, units, idx, DeltaProbConfig(ks=[len(idx)], ops=["suppress"], positions="last"))
    b = fact_delta_prob(lm, f, units, idx, DeltaProbConfig(ks=[len(idx)], ops=["suppress"], positions="all"))
    assert a["suppress"][len(idx)] != pytest.approx(b["suppress"][len(idx)], abs=1e-7)
    assert np.isfinite(a["suppress"][len(idx)])
