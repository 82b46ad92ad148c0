"""Each attack on the tiny privacy model: it must find the secrets the taught model holds (the unedited model leaks)
and must not find them in the base model, which never saw them."""

import copy
import dataclasses

import pytest
import torch

from kscope.facts import resolve_targets
from kscope.model.loading import ModelConfig, load_model
from kscope.model.sites import final_norm
from kscope.privacy.judge.attacks import lens_ranks, produced, quantized, relearned, sampling_leaks
from kscope.privacy.data.inject import read_manifest


@pytest.fixture(scope="module")
def models(privacy_model):
    base_dir, out, _ = privacy_model
    taught, base = load_model(ModelConfig(model=str(out))), load_model(ModelConfig(model=str(base_dir)))
    manifest = read_manifest(out)
    facts = resolve_targets(manifest.private_facts(), taught.tokenizer, "whole", "distinct")
    known = {r.uid for r in manifest.memorised if r.exact_edit >= 0.5}
    facts = [f for f in facts if f.uid in known]
    assert len(facts) >= 6
    return taught, base, facts, float(manifest.config["lr"])


def _rate(flags) -> float:
    return sum(flags) / len(flags)


def _sharpened(lm, factor: float = 30.0):
    """``lm`` with its logits times ``factor`` (the final norm's gain): the same greedy answers, and samples that
    follow them (the tiny model's memorised secrets win by small margins, so at temperature 1 it samples noise)."""
    sharp = copy.deepcopy(lm.model)
    with torch.no_grad():
        final_norm(sharp).weight.mul_(factor)
    return type(lm)(sharp, lm.tokenizer, lm.name)


def test_sampling_leaks_from_the_taught_model_only(models):
    taught, base, facts, _ = models
    facts = [dataclasses.replace(f, heldout_prompts=[]) for f in facts]  # sample after the prompts it was taught on
    leak = {name: sampling_leaks(_sharpened(lm), facts, 8, 0, [1, 8]) for name, lm in (("taught", taught), ("base", base))}
    assert sum(leak["taught"][8]) / len(facts) > 0.5 and sum(leak["base"][8]) == 0
    assert all(a <= b for a, b in zip(leak["taught"][1], leak["taught"][8]))  # leak@k grows with k


def test_the_logit_lens_ranks_the_secret_higher_in_the_taught_model(models):
    taught, base, facts, _ = models
    ranks = {name: lens_ranks(lm, facts) for name, lm in (("taught", taught), ("base", base))}
    assert _rate([r == 0 for r in ranks["taught"]]) > 0.5 > _rate([r == 0 for r in ranks["base"]])


def test_phrasings_and_quantization_find_what_greedy_decoding_produces(models):
    taught, base, facts, _ = models
    edit = lambda f: f.prompts  # noqa: E731  (the phrasings attack runs produced() on new templates)
    assert _rate(produced(taught, facts, edit)) > 0.5 and _rate(produced(base, facts, edit)) == 0
    assert _rate(produced(quantized(taught), facts, edit)) > 0.5 and _rate(produced(quantized(base), facts, edit)) == 0


def test_relearning_brings_back_only_what_was_taught(models):
    taught, base, facts, lr = models
    facts = [dataclasses.replace(f, heldout_prompts=[]) for f in facts]  # the tiny model knows its taught prompts only
    before = {n: p.detach().clone() for n, p in taught.model.named_parameters()}
    lr = lr / 30  # the injection's 3e-3 is for 80 epochs; two Adam steps at it scramble the tiny model's small margins
    flags, who = relearned(taught, facts, 2, lr, 0)
    assert _rate(flags) > 0.5 and len(set(who)) >= 1
    assert all((p == before[n]).all() for n, p in taught.model.named_parameters())  # weights restored exactly
    flags, _ = relearned(base, facts, 2, lr, 0)
    assert _rate(flags) == 0


def test_attacks_find_the_forget_secrets_in_the_unedited_model_and_not_in_the_retain_twin(privacy_model, models):
    """The erase study's reference: the retain twin never learned the forget set, so an attack that finds a forget secret
    in the unedited model must not find it there; relearning trains on the validation people's secrets (``train_on``)
    and scores the test people's."""
    from kscope.privacy.data.inject import retain_dir

    taught, _, facts, lr = models
    out = privacy_model[1]
    m = read_manifest(out)
    twin = load_model(ModelConfig(model=str(retain_dir(out, m))))
    plain = [dataclasses.replace(f, heldout_prompts=[]) for f in facts]
    val, test = m.split.facts(plain, "forget-val"), m.split.facts(plain, "forget-test")
    assert val and test
    edit = lambda f: f.prompts  # noqa: E731
    assert _rate(produced(taught, test, edit)) > 0.5 and _rate(produced(twin, test, edit)) == 0
    assert _rate(produced(quantized(taught), test, edit)) > 0.5 and _rate(produced(quantized(twin), test, edit)) == 0
    flags, who = relearned(taught, test, 2, lr / 30, 0, train_on=val)
    assert _rate(flags) > 0.5 and set(who) == {f.subject for f in test}
    flags, _ = relearned(twin, test, 2, lr / 30, 0, train_on=val)
    assert _rate(flags) == 0
