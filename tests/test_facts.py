import json

import pytest

from tests.helpers import PARAREL
from kscope.errors import KscopeError
from kscope.facts import (
    Fact,
    FactConfig,
    answer_token,
    builtin_facts,
    filter_known,
    load_fact_file,
    load_facts,
    load_pararel,
    resolve_targets,
    template_to_prompt,
)


def test_template_to_prompt():
    assert template_to_prompt("The capital of [X] is [Y] .") == "The capital of [X] is"
    assert template_to_prompt("[X]'s capital, [Y].") == "[X]'s capital,"
    assert template_to_prompt("[Y] is the capital of [X].") is None  # object not last: unusable for a causal LM
    assert template_to_prompt("[X] [Y]") == "[X]" or template_to_prompt("[X] [Y]") is None
    assert template_to_prompt("no slots") is None


@pytest.mark.skipif(not PARAREL.exists(), reason="../shared/pararel not present")
def test_load_pararel_capitals():
    facts = load_pararel(PARAREL, relations=["P36"])
    assert len(facts) == sum(1 for _ in open(PARAREL / "facts" / "P36.jsonl"))
    cook = next(f for f in facts if f.subject == "Cook County")
    assert cook.object == "Chicago"
    assert "The capital of Cook County is" in cook.prompts
    assert all(not p.endswith("[Y]") and "[X]" not in p for p in cook.prompts)
    assert len(cook.prompts) >= 5  # several paraphrases


@pytest.mark.skipif(not PARAREL.exists(), reason="../shared/pararel not present")
def test_load_pararel_sampling_is_seeded_and_skips_relations_without_templates():
    a = load_pararel(PARAREL, max_per_relation=3, seed=1)
    b = load_pararel(PARAREL, max_per_relation=3, seed=1)
    assert [f.uid for f in a] == [f.uid for f in b]
    assert "P527" not in {f.relation for f in a}  # facts but no templates file
    with pytest.raises(KscopeError, match="P527"):
        load_pararel(PARAREL, relations=["P527"])


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(KscopeError, match="not a ParaRel directory"):
        load_pararel(tmp_path)
    bad = tmp_path / "facts.jsonl"
    bad.write_text('{"subject": "a", "relation": "r", "object": "b", "prompts": ["x"]}\n{not json\n')
    with pytest.raises(KscopeError, match=r"facts.jsonl:2: malformed JSON"):
        load_fact_file(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(KscopeError, match="holds no facts"):
        load_fact_file(empty)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"subject": "a", "object": "b"}) + "\n")
    with pytest.raises(KscopeError, match="lacks relation, prompts"):
        load_fact_file(missing)
    with pytest.raises(KscopeError, match="has no prompts"):
        Fact("a", "r", "b", ["", "  "])
    with pytest.raises(KscopeError, match="non-empty"):
        Fact("", "r", "b", ["p"])
    with pytest.raises(KscopeError, match="does not exist"):
        load_facts(str(tmp_path / "nope.jsonl"))


def test_multi_token_policy(llama_lm):
    tok = llama_lm.tokenizer
    f1 = Fact("x", "r", "new york", ["the city is"])
    f2 = Fact("france", "capital", "paris", ["the capital of france is"])
    tid, multi = answer_token(tok, "new york")
    assert multi and tid == tok.convert_tokens_to_ids("new")
    kept = resolve_targets([f1, f2], tok, "first")
    assert [f.multi_token for f in kept] == [True, False]
    assert [f.object for f in resolve_targets([f1, f2], tok, "skip")] == ["paris"]
    with pytest.raises(KscopeError, match="not one token"):
        resolve_targets([f1], tok, "error")


def test_filter_known_keeps_only_top_k_prompts(llama_lm, facts):
    import torch

    from kscope.model.readout import answer_probs

    resolve_targets(facts, llama_lm.tokenizer)
    all_k = filter_known(llama_lm, [Fact(**{k: getattr(f, k) for k in ("subject", "relation", "object", "prompts")}) for f in facts],
                         FactConfig(known_top_k=len(llama_lm.tokenizer), min_known_prompts=1))
    assert len(all_k) == len(facts)  # everything is within the whole vocabulary
    strict = filter_known(llama_lm, facts, FactConfig(known_top_k=1, min_known_prompts=1))
    for f in strict:
        _, ranks = answer_probs(llama_lm.model, llama_lm.tokenizer, f.prompts, [f.target_id] * len(f.prompts))
        assert torch.all(ranks == 0)


def test_builtin_facts_are_wellformed():
    facts = builtin_facts()
    assert len(facts) >= 20
    assert len({f.relation for f in facts}) >= 3
    assert all(len(f.prompts) >= 2 for f in facts)


