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
    """Two relations. P1 has five usable templates (one unusable between them) in three paraphrase families: {0, 1}
    (capital / capital city: a near-duplicate pair that template parity would split), {2, 3} and {4}; P2 has two."""
    (root / "facts").mkdir(parents=True)
    (root / "patterns").mkdir()
    pats = {"P1": ["The capital of [X] is [Y] .", "The capital city of [X] is [Y] .", "[Y] is the capital of [X] .", "[X]'s capital is [Y] .",
                   "[X], whose capital is [Y] .", "[X] is governed from [Y] ."],
            "P2": ["[X] speaks [Y] .", "People in [X] speak [Y] ."]}
    facts = {"P1": [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome")], "P2": [("France", "French")]}
    for rel in pats:
        (root / "patterns" / f"{rel}.jsonl").write_text("".join(json.dumps({"pattern": p}) + "\n" for p in pats[rel]))
        (root / "facts" / f"{rel}.jsonl").write_text("".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in facts[rel]))


def test_pararel_hold_out_is_family_disjoint_within_a_relation(tmp_path):
    """Units are chosen on some of a relation's paraphrase families and measured on the others, whichever prompts each
    fact still has after the known filter, so no measured template, nor a near-duplicate of it, ever selected units of
    the relation (template parity would have "The capital of [X] is" select and "The capital city of [X] is" measure)."""
    from kscope.facts import family_split, split_kind, split_prompts, splittable

    _tiny_pararel(tmp_path)
    facts = {f.subject + f.relation: f for f in load_pararel(tmp_path)}
    france = facts["FranceP1"]
    assert france.templates == [0, 1, 2, 3, 4] and france.prompts[2] == "France's capital is"
    assert france.families == [0, 0, 1, 1, 2]
    sel, meas = split_prompts(france, True)
    assert sel.templates == [0, 1, 4] and meas.templates == [2, 3]  # families {0, 1} and {4} select, {2, 3} measures
    spain = facts["SpainP1"].with_prompts([facts["SpainP1"].prompts[i] for i in (1, 2, 3)])  # template 0 not known
    italy = facts["ItalyP1"].with_prompts([facts["ItalyP1"].prompts[i] for i in (0, 1)])  # one family: nothing to measure on
    assert spain.templates == [1, 2, 3] and spain.families == france.families  # families belong to the relation
    sel, meas = split_prompts(spain, True)
    assert sel.prompts == ["The capital city of Spain is"] and sel.templates == [1]
    assert meas.prompts == ["Spain's capital is", "Spain, whose capital is"] and meas.templates == [2, 3]
    kept = splittable([france, spain, italy, facts["FranceP2"]])
    assert [f.uid for f in kept] == [france.uid, spain.uid, facts["FranceP2"].uid]
    for rel in ("P1", "P2"):
        chosen = {f.families[t] for f in kept if f.relation == rel for t in split_prompts(f, True)[0].templates}
        measured = {f.families[t] for f in kept if f.relation == rel for t in split_prompts(f, True)[1].templates}
        assert chosen and measured and not chosen & measured
    s = family_split([france, spain, italy])
    assert (s.n_facts, s.n_both_sides, s.n_relations) == (3, 2, 1)
    assert (s.select_families, s.select_templates, s.measure_families, s.measure_templates) == (2, 3, 1, 2)
    label = split_kind(kept, True)
    assert label.startswith("family-disjoint") and "3 facts from 2 relations keep >= 1 family on each side" in label
    assert "2 of 3 facts from 1 relations" in split_kind([france, spain, italy], True)
    assert split_kind(kept, False).startswith("in-sample")
    assert "near-duplicates" in split_kind(builtin_facts(), True)  # the built-in set keeps its paraphrase alternation


def test_template_indices_without_families_split_by_parity():
    from kscope.facts import split_kind, split_prompts

    f = Fact("France", "P36", "Paris", ["a", "b", "c"], templates=[0, 3, 4])
    assert [g.templates for g in split_prompts(f, True)] == [[0, 4], [3]]
    assert "near-duplicates" in split_kind([f], True)
    with pytest.raises(KscopeError, match="family for each template"):
        Fact("France", "P36", "Paris", ["a", "b"], templates=[0, 5], families=[0, 1, 1])


def test_the_known_filter_keeps_template_indices_in_step(llama_lm, tmp_path):
    _tiny_pararel(tmp_path)
    facts = [f for f in load_pararel(tmp_path) if f.relation == "P1"]
    kept = filter_known(llama_lm, facts, FactConfig(known_top_k=10_000, min_known_prompts=1, max_prompts=3))
    # three prompts drawn from the two sides in turn (select 0, 1, 4; measure 2, 3), kept in template order
    assert all(f.templates == [0, 1, 2] and f.families == [0, 0, 1, 1, 2] and len(f.prompts) == 3 for f in kept)


def test_a_prompt_cap_never_empties_a_side():
    """``max_prompts`` takes prompts from the two sides in turn: the first 8 of P138's 15 templates are all "named
    after/for", one family, so a plain cap would leave nothing to measure on."""
    from kscope.facts import first_prompts

    f = Fact("x", "P138", "y", [f"p{i}" for i in range(15)], templates=list(range(15)), families=[0] * 10 + [1] * 5)
    assert first_prompts(f, 8) == ["p0", "p1", "p2", "p3", "p10", "p11", "p12", "p13"]
    assert first_prompts(f, 100) == f.prompts
    for g in builtin_facts():  # alternating paraphrases: the first n, as before
        assert all(first_prompts(g, n) == g.prompts[:n] for n in range(1, 7))


def test_max_facts_counts_only_facts_the_held_out_split_can_use(llama_lm, tmp_path):
    """Two known prompts on templates 0 and 1, a near-duplicate pair of one family, select and measure nothing: with
    --holdout such a fact does not take one of the --max-facts places."""
    _tiny_pararel(tmp_path)
    facts = [f for f in load_pararel(tmp_path) if f.relation == "P1"]
    facts[0] = facts[0].with_prompts([facts[0].prompts[i] for i in (0, 1)])
    cfg = FactConfig(known_top_k=10_000, min_known_prompts=1, max_facts=2)
    assert {f.uid for f in filter_known(llama_lm, facts, cfg, holdout=True)} == {facts[1].uid, facts[2].uid}
    assert len(filter_known(llama_lm, facts, FactConfig(known_top_k=10_000, min_known_prompts=1), holdout=False)) == 3


def test_a_pararel_fact_that_loses_a_prompt_keeps_its_template_indices(tmp_path, llama_lm):
    """Issue 34: pruning a prompt of a fact with template indices used to raise in ``__post_init__`` (``prompts``
    replaced without ``templates``); both pruning paths (a prompt that ends with the object, one too long for the
    context) keep indices and families in step."""
    from kscope.facts import asking, split_prompts

    f = Fact("France", "P36", "Paris", ["The capital of France is", "France's capital, Paris", "The capital city of France is"],
             templates=[0, 3, 5])
    (g,) = asking([f])
    assert g.prompts == ["The capital of France is", "The capital city of France is"] and g.templates == [0, 5]
    _tiny_pararel(tmp_path)
    france = next(f for f in load_pararel(tmp_path) if f.relation == "P1" and f.subject == "France")
    long_ = france.with_prompts(france.prompts[:3])
    long_.prompts[1] = "The capital city of France is " + "the " * 40  # too long for a 32-token context
    (h,) = resolve_targets([long_], llama_lm.tokenizer, context=32)
    assert h.templates == [0, 2] and h.families == france.families
    assert [x.templates for x in split_prompts(h, True)] == [[0], [2]]


def test_near_duplicate_rule():
    from kscope.facts import near_duplicate

    same = [("The capital of [X] is", "The capital city of [X] is"),  # issue 34's examples
            ("[X] was originally from", "[X] is originally from"),
            ("[X] is named after", "[X], which was named for"), ("[X] originated from", "[X] originates from"),
            ("[X] is in", "[X] is located in"), ("[X] is located in", "[X] is located in the continent"),
            ("[X] used to work in", "[X] worked in")]
    other = [("[X] is named after", "[X] is called after"),  # another content word: a lexical paraphrase
             ("The capital of [X] is", "[X]'s capital is"),  # another order
             ("[X] plays as", "[X] plays in the position of"), ("[X] was from", "[X] formed in"),
             ("[X] worked in", "[X] took up work in")]
    assert all(near_duplicate(a, b) and near_duplicate(b, a) for a, b in same)
    assert not any(near_duplicate(a, b) or near_duplicate(b, a) for a, b in other)


def test_family_sides_balance_templates_and_are_deterministic():
    from kscope.facts import family_sides

    assert family_sides([0, 1, 2, 3]) == ["select", "measure", "select", "measure"]  # singletons: template parity
    assert family_sides([0, 0, 1, 1, 1, 1, 2, 2]) == ["measure", "select", "measure"]  # 4 select, 2 + 2 measure
    assert family_sides([0, 0, 0]) == ["select"]  # one family: nothing can be measured held out


def test_a_families_file_keeps_its_sides_for_a_reader_and_they_follow_the_rule():
    """``sides`` is written to the JSON but derived from the families (never read back), so a round trip is exact."""
    from kscope.facts import TemplateFamilies, compute_families

    fam = compute_families("P999999", ["[X] plays", "[X], who plays as", "[X] performs", "[X] is from", "[X] was from"])
    assert fam.families == ((0, 1), (2,), (3, 4)) and fam.sides == ("select", "select", "measure")  # largest first, ties: select
    assert '"sides": ["select", "select", "measure"]' in fam.to_json()
    assert TemplateFamilies.from_json(fam.to_json()) == fam and TemplateFamilies.from_json(fam.to_json()).to_json() == fam.to_json()


def test_families_of_an_unseen_relation_are_computed(tmp_path):
    from kscope.facts import compute_families, template_families

    templates = ["[X] plays", "[X], who plays as", "[X] performs"]
    assert template_families("P999999", templates) == compute_families("P999999", templates)
    assert template_families("P999999", templates).families == ((0, 1), (2,))  # "who", "as": function words
    changed = ["The capital of [X] is", "[X] is governed from"]  # not the committed P36 templates: computed afresh
    assert template_families("P36", changed).families == ((0,), (1,))


def _pararel_families():
    from kscope.facts import compute_families, relation_templates

    return {p.stem: compute_families(p.stem, relation_templates(p)) for p in sorted((PARAREL / "patterns").glob("*.jsonl"))
            if relation_templates(p)}


@pytest.mark.skipif(not PARAREL.exists(), reason="../shared/pararel not present")
def test_every_pararel_template_is_in_exactly_one_family_and_families_are_not_near_duplicates():
    from kscope.facts import near_duplicate

    fams = _pararel_families()
    assert len(fams) >= 30
    for rel, fam in fams.items():
        members = sorted(t for f in fam.families for t in f)
        assert members == list(range(len(fam.templates))), rel  # a partition of the relation's templates
        assert len(fam.sides) == len(fam.families) and set(fam.sides) <= {"select", "measure"}
        of = fam.family_of()
        for i, a in enumerate(fam.templates):
            for j, b in enumerate(fam.templates):
                if of[i] != of[j]:
                    assert not near_duplicate(a, b), (rel, a, b)
    p36 = fams["P36"]
    assert p36.family_of()[p36.templates.index("The capital of [X] is")] == p36.family_of()[p36.templates.index("The capital city of [X] is")]
    p19 = fams["P19"]
    assert p19.family_of()[p19.templates.index("[X] was originally from")] == p19.family_of()[p19.templates.index("[X] is originally from")]


@pytest.mark.skipif(not PARAREL.exists(), reason="../shared/pararel not present")
def test_committed_family_files_equal_the_rule(tmp_path):
    """``kscope/data/template_families`` holds exactly what ``write_template_families`` computes from the shared
    patterns (regenerate: ``python -c "from kscope.facts import write_template_families as w; w('../shared/pararel')"``)."""
    from importlib import resources

    from kscope.facts import write_template_families

    written = {p.name: p.read_text(encoding="utf-8") for p in write_template_families(PARAREL, tmp_path)}
    shipped = resources.files("kscope.data").joinpath("template_families")
    committed = {p.name: p.read_text(encoding="utf-8") for p in shipped.iterdir() if p.name.endswith(".json")}
    assert committed == written


@pytest.mark.skipif(not PARAREL.exists(), reason="../shared/pararel not present")
def test_pararel_facts_split_by_family_for_every_fact_of_a_relation():
    from kscope.facts import family_split, split_prompts, splittable

    from kscope.facts.families import committed_families

    facts = load_pararel(PARAREL, max_per_relation=5, seed=0)
    assert all(f.families == committed_families(f.relation).family_of() for f in facts)  # the shipped families
    kept = splittable(facts)
    for rel in {f.relation for f in kept}:
        views = [split_prompts(f, True) for f in kept if f.relation == rel]
        fam = next(f for f in kept if f.relation == rel).families
        chosen = {fam[t] for sel, _ in views for t in sel.templates}
        measured = {fam[t] for _, meas in views for t in meas.templates}
        assert chosen and measured and not chosen & measured, rel
    s = family_split(facts)
    assert s.n_both_sides == len(kept) and s.n_relations >= 15
    single = {f.relation for f in facts if len(set(f.families)) == 1}
    assert {"P1376", "P17", "P47"} <= single and not single & {f.relation for f in kept}
