import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import tiny_llama, word_tokenizer
from kscope.app.cli import app
from kscope.privacy.editors import WeightEdit, depn_mask, direction_projection, feature_edit_mask
from kscope.errors import KscopeError
from kscope.privacy.inject import read_manifest
from kscope.privacy.select import depn_select, kn_select
from kscope.privacy.dataset import PrivacyConfig, build_private_facts
from kscope.privacy.metrics import erased_fraction, exposure, relative_ppl_change, unchanged_fraction
from kscope.model.sites import down_proj_weight

runner = CliRunner()


def test_private_facts_are_seeded_and_split():
    a = build_private_facts(PrivacyConfig(n_people=3, seed=1))
    b = build_private_facts(PrivacyConfig(n_people=3, seed=1))
    c = build_private_facts(PrivacyConfig(n_people=3, seed=2))
    assert [f.to_dict() for f in a] == [f.to_dict() for f in b]
    assert [f.object for f in a] != [f.object for f in c]
    assert len(a) == 15 and {f.relation for f in a} == {"phone", "email", "city", "employer", "birthdate"}
    for f in a:
        assert f.prompts and f.heldout_prompts and not set(f.prompts) & set(f.heldout_prompts)
        assert f.subject in f.prompts[0]
    assert next(f for f in a if f.relation == "phone").object.startswith("555-0")
    with pytest.raises(KscopeError, match="unknown attribute"):
        build_private_facts(PrivacyConfig(attributes=["ssn"]))


