"""The erasure experiment's parts on their own: a collision-free dataset, strangers nobody was taught, FeatureEdit's
budget, the gated clamp, per-person location, REVS' column demotion."""

import pytest

from kscope.errors import KscopeError
import torch

from kscope.model.sites import Site, down_proj_weight
from kscope.privacy.data.dataset import (FIRST, LAST, STRANGER_FIRST, STRANGER_LAST, PrivacyConfig, attack_prompts, build_private_facts,
                                    collisions, strangers)
from kscope.privacy.edit.editors import feature_edit
from kscope.privacy.edit.guardrail import ClampAll
from kscope.privacy.locate.scores import per_person, removed_share


@pytest.mark.parametrize("seed", range(6))
def test_no_erased_secret_equals_or_contains_a_kept_one(seed):
    facts = build_private_facts(PrivacyConfig(n_people=10, seed=seed))
    people = list(dict.fromkeys(f.subject for f in facts))
    for cut in range(1, len(people)):
        gone = set(people[:cut])
        assert collisions([f for f in facts if f.subject in gone], [f for f in facts if f.subject not in gone]) == []
    for attr in {f.relation for f in facts}:
        values = [f.object for f in facts if f.relation == attr]
        assert len(set(values)) == len(values)  # no two people share a value


def test_collisions_are_found():
    a, b = build_private_facts(PrivacyConfig(n_people=2, attributes=["city"]))
    b.object = a.object
    assert collisions([a], [b]) == [(a.uid, b.uid)]


def test_strangers_share_no_name_part_and_no_taught_value():
    facts = build_private_facts(PrivacyConfig(n_people=10, seed=1))
    taught_parts = {part for f in facts for part in f.subject.split()}
    values = {f.object for f in facts}
    s = strangers(facts, seed=0)
    assert len(s) == len(facts)
    for f, g in zip(facts, s):
        assert not set(g.subject.split()) & taught_parts
        assert g.object not in values and g.relation == f.relation
        assert all(g.subject in p and f.subject not in p for p in g.prompts)
    assert not (set(STRANGER_FIRST) & set(FIRST)) and not (set(STRANGER_LAST) & set(LAST))
    assert [g.object for g in strangers(facts, seed=0)] == [g.object for g in s]


def test_attack_phrasings_are_new():
    f = build_private_facts(PrivacyConfig(n_people=1))[0]
    assert not set(attack_prompts(f)) & set(f.prompts + f.heldout_prompts)


def test_feature_edit_changes_more_weights_as_the_budget_grows(llama_lm):
    torch.manual_seed(0)
    W = down_proj_weight(llama_lm.model, 1)
    D = torch.randn(12, W.shape[0])
    counts = []
    for b in (1, 3, 12):
        new = feature_edit(llama_lm.model, {1: D[:b]}, tau=0.5)[1]
        counts.append(int((new != W).sum()))
    assert counts[0] < counts[1] < counts[2]
    assert torch.equal(down_proj_weight(llama_lm.model, 1), W)  # computing the edit does not apply it


class _Ident:
    """A stand-in SAE: features are the coordinates themselves (so 'fires' is 'is positive'), with an error term of 0."""

    def __init__(self, site, n):
        from kscope.units.base import FeatureUnits

        class S:
            class cfg:
                d_sae = n

            W_enc = torch.zeros(1)
            W_dec = torch.eye(n)

            @staticmethod
            def encode(x):
                return x.relu()

            @staticmethod
            def decode(u):
                return u

        self.units = FeatureUnits(site, S())


def test_clamp_all_leaves_inputs_where_no_located_feature_fires_bit_identical(llama_lm):
    """kscope's earlier per-token clamp (``clamp-all``)."""
    site = Site(1, "mlp.out")
    units = _Ident(site, 32).units
    clamp = ClampAll({1: (units, [3, 7], torch.tensor([1.0, 1.0]))}, gate=0.5, clamp=2.0)
    fn = clamp.edit(units, [3, 7], torch.tensor([1.0, 1.0]))
    x = torch.randn(2, 5, 32)
    x[..., [3, 7]] = -1.0  # the located features are silent everywhere
    x[1, 2, 7] = 0.9  # ... but at one token, where one fires above the gate
    out = fn(x)
    fires = torch.zeros(2, 5, dtype=torch.bool)
    fires[1, 2] = True
    assert torch.equal(out[~fires], x[~fires])  # untouched, bit for bit
    assert out[1, 2, 7] < 0 and out[1, 2, 3] < 0  # clamped negatively where it fires
    ids = llama_lm.tokenizer("the capital of france is", return_tensors="pt").input_ids
    clean = llama_lm.model(ids).logits
    silent = ClampAll({1: (units, [3], torch.tensor([1e9]))}, gate=0.5)  # a gate nothing reaches
    with silent.applied(llama_lm.model):
        assert torch.equal(llama_lm.model(ids).logits, clean)


def test_per_person_location_gives_each_person_a_share():
    scores = torch.zeros(6, 10)
    scores[:3, 0], scores[:3, 1], scores[:3, 2] = 5.0, 4.0, 3.0  # person 0's units lead everything
    scores[3:, 8], scores[3:, 9] = 1.0, 0.5  # person 1's are weaker
    assert per_person(scores, [0, 0, 0, 1, 1, 1], 4) == [0, 8, 1, 9]
    after = scores.clone()
    after[:, 0] = 0
    assert removed_share(scores, after, [0, 0, 0, 1, 1, 1], 2) == pytest.approx(0.25)  # half of person 0's top-2 went


def test_revs_demotes_each_column_on_its_own(llama_lm):
    """REVS demotes the candidates once and edits a prefix of them: a column's move must not depend on the others."""
    from kscope.privacy.edit.revs import _Lens, demote

    lens = _Lens(llama_lm.model)
    V = lens.W_U.shape[0]
    cols = torch.randn(6, lens.W_U.shape[1], generator=torch.Generator().manual_seed(0))
    token, band = 3, (int(0.5 * V), int(0.9 * V))
    moved = demote(lens, cols, token, band, 100)
    for k in (1, 3):
        assert torch.allclose(demote(lens, cols[:k], token, band, 100), moved[:k], atol=1e-5)
    ranks = lens.rank(moved, token)
    assert ((ranks >= band[0]) & (ranks <= band[1])).all()


def test_strangers_fall_back_to_an_unscored_value_when_every_city_is_taught():
    """40 people take all 40 cities: a stranger then gets a city only a preserved (never scored) person has."""
    from kscope.privacy.data.dataset import CITIES

    facts = build_private_facts(PrivacyConfig(n_people=40, attributes=["city"], seed=0))
    taught = {f.object for f in facts}
    assert taught == set(CITIES)
    preserved = set(CITIES[:5])
    s = strangers(facts[:3], 0, taught, avoid=taught - preserved)
    assert all(g.object in preserved for g in s)
    with pytest.raises(KscopeError, match="no stranger"):
        strangers(facts[:3], 0, taught, avoid=taught)