def test_split_prompts_alternates_and_refuses_a_single_prompt():
    from kscope.facts import split_prompts

    f = Fact("france", "capital", "paris", ["a", "b", "c", "d", "e"])
    sel, meas = split_prompts(f, True)
    assert sel.prompts == ["a", "c", "e"] and meas.prompts == ["b", "d"] and sel.uid == meas.uid == f.uid
    assert split_prompts(f, False) == (f, f)
    with pytest.raises(KscopeError, match="both sides"):
        split_prompts(Fact("x", "r", "y", ["only"]), True)


def _tiny_pararel(root):
    """Two relations; P1 has five usable templates (one unusable between them), P2 two."""
    (root / "facts").mkdir(parents=True)
    (root / "patterns").mkdir()
    pats = {"P1": ["The capital of [X] is [Y] .", "[X]'s capital is [Y] .", "[Y] is the capital of [X] .", "[X] has its capital in [Y] .",
                   "The capital city of [X] is [Y] .", "[X], whose capital is [Y] ."],
            "P2": ["[X] speaks [Y] .", "People in [X] speak [Y] ."]}
    facts = {"P1": [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome")], "P2": [("France", "French")]}
    for rel in pats:
        (root / "patterns" / f"{rel}.jsonl").write_text("".join(json.dumps({"pattern": p}) + "\n" for p in pats[rel]))
        (root / "facts" / f"{rel}.jsonl").write_text("".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in facts[rel]))


def test_pararel_hold_out_is_template_disjoint_within_a_relation(tmp_path):
    """Units are chosen on a relation's even-numbered templates and measured on its odd-numbered ones, whichever
    prompts each fact still has after the known filter, so no measured template ever selected units of the relation
    (alternating a fact's own known prompts would mix them: Spain below would select on templates 1 and 3)."""
    from kscope.facts import split_kind, split_prompts, splittable

    _tiny_pararel(tmp_path)
    facts = {f.subject + f.relation: f for f in load_pararel(tmp_path)}
    france = facts["FranceP1"]
    assert france.templates == [0, 1, 2, 3, 4] and france.prompts[2] == "France has its capital in"
    spain = facts["SpainP1"].with_prompts([facts["SpainP1"].prompts[i] for i in (1, 2, 3)])  # template 0 not known
    italy = facts["ItalyP1"].with_prompts([facts["ItalyP1"].prompts[i] for i in (0, 2)])  # selection templates only
    assert spain.templates == [1, 2, 3]
    sel, meas = split_prompts(spain, True)
    assert sel.prompts == ["Spain has its capital in"] and sel.templates == [2]
    assert meas.prompts == ["Spain's capital is", "The capital city of Spain is"] and meas.templates == [1, 3]
    kept = splittable([france, spain, italy, facts["FranceP2"]])
    assert [f.uid for f in kept] == [france.uid, spain.uid, facts["FranceP2"].uid]  # Italy has nothing to measure on
    chosen = {t for f in kept if f.relation == "P1" for t in split_prompts(f, True)[0].templates}
    measured = {t for f in kept if f.relation == "P1" for t in split_prompts(f, True)[1].templates}
    assert chosen == {0, 2, 4} and measured == {1, 3}
    assert split_kind(kept, True).startswith("template-disjoint") and split_kind(kept, False).startswith("in-sample")
    assert "near-duplicates" in split_kind(builtin_facts(), True)


def test_the_known_filter_keeps_template_indices_in_step(llama_lm, tmp_path):
    _tiny_pararel(tmp_path)
    facts = [f for f in load_pararel(tmp_path) if f.relation == "P1"]
    kept = filter_known(llama_lm, facts, FactConfig(known_top_k=10_000, min_known_prompts=1, max_prompts=3))
    assert all(f.templates == [0, 1, 2] and len(f.prompts) == 3 for f in kept)


def test_max_facts_counts_only_facts_the_held_out_split_can_use(llama_lm, tmp_path):
    """Two known prompts on templates 0 and 2 select and measure nothing: with --holdout such a fact does not take
    one of the --max-facts places."""
    _tiny_pararel(tmp_path)
    facts = [f for f in load_pararel(tmp_path) if f.relation == "P1"]
    facts[0] = facts[0].with_prompts([facts[0].prompts[i] for i in (0, 2)])
    cfg = FactConfig(known_top_k=10_000, min_known_prompts=1, max_facts=2)
    assert {f.uid for f in filter_known(llama_lm, facts, cfg, holdout=True)} == {facts[1].uid, facts[2].uid}
    assert len(filter_known(llama_lm, facts, FactConfig(known_top_k=10_000, min_known_prompts=1), holdout=False)) == 3


def test_a_pararel_fact_that_loses_a_prompt_keeps_its_template_indices():
    """Issue 34: pruning a prompt of a fact with template indices used to raise in ``__post_init__``."""
    from kscope.facts import asking

    f = Fact("France", "P36", "Paris", ["The capital of France is", "France's capital, Paris", "The capital city of France is"],
             templates=[0, 3, 5])
    (g,) = asking([f])
    assert g.prompts == ["The capital of France is", "The capital city of France is"] and g.templates == [0, 5]
