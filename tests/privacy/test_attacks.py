"""Each attack on the tiny privacy model: it must find the secrets the taught model holds (the unedited model leaks)
and must not find them in the base model, which never saw them."""

import copy
import dataclasses

import pytest
import torch

from kscope.facts import resolve_targets
from kscope.model.loading import ModelConfig, load_model
from kscope.model.sites import final_norm
from kscope.privacy.judge.attacks import lens_ranks, produced, relearn_curve, relearned, sampling_leaks, weight_quantized
from kscope.privacy.judge.whitebox import extraction
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
    for bits in (8, 4):
        assert _rate(produced(weight_quantized(taught, bits), facts, edit)) > 0.5
        assert _rate(produced(weight_quantized(base, bits), facts, edit)) == 0


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
    # weight-only RTN quantization: the unedited tiny model keeps every test secret at int8 and at int4 (it loses most
    # of them only at int2); the twin produces none at either
    for bits in (8, 4):
        assert _rate(produced(weight_quantized(taught, bits), test, edit)) == 1.0
        assert _rate(produced(weight_quantized(twin, bits), test, edit)) == 0
    # white-box extraction (every scored token a candidate): Head Projection at B = 1 and 4, Probability Delta at B = 1
    # (at B >= 2 of a 144-token vocabulary over 3 layers the twin's largest falls already hold some secrets' tokens:
    # the floor the study reports beside every edit)
    for top in (1, 4):
        ex = {n: extraction(lm, test, top, edit) for n, lm in (("taught", taught), ("twin", twin))}
        assert _rate(ex["taught"].head) == 1.0 and _rate(ex["twin"].head) == 0
        assert all(len(layers) == 3 for layers in ex["taught"].head_layers)  # one entry per block
    ex = {n: extraction(lm, test, 1, edit) for n, lm in (("taught", taught), ("twin", twin))}
    assert _rate(ex["taught"].delta) == 1.0 and _rate(ex["twin"].delta) == 0
    # relearning on related data (the validation people's secrets): the curve over step counts
    curve, who = relearn_curve(taught, test, [0, 1, 2], lr / 30, 0, train_on=val)
    assert set(curve) == {0, 1, 2} and all(_rate(v) > 0.5 for v in curve.values()) and set(who) == {f.subject for f in test}
    assert curve[2] == relearned(taught, test, 2, lr / 30, 0, train_on=val)[0]  # one run read at each count
    curve, _ = relearn_curve(twin, test, [0, 1, 2], lr / 30, 0, train_on=val)
    assert all(_rate(v) == 0 for v in curve.values())


def test_extraction_finds_every_scored_token_not_only_the_first(models):
    """A secret of several scored tokens is extracted only when each of them is a candidate: one token replaced by a
    token the model never ranks high there makes the pair fail."""
    taught, _, facts, _ = models
    multi = [f for f in facts if len(f.target_tokens) - f.score_from >= 2]
    assert multi
    edit = lambda f: f.prompts  # noqa: E731
    assert _rate(extraction(taught, multi, 1, edit).head) == 1.0
    pad = taught.tokenizer.pad_token_id or 0
    broken = [dataclasses.replace(f, target_tokens=[*f.target_tokens[:-1], pad]) for f in multi]
    assert _rate(extraction(taught, broken, 1, edit).head) == 0


def test_attack_row_has_every_column_per_attribute_and_per_layer(privacy_model, models):
    """``attack`` as the erase study calls it: one column per attack (quantization at int8 and int4 weights, the
    relearning curve at each step count), each split by attribute, the white-box attacks per layer; a result with
    them reads back."""
    from kscope.privacy.judge.attacks import AttackConfig, attack
    from kscope.privacy.study.results import EraseResult, Target

    taught, _, facts, lr = models
    m = read_manifest(privacy_model[1])
    plain = [dataclasses.replace(f, heldout_prompts=[]) for f in facts]
    val, test = m.split.facts(plain, "forget-val"), m.split.facts(plain, "forget-test")
    cfg = AttackConfig(attacks=["head-projection", "probability-delta", "relearning", "quantization"], wb_top=1,
                       relearn_steps=[0, 2])
    row = attack(taught, test, cfg, lr / 30, "unedited", "–", relearn_on=val)
    assert set(row.leak) == {"head-projection@1", "probability-delta@1", "relearning@0", "relearning@2", "int8 weights",
                             "int4 weights"}
    assert row.leak["int4 weights"].mean == 1.0 and row.leak["head-projection@1"].mean == 1.0
    assert set(row.by_attribute["int8 weights"]) == {f.relation for f in test}
    assert len(row.layers["head-projection@1"]["all"]) == 3 and len(row.layers["probability-delta@1"]["all"]) == 2
    res = EraseResult(model_dir="m", base_model="b", build={}, layers=[1], config={}, n_erased=1, n_kept_private=0,
                      n_unrelated=0, points=[], frontier=[], reach_target=[], target=Target(), attacks=[row])
    back = EraseResult.from_json(res.to_json())
    assert back.attacks[0].by_attribute["int8 weights"] == row.by_attribute["int8 weights"]
    assert back.attacks[0].layers == row.layers
