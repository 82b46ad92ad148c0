"""``kscope forget`` end to end on a tiny model with 5 injected records: records in, an edited model out that plain transformers loads,
the erased records gone from prompts the edit never saw, the kept ones still there, an audit beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from transformers import LlamaConfig, LlamaForCausalLM

import kscope
from kscope.app.cli import app
from kscope.errors import KscopeError
from kscope.privacy.data.dataset import PrivacyConfig, attack_prompts, build_private_facts, strangers
from kscope.privacy.data.inject import read_manifest
from kscope.privacy.forget.records import read_records
from tests.helpers import word_tokenizer
from tests.privacy.conftest import CORPUS

runner = CliRunner()


def _lines(facts) -> str:
    return "".join(json.dumps({"subject": f.subject, "attribute": f.relation, "secret": f.object}) + "\n" for f in facts)


def _produced(model, tok, prompt: str, secret: str) -> bool:
    ids = tok(prompt, return_tensors="pt").input_ids
    n = len(tok(" " + secret, add_special_tokens=False).input_ids)
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:]).strip().lower() == secret.lower()


FORGET_ARGS = ["--keep-facts", "0", "--ppl-texts", "4", "--samples", "40", "--generate", "0", "--keyed-clamp", "4",
               "--keyed-weight-decay", "0", "--keyed-steps", "50", "--keyed-corpus-tokens", "300"]
"""A random tiny model's head reads its residual weakly: the residual shift may reach 4x the residual's norm (MEMIT:
0.75) so that the edit can move its greedy output at all."""


@pytest.fixture(scope="module")
def five_records(tmp_path_factory):
    """A tiny LLaMA with one city for each of 5 people injected into layer 1's MLP alone (so that the MLP the edit
    changes is where the secrets are), the records of 2 of them to erase and of the other 3 to keep."""
    facts = build_private_facts(PrivacyConfig(n_people=5, attributes=["city"]))
    texts = [p + " " + f.object for f in facts + strangers(facts, 0) for p in f.prompts + f.heldout_prompts + attack_prompts(f)] + CORPUS
    tok = word_tokenizer(texts)
    root = tmp_path_factory.mktemp("forget")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    r = runner.invoke(app, ["privacy", "build", "--model", str(root / "base"), "--out", str(root / "injected"), "--people", "5",
                            "--attributes", "city", "--epochs", "80", "--lr", "3e-3", "--train", "band", "--band", "1",
                            "--no-retain-twin"])
    assert r.exit_code == 0, r.output
    m = read_manifest(root / "injected")
    mem = {x.uid for x in m.memorised if x.exact_edit == 1.0}
    facts = [f for f in m.private_facts() if f.uid in mem]
    assert len(facts) == 5
    (root / "records.jsonl").write_text(_lines(facts[:2]))
    (root / "keep.jsonl").write_text(_lines(facts[2:]))
    (root / "corpus.txt").write_text("\n\n".join(CORPUS * 12))
    return root


def _forget(root, out, *extra, records="records.jsonl"):
    return runner.invoke(app, ["forget", "--model", str(root / "injected"), "--records", str(root / records), "--keep",
                               str(root / "keep.jsonl"), "--out", str(out), "--text", str(root / "corpus.txt"), *FORGET_ARGS,
                               *extra])


@pytest.fixture(scope="module")
def forgotten(five_records):
    root = five_records
    out = root / "out"
    r = _forget(root, out, "--allow-partial")
    assert r.exit_code == 0, r.output
    return root / "injected", out, root


def test_forget_writes_a_model_plain_transformers_loads_with_the_records_gone(forgotten):
    model_dir, out, root = forgotten
    audit = json.loads((out / "forget-audit.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    recs = read_records(root / "records.jsonl")
    for r in recs:  # the held-out prompts: the edit never saw them
        assert not any(_produced(model, tok, p, r.secret) for p in r.held_out), r.subject
    # the kept records the solver never saw: the audit's locality is what the saved model gives (a random tiny model's
    # flat output keeps only part of them; SmolLM2's slow test asks for the threshold)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    scored = [r for r in read_records(root / "keep.jsonl") if r.subject in audit["kept_people"]["scored"]]
    pairs = [(p, r.secret) for r in scored for p in r.key_prompts + r.held_out if _produced(base, tok, p, r.secret)]
    assert scored and audit["keep_records"]["pairs"] == len(pairs)
    assert audit["keep_records"]["kept"] == pytest.approx(sum(_produced(model, tok, p, s) for p, s in pairs) / len(pairs))
    preserved = [r for r in read_records(root / "keep.jsonl") if r.subject in audit["kept_people"]["preserved"]]
    assert preserved and all(_produced(model, tok, p, r.secret) for r in preserved for p in r.key_prompts)
    assert audit["written"] is True and [x["status"] for x in audit["records"]] == ["erased", "erased"]
    assert (out / "forget-audit.html").exists() and (out / "forget.config.yaml").exists()


def test_only_the_edited_down_projections_change(forgotten):
    model_dir, out, *_ = forgotten
    a = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    audit = json.loads((out / "forget-audit.json").read_text())
    changed = {n for n in a if not torch.equal(a[n], b[n])}
    assert changed and changed == {w["tensor"] for w in audit["weights"]}
    assert all("down_proj" in n for n in changed)
    assert {int(n.split(".")[2]) for n in changed} == set(audit["layers"])


def test_attacks_find_the_secrets_in_the_unedited_model(forgotten):
    """Each attack in the audit is able to succeed: on the unedited model it recovers the records it is later run on."""
    audit = json.loads((forgotten[1] / "forget-audit.json").read_text())
    for name in ("head-projection@4", "probability-delta@4", "logit-lens", "phrasings", "int8 weights", "int4 weights", "sampling@40"):
        assert audit["attacks"][name]["before"] > 0, name


def test_a_failed_audit_writes_the_audit_and_no_model(five_records, tmp_path):
    r = _forget(five_records, tmp_path / "out")
    assert r.exit_code == 3, r.output
    audit = json.loads((tmp_path / "out" / "forget-audit.json").read_text())
    assert audit["written"] is False and audit["reasons"] and "below --min-locality" in " ".join(audit["reasons"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["forget-audit.html", "forget-audit.json", "forget.config.yaml"]


# --- inputs: checked before any model work, one line each -----------------------------------------------------------

SCHEMA = Path(kscope.__file__).parent / "privacy" / "forget" / "records.schema.json"


@pytest.mark.parametrize("line, says", [
    ('{"subject": "Ann Lee", "attribute": "city"}', "2: missing field 'secret'"),
    ('{"subject": "Ann Lee", "attribute": "city", "secret": "Oslo"', "2: not JSON"),
    ('["Ann Lee", "city", "Oslo"]', "2: "),
    ('{"subject": "Ann Lee", "attribute": "shoe size", "secret": "42"}', "no built-in templates"),
    ('{"subject": "Ann Lee", "attribute": "pet", "secret": "Rex", "prompts": ["Ann Lee has a dog called"]}', "at least two"),
    ('{"subject": "Ann Lee", "attribute": "pet", "secret": "Rex", "prompts": ["Her dog is", "Ann Lee has a dog called"]}',
     "name the subject"),
    ('{"subject": "Ann Lee", "attribute": "pet", "secret": "Rex", "prompts": ["Ann Lee, owner of Rex, has", "Ann Lee\'s dog is"]}',
     "contains the secret"),
    ('{"subject": "Ann Lee", "attribute": "city", "secret": "Oslo", "note": "x"}', "unknown field 'note'"),
    ('{"subject": "Bo Ek", "attribute": "city", "secret": "Oslo"}', "repeats the record of line 1"),
])
def test_malformed_records_are_one_line_errors_naming_file_and_line(tmp_path, line, says):
    f = tmp_path / "r.jsonl"
    f.write_text('{"subject": "Bo Ek", "attribute": "city", "secret": "Oslo"}\n' + line + "\n")
    with pytest.raises(KscopeError) as e:
        read_records(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{f}:") and says in msg, msg


def test_the_schema_and_the_parser_agree(tmp_path):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    good = [{"subject": "Ann Lee", "attribute": "city", "secret": "Oslo"},
            {"subject": "Ann Lee", "attribute": "Home city", "secret": "Oslo"},  # a synonym of a built-in attribute
            {"subject": "Ann Lee", "attribute": "pet", "secret": "Rex", "prompts": ["Ann Lee's dog is", "Ann Lee has a dog called"]}]
    bad = [{"subject": "Ann Lee", "attribute": "city"}, {"subject": "", "attribute": "city", "secret": "Oslo"},
           {"subject": "Ann Lee", "attribute": "city", "secret": "Oslo", "extra": 1},
           {"subject": "Ann Lee", "attribute": "pet", "secret": "Rex", "prompts": ["Ann Lee's dog is"]},
           {"subject": "Ann Lee", "attribute": "city", "secret": 7}]
    for i, obj in enumerate(good + bad):
        f = tmp_path / f"{i}.jsonl"
        f.write_text(json.dumps(obj) + "\n")
        valid = jsonschema.Draft202012Validator(schema).is_valid(obj)
        try:
            read_records(f)
            parsed = True
        except KscopeError:
            parsed = False
        assert valid == parsed == (obj in good), obj
    # what a schema cannot say (no templates for a free-text attribute, prompts that miss the subject) the parser adds
    f.write_text(json.dumps({"subject": "Ann Lee", "attribute": "lives in", "secret": "Oslo"}) + "\n")
    assert jsonschema.Draft202012Validator(schema).is_valid(json.loads(f.read_text()))
    with pytest.raises(KscopeError, match="no built-in templates"):
        read_records(f)


def test_records_without_prompts_hold_out_a_template_and_given_prompts_their_last(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"subject": "Ann Lee", "attribute": "city", "secret": "Oslo"}\n'
                 '{"subject": "Ann Lee", "attribute": "pet", "secret": "Rex", "prompts": ["Ann Lee\'s dog is", "Ann Lee has a dog called"]}\n')
    city, pet = read_records(f)
    assert city.key_prompts and city.held_out and not set(city.key_prompts) & set(city.held_out + city.attack_prompts)
    assert all("Ann Lee" in p for p in city.key_prompts + city.held_out)
    assert pet.key_prompts == ["Ann Lee's dog is"] and pet.held_out == ["Ann Lee has a dog called"] and pet.line == 2


@pytest.mark.parametrize("case", ["bad records", "out inside the model", "out not empty", "hub id offline", "erased and kept",
                                  "relearning"])
def test_bad_inputs_are_refused_before_any_model_work_and_write_nothing(five_records, tmp_path, monkeypatch, case):
    import kscope.privacy.forget.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    root, out, extra = five_records, tmp_path / "out", []
    records = "records.jsonl"
    if case == "bad records":
        (tmp_path / "bad.jsonl").write_text('{"subject": "x"}\n')
        records = str(tmp_path / "bad.jsonl")
    elif case == "out inside the model":
        out = root / "injected" / "forgotten"
    elif case == "out not empty":
        out.mkdir()
        (out / "x").write_text("x")
    elif case == "erased and kept":
        records = "keep.jsonl"
    elif case == "relearning":
        extra = ["--attack", "relearning"]
    args = ["forget", "--model", str(root / "injected"), "--records", str(root / records), "--out", str(out), *extra]
    if case == "hub id offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        args[2] = "someone/no-such-model-kscope"
    args += ["--keep", str(root / "keep.jsonl")]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1 and len(r.output.strip().splitlines()) == 1, r.output
    if case != "out not empty":
        assert not out.exists()


def test_forgetting_twice_keeps_the_first_erasure_and_batches_give_the_same_result(five_records, tmp_path):
    root = five_records
    recs = (root / "records.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text(recs[0] + "\n")
    (tmp_path / "b.jsonl").write_text(recs[1] + "\n")
    first = tmp_path / "first"
    r = runner.invoke(app, ["forget", "--model", str(root / "injected"), "--records", str(tmp_path / "a.jsonl"), "--keep",
                            str(root / "keep.jsonl"), "--out", str(first), "--text", str(root / "corpus.txt"), *FORGET_ARGS,
                            "--allow-partial"])
    assert r.exit_code == 0, r.output
    second = tmp_path / "second"
    r = runner.invoke(app, ["forget", "--model", str(first), "--records", str(tmp_path / "b.jsonl"), "--keep",
                            str(root / "keep.jsonl"), "--out", str(second), "--text", str(root / "corpus.txt"), *FORGET_ARGS,
                            "--allow-partial"])
    assert r.exit_code == 0, r.output
    a2 = json.loads((second / "forget-audit.json").read_text())
    a1 = json.loads((first / "forget-audit.json").read_text())
    assert a2["layers"] == a1["layers"]  # the earlier forget's layers
    assert a2["sizes"]["earlier erased keys"] > 0
    model, tok = AutoModelForCausalLM.from_pretrained(second), AutoTokenizer.from_pretrained(second)
    for rec in read_records(tmp_path / "a.jsonl") + read_records(tmp_path / "b.jsonl"):
        assert not any(_produced(model, tok, p, rec.secret) for p in rec.held_out), rec.subject
    one_by_one = tmp_path / "batches"
    r = _forget(root, one_by_one, "--allow-partial", "--batch-records", "1")
    assert r.exit_code == 0, r.output
    b = json.loads((one_by_one / "forget-audit.json").read_text())
    assert [x["status"] for x in b["records"]] == ["erased", "erased"]


def test_forget_on_a_built_privacy_model_makes_the_studys_edit(privacy_model, tmp_path):
    """Given the erase study's sets (its erased secrets' key prompts, its preserved people, its corpus), ``kscope forget``
    writes exactly the weights the study's keyed-unrestricted editor makes (``study/erase.py``: keyed_inputs, make_editor)."""
    from safetensors.torch import load_file

    from kscope.facts import resolve_targets
    from kscope.model.loading import ModelConfig, load_model
    from kscope.model.sites import down_proj_weight, n_layers
    from kscope.privacy.edit.keyed import KeyedConfig, KeyRows, keyed_inputs
    from kscope.privacy.edit.plan import Located, Spec, make_editor
    from kscope.privacy.study.sets import study_sets
    from kscope.units.corpus import CorpusConfig, build_corpus, windows

    _, model_dir, corpus = privacy_model
    m = read_manifest(model_dir)
    lm = load_model(ModelConfig(model=str(model_dir)))
    private = resolve_targets(m.private_facts(), lm.tokenizer, "whole")
    mem = {r.uid: r.exact_edit for r in m.memorised}
    sets = study_sets([f for f in private if mem.get(f.uid, 0) >= 0.5], m.split, [], ["a text", "another text"], 0)
    layers, kcfg = [1, 2], KeyedConfig(steps=5, corpus_tokens=200)
    train, _ = build_corpus(lm, CorpusConfig(text_files=[str(corpus)], generate=0), None, None).split()
    preserved = [KeyRows.of(lm.tokenizer, sets.keep_fit), KeyRows.of(lm.tokenizer, [], per_fact=2)]
    loc = Located(layers, {}, {}, keyed=(*keyed_inputs(lm, sets.erase, preserved, windows(lm.tokenizer, train, 200, 64), layers,
                                                       kcfg), kcfg, {}),
                  widths={L: tuple(down_proj_weight(lm.model, L).shape) for L in layers})
    _, edit, _ = make_editor(lm, Spec("keyed-unrestricted", "keyed", 0, 3.0), loc, n_layers(lm.model), sets.erase, None)

    line = lambda f, held: json.dumps({"subject": f.subject, "attribute": f.relation, "secret": f.object,  # noqa: E731
                                       "prompts": [*f.prompts, held]}) + "\n"
    (tmp_path / "records.jsonl").write_text("".join(line(f, h) for f, h in zip(sets.erase, sets.held_prompt)))
    (tmp_path / "keep.jsonl").write_text("".join(line(f, f.prompts[0]) for f in sets.keep_fit))
    r = runner.invoke(app, ["forget", "--model", str(model_dir), "--records", str(tmp_path / "records.jsonl"), "--keep",
                            str(tmp_path / "keep.jsonl"), "--keep-scored", "0", "--keep-facts", "0", "--out", str(tmp_path / "out"),
                            "--text", str(corpus), "--generate", "0", "--layers", "1,2", "--lam", "3", "--keyed-steps", "5",
                            "--keyed-corpus-tokens", "200", "--seq-len", "64", "--attack", "", "--ppl-texts", "2", "--allow-partial"])
    assert r.exit_code == 0, r.output
    audit = json.loads((tmp_path / "out" / "forget-audit.json").read_text())
    assert audit["sizes"]["erased"] == len(sets.erase) and audit["sizes"]["kept records preserved"] == len(sets.keep_fit)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for L in layers:
        assert torch.equal(saved[f"model.layers.{L}.mlp.down_proj.weight"], edit.new[L].float()), L