def test_metrics_on_constructed_cases():
    assert erased_fraction([[True, True], [True, False]], [[False, True], [False, True]]) == pytest.approx(2 / 3)
    assert erased_fraction([[False]], [[False]]) != erased_fraction([[False]], [[False]])  # NaN: nothing to erase
    assert unchanged_fraction([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert relative_ppl_change(10.0, 12.0) == pytest.approx(0.2)
    nlls = [5.0, 1.0, 3.0, 4.0]  # the secret (1.0) is the most likely of 4
    assert exposure(1.0, nlls) == pytest.approx(2.0)
    assert exposure(5.0, nlls) == pytest.approx(0.0)


def test_editor_masks_count_exactly():
    torch.manual_seed(0)
    W = torch.randn(8, 16)
    m = depn_mask(W, [1, 5])
    assert m.sum() == 16 and m[:, 1].all() and m[:, 5].all() and not m[:, 0].any()
    d = torch.randn(2, 8)
    fm = feature_edit_mask(W, d, budget=16)
    assert int(fm.sum()) == 16
    P = direction_projection(W, d)
    assert P[fm].min() >= P[~fm].max()  # exactly the largest projections
    tm = feature_edit_mask(W, d, tau=0.5)
    assert torch.equal(tm, P >= 0.5 * P.max())
    # A direction that is one output coordinate: only that row can be touched.
    e = torch.zeros(1, 8)
    e[0, 3] = 1.0
    assert feature_edit_mask(W, e, budget=4).nonzero()[:, 0].eq(3).all()
    with pytest.raises(KscopeError):
        depn_mask(W, [99])
    with pytest.raises(KscopeError):
        feature_edit_mask(W, torch.randn(1, 5), budget=3)


def test_weight_edit_changes_exactly_its_weights_and_restores(lm):
    W0 = down_proj_weight(lm.model, 1).clone()
    mask = feature_edit_mask(W0, torch.randn(2, W0.shape[0]), budget=37)
    edit = WeightEdit("feature-edit", 1, mask, [0, 1])
    ids = lm.tokenizer("the capital of france is", return_tensors="pt").input_ids
    clean = lm.model(ids).logits
    with edit.applied(lm.model):
        W1 = down_proj_weight(lm.model, 1)
        changed = (W1 != W0)
        assert int(changed.sum()) == edit.n_weights == 37 or int((W0[mask] != 0).sum()) == int(changed.sum())
        assert not changed[~mask].any()
        assert not torch.equal(lm.model(ids).logits, clean)
    assert torch.equal(down_proj_weight(lm.model, 1), W0)
    assert torch.equal(lm.model(ids).logits, clean)


def test_selectors():
    scores = torch.tensor([[1.0, 0.5, 0.0, 0.9], [1.0, 0.0, 0.8, 0.9], [0.0, 1.0, 0.0, 0.1]])
    assert depn_select(scores, 0.5, 2) == [0, 3]
    assert kn_select(scores, [0, 0, 1], 2) == [0, 1]


def _file_hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def privacy_model(tmp_path_factory):
    facts = build_private_facts(PrivacyConfig(n_people=2, attributes=["city", "employer", "phone"]))
    texts = [p + " " + f.object for f in facts for p in f.prompts + f.heldout_prompts]
    tok = word_tokenizer(texts)
    base = tmp_path_factory.mktemp("base")
    tiny_llama(vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path_factory.mktemp("p") / "injected"
    r = runner.invoke(app, ["privacy", "build", "--model", str(base), "--out", str(out), "--people", "2",
                            "--attributes", "city,employer,phone", "--epochs", "60", "--lr", "3e-3"])
    assert r.exit_code == 0, r.output
    return base, out


def test_build_memorises_and_refuses_existing_dir(privacy_model):
    base, out = privacy_model
    m = read_manifest(out)
    assert m.summary.n_facts == 6
    assert m.summary.memorised_exact >= 4
    assert m.summary.losses[-1] < m.summary.losses[0]
    r = runner.invoke(app, ["privacy", "build", "--model", str(base), "--out", str(out), "--people", "2"])
    assert r.exit_code == 2 and "not empty" in r.output


def test_erase_compares_methods_without_touching_input(privacy_model, tmp_path, facts):
    base, out = privacy_model
    weights = out / "model.safetensors"
    before = _file_hash(weights)
    sae_dir = tmp_path / "sae"
    r = runner.invoke(app, ["train-sae", "--model", str(out), "--site", "1/mlp.out", "--out", str(sae_dir),
                            "--expansion", "2", "--k", "4", "--max-tokens", "400", "--generate", "2", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    unrel = tmp_path / "unrel.jsonl"
    from kscope.facts import write_fact_file

    write_fact_file(facts, unrel)
    res_path = tmp_path / "privacy.json"
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--layer", "1", "--sae", str(sae_dir),
                            "--neurons", "4", "--features", "3", "--steps", "4", "--unrelated", str(unrel),
                            "--out", str(res_path)])
    assert r.exit_code == 0, r.output
    res = json.loads(res_path.read_text())
    assert set(res["methods"]) == {"none", "feature-edit", "depn", "kn-erase", "runtime-feature"}
    d_model = 32
    assert res["weight_budget"] == 4 * d_model
    assert res["methods"]["depn"]["n_weights"] == 4 * d_model
    assert res["methods"]["feature-edit"]["n_weights"] == 4 * d_model
    assert res["methods"]["kn-erase"]["n_weights"] == len(res["methods"]["kn-erase"]["units"]) * d_model
    assert res["methods"]["none"]["rel"] == 0.0 and res["methods"]["none"]["loc"] == 1.0
    for m in ("depn", "feature-edit"):
        assert 0.0 <= res["methods"][m]["rel"] <= 1.0
    assert _file_hash(weights) == before


def test_erase_bad_inputs(tmp_path, privacy_model):
    _, out = privacy_model
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--method", "lobotomy"])
    assert r.exit_code == 2 and "unknown method" in r.output
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(tmp_path)])
    assert r.exit_code == 2 and "privacy build" in r.output


def test_teacher_forced_match_equals_greedy_generation(llama_lm):
    from kscope.privacy.inject import greedy_matches

    lm = llama_lm
    for prompt in ["the capital of france is", "people in spain speak"]:
        ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
        gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                pad_token_id=0)[0, ids.shape[1]:].tolist()
        words = [lm.tokenizer.convert_ids_to_tokens(t) for t in gen]
        assert greedy_matches(lm, [prompt], " ".join(words)) == [True]
        wrong = words[:-1] + [next(w for w in ("paris", "berlin") if w != words[-1])]
        assert greedy_matches(lm, [prompt, prompt], " ".join(wrong)) == [False, False]