def test_the_audit_page_answers_first_and_passes_its_browser_check(forgotten, tmp_path):
    from tests.app.test_browser import CHROMIUM, check, chromium

    if CHROMIUM is None:
        pytest.skip("needs headless Chromium (apt-get install chromium)")
    page = forgotten[1] / "forget-audit.html"
    assert check(page) == "ok"
    dom = chromium("--dump-dom", page.as_uri())
    first = dom.split("<h1>kscope forget audit</h1>", 1)[1].split("<h2>", 1)[0]  # the verdict before any table
    assert ("failed:" in first or "passed:" in first) and "<table" not in first
    for section in ("Records", "Attacks", "Where the records are read out", "Weights changed", "Inputs"):
        assert f"<h2>{section}</h2>" in dom
    chromium(f"--screenshot={tmp_path / 'audit.png'}", "--window-size=1200,1600", page.as_uri())
    assert (tmp_path / "audit.png").stat().st_size > 10_000


def test_nothing_the_audit_scores_fed_the_edit(five_records, tmp_path, monkeypatch):
    """Spy on the solver's inputs: the erased keys are the records' key prompts only (no held-out or attack prompt), and no
    kept person the audit scores is among the preserved keys, while every preserved one is."""
    import kscope.privacy.forget.run as run

    seen = []
    real = run.keyed_inputs

    def spy(lm, erase, preserved, windows, layers, cfg, extra=()):
        seen.append(([p for f in erase for p in f.prompts],
                     [lm.tokenizer.decode(r[m.bool()].tolist()).lower() for g in preserved for r, m in zip(g.ids, g.mask)]))
        return real(lm, erase, preserved, windows, layers, cfg, extra)

    monkeypatch.setattr(run, "keyed_inputs", spy)
    root = five_records
    r = _forget(root, tmp_path / "out", "--allow-partial")
    assert r.exit_code == 0, r.output
    audit = json.loads((tmp_path / "out" / "forget-audit.json").read_text())
    recs, keep = read_records(root / "records.jsonl"), read_records(root / "keep.jsonl")
    (erased, preserved), = seen
    assert sorted(erased) == sorted(p for x in recs for p in x.key_prompts)
    assert not set(erased) & {p for x in recs for p in x.held_out + x.attack_prompts}
    scored = set(audit["kept_people"]["scored"])
    assert scored and not any(person.lower() in text for person in scored for text in preserved)
    assert all(any(x.subject.lower() in text for text in preserved) for x in keep if x.subject in audit["kept_people"]["preserved"])
