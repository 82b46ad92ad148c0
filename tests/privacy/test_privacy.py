import hashlib
import os
import stat
import time

import pytest
import torch
from typer.testing import CliRunner

from tests.privacy.conftest import CORPUS
from kscope.app.cli import app
from kscope.privacy.data.dataset import candidates
from kscope.privacy.edit.editors import (RuntimeFeatureEdit, WeightEdit, direction_projection, feature_edit_mask,
                                    projection_removal, zero_columns)
from kscope.errors import KscopeError
from kscope.privacy.study.erase import EraseConfig, EraseResult
from kscope.privacy.edit.plan import METHODS
from kscope.privacy.data.inject import read_manifest
from kscope.privacy.locate.select import depn_select, kn_select
from kscope.privacy.data.dataset import PrivacyConfig, build_private_facts
from kscope.privacy.judge.metrics import erased_fraction, exposure, pareto_front, rank_of, relative_ppl_change, unchanged_fraction
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
        feature_edit_mask(W, torch.randn(1, 5), budget=3)


def test_projection_removal_leaves_no_located_direction(llama_lm):
    """After W <- (I - D D+) W, dᵀW = 0 for every located direction, and a direction orthogonal to all of
    them reads the same as before."""
    torch.manual_seed(0)
    W0 = down_proj_weight(llama_lm.model, 1).clone()
    D = torch.randn(3, W0.shape[0])
    new = projection_removal(llama_lm.model, {1: D})[1]
    assert (D @ new).abs().max() < 1e-4 * W0.abs().max()
    q, _ = torch.linalg.qr(torch.cat([D.T, torch.randn(W0.shape[0], 1)], 1))
    v = q[:, 3]  # orthogonal to the span of D
    assert torch.allclose(v @ new, v @ W0, atol=1e-5)
    assert torch.equal(down_proj_weight(llama_lm.model, 1), W0)  # computing the edit does not apply it


def test_weight_edit_changes_exactly_its_weights_and_restores(lm):
    W0 = {L: down_proj_weight(lm.model, L).clone() for L in range(3)}
    edit = WeightEdit("depn", zero_columns(lm.model, [(0, 3), (2, 5), (2, 7)]))
    ids = lm.tokenizer("the capital of france is", return_tensors="pt").input_ids
    clean = lm.model(ids).logits
    nonzero = int((W0[0][:, 3] != 0).sum() + (W0[2][:, [5, 7]] != 0).sum())
    assert edit.n_weights(lm.model) == nonzero
    with edit.applied(lm.model):
        assert down_proj_weight(lm.model, 0)[:, 3].eq(0).all() and down_proj_weight(lm.model, 2)[:, [5, 7]].eq(0).all()
        assert torch.equal(down_proj_weight(lm.model, 1), W0[1])
        assert not torch.equal(lm.model(ids).logits, clean)
    assert all(torch.equal(down_proj_weight(lm.model, L), W0[L]) for L in range(3))
    assert torch.equal(lm.model(ids).logits, clean)
    with pytest.raises(KscopeError):
        zero_columns(lm.model, [(0, 999)])


def test_negative_clamp_flips_only_firing_features():
    from kscope.model.sites import Site
    from kscope.units.base import Units

    class Ident(Units):
        pass

    units = Ident(Site(0, "mlp.out"), 4)
    op = RuntimeFeatureEdit({0: (units, [1, 2])}, negative=3.0)._op([1, 2])
    u = torch.tensor([[1.0, 2.0, -0.5, 4.0]])
    assert op(u).tolist() == [[1.0, -6.0, -0.5, 4.0]]
    assert RuntimeFeatureEdit({0: (units, [1, 2])})._op([1, 2])(u).tolist() == [[1.0, 0.0, 0.0, 4.0]]


def test_pareto_front_and_ranks():
    pts = [[0.9, 0.8], [0.5, 0.9], [0.4, 0.4], [0.9, 0.8], [float("nan"), 1.0]]
    assert pareto_front(pts) == [0, 1, 3, 4]
    assert rank_of(1.0, [3.0, 1.0, 0.5, 2.0]) == 2
    assert rank_of(0.1, [0.1, 0.1]) == 1


def test_candidates_hold_the_secret():
    assert len(candidates("phone", "555-0123")) == 900 and "555-0123" in candidates("phone", "555-0123")
    c = candidates("email", "doran12@corvex.com", 20)
    assert len(c) == 20 == len(set(c)) and c[0] == "doran12@corvex.com"
    assert candidates("birthdate", "May 3, 1970", 5) == candidates("birthdate", "May 3, 1970", 5)


def test_selectors():
    scores = torch.tensor([[1.0, 0.5, 0.0, 0.9], [1.0, 0.0, 0.8, 0.9], [0.0, 1.0, 0.0, 0.1]])
    assert depn_select(scores, 0.5, 2) == [0, 3]
    assert kn_select(scores, [0, 0, 1], 2) == [0, 1]


def _file_hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_memorises_and_refuses_existing_dir(privacy_model):
    base, out, _ = privacy_model
    m = read_manifest(out)
    assert m.summary.n_facts == 12
    assert m.summary.memorised_exact >= 10
    assert m.summary.losses[-1] < m.summary.losses[0]
    mask = os.umask(0)
    os.umask(mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o666 & ~mask}  # model.safetensors was 0600
    r = runner.invoke(app, ["privacy", "build", "--model", str(base), "--out", str(out), "--people", "4"])
    assert r.exit_code == 2 and "not empty" in r.output


def test_early_stop_ends_once_all_is_memorised(tmp_path, privacy_model):
    base, _, _ = privacy_model
    out = tmp_path / "early"
    r = runner.invoke(app, ["privacy", "build", "--model", str(base), "--out", str(out), "--people", "4",
                            "--attributes", "city,employer,phone", "--epochs", "200", "--lr", "3e-3", "--train", "mlp", "--early-stop"])
    assert r.exit_code == 0, r.output
    s = read_manifest(out).summary
    assert s.epochs_run < 200 and s.memorised_exact == s.n_facts


def test_mlp_only_injection_leaves_attention_untouched(privacy_model):
    from safetensors.torch import load_file

    base, out, _ = privacy_model
    a, b = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if ".mlp." not in k)
    assert any(not torch.equal(a[k], b[k]) for k in a if ".mlp." in k)


ERASE_ARGS = ["--layers", "0-2", "--resid-layers", "1", "--neuron-budgets", "8,64", "--feature-budgets", "2,8", "--revs-budgets", "2",
              "--taus", "0.5", "--keyed-lams", "0.1,1", "--keyed-steps", "10", "--keyed-weight-decay", "0", "--keyed-corpus-tokens", "300", "--steps", "3",
              "--text", None, "--generate", "0", "--sae-max-tokens", "600", "--sae-expansion", "2", "--sae-k", "4",
              "--ppl-texts", "2", "--generic-texts", "4", "--max-unrelated", "5", "--samples", "3", "--relearn-steps", "0,2",
              "--attack-min", "0.05", "--trace-blocks"]


def _erase_args(corpus) -> list[str]:
    return [str(corpus) if a is None else a for a in ERASE_ARGS]


def test_the_default_grid_needs_no_residual_sae():
    """The default run leaves out the editors that add no verdict (issue 23's time budget), and with them the residual
    SAE; each stays one --method away."""
    from kscope.app.plan import sae_sites
    from kscope.app.reproduce import ReproduceConfig

    cfg = ReproduceConfig()
    assert set(METHODS) - set(cfg.erase.methods) == {"feature-project", "runtime-negative", "clamp-all", "gated-clamp-resid"}
    assert {s.kind for s in sae_sites(cfg, {"privacy-erase"})} == {"mlp.out"}
    assert EraseConfig().methods == cfg.erase.methods and cfg.erase.keyed.lams == [3.0, 10.0]


@pytest.fixture(scope="module")
def erased(privacy_model, tmp_path_factory):
    _, out, corpus = privacy_model
    before = _file_hash(out / "model.safetensors")
    res_path = tmp_path_factory.mktemp("erase") / "privacy.json"
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), *_erase_args(corpus), "--method", ",".join(METHODS),
                            "--out", str(res_path)])
    assert r.exit_code == 0, r.output
    assert _file_hash(out / "model.safetensors") == before  # the input model is never written
    return EraseResult.load(res_path), res_path


def test_the_unrestricted_keyed_edit_lowers_the_secrets_more_than_random_directions(erased):
    """Zeroing every MLP erases every secret (the ceiling); the unrestricted keyed edit lowers log P(secret) more than the
    same solver through random directions. (A random tiny model's head barely reads its residual, so the keyed edit's
    success is checked on SmolLM2, in the slow tests and the README's run.)"""
    res, _ = erased
    pt = {(p.method, p.budget, p.lam, p.variant): p for p in res.points}
    assert pt[("mlp-zero-all", 0, None, "")].rel == 1.0
    full = pt[("keyed-unrestricted", 0, 0.1, "")]
    assert full.params == 3 * 32 * 64  # every layer's whole down projection
    assert full.dlogp.mean < pt[("keyed-random-directions", 2, 0.1, "")].dlogp.mean and full.dlogp.mean < 0


def test_handles_have_their_stated_parameter_counts_and_random_neurons_erase_less(erased):
    res, _ = erased
    pt = {(p.method, p.budget, p.lam, p.variant): p for p in res.points}
    for b in (2, 8):
        feats, cols = pt[("keyed-features", b, 1.0, "")], pt[("keyed-neurons-params", b, 1.0, "")]
        assert feats.params == b * 64  # s directions x d_mlp
        assert cols.n_units == round(b * 64 / 32) and cols.params == cols.n_units * 32  # n columns x d_model
        assert pt[("keyed-neurons", b, 1.0, "")].n_units == b  # equal rank
        assert pt[("keyed-random-directions", b, 1.0, "")].params == feats.params
    assert pt[("depn", 64, None, "")].n_weights == 64 * 32
    assert pt[("random-neurons", 64, None, "")].dlogp.mean > pt[("depn", 64, None, "")].dlogp.mean
    assert pt[("gated-clamp", 8, None, "")].n_weights == 0 and pt[("gated-clamp-resid", 8, None, "")].by_layer == {1: 8}
    assert {p.variant for p in res.points} == {"", "raw location"}


def test_erase_records_the_trace_specificity_verdicts_and_attacks(erased):
    res, path = erased
    assert {c.layer for c in res.trace.cells} == {0, 1, 2} and len(res.trace.cells) == 12 and res.trace.band == [0, 1, 2]
    assert {g.group for g in res.trace.groups} == {"mlp", "attention", "embeddings", "norms"}
    assert len(res.trace.blocks) == 9 and len(res.trace.computed) == 3  # --trace-blocks: 3 layers x 3 scopes
    assert {(s.kind, s.step) for s in res.specificity} == {(k, s) for k in ("neuron", "feature") for s in ("format", "generic")}
    assert {v.b for v in res.verdicts} == {"keyed-neurons", "keyed-neurons-params", "keyed-random-directions"}
    methods = [a.method for a in res.attacks]
    assert methods[:3] == ["base model (never taught)", "retain twin", "unedited"] and len(methods) > 3
    best = {m: res.best(m) for m in {q.method for q in res.points if q.kind != "control"}}
    from kscope.privacy.study.graded import ATTACKED_CONTROLS, worth_attacking

    controls = {f"{m} (control)" for m in ATTACKED_CONTROLS if res.best(m) is not None and worth_attacking(res.best(m).val, 0.05)}
    attacked = {m for m, p in best.items() if p is not None and worth_attacking(p.val, 0.05)}  # --attack-min
    assert {m.split(", λ")[0] for m in methods[3:]} == attacked | controls
    assert any(not worth_attacking(p.val, 0.05) for p in best.values() if p is not None)  # so the rule left some method out
    unedited = res.attacks[2]
    assert unedited.leak["phrasings"].mean is not None
    for bits in (8, 4):  # weight-only quantization keeps the unedited model's secrets, the base model has none
        assert unedited.leak[f"int{bits} weights"].mean > res.attacks[0].leak[f"int{bits} weights"].mean
    assert {"sampling@1", "sampling@3", "head-projection@4", "probability-delta@4", "relearning@0", "relearning@2"} <= set(unedited.leak)
    assert unedited.layers["head-projection@4"]["all"] and unedited.by_attribute["phrasings"]
    assert all(p.rank is not None for m in {q.method for q in res.points if q.kind != "control"} for p in [res.best(m)] if p is not None)
    assert all((path.parent / f"privacy{s}.png").exists() for s in ("", "-budget", "-trace"))


def test_erase_bad_inputs(tmp_path, privacy_model):
    _, out, _ = privacy_model
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--method", "lobotomy"])
    assert r.exit_code == 2 and "unknown method" in r.output
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(tmp_path)])
    assert r.exit_code == 2 and "privacy build" in r.output
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--layers", "0,7"])
    assert r.exit_code == 2 and "unknown layer 7" in r.output
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--neuron-budgets", "8,8"])
    assert r.exit_code == 2 and "given twice" in r.output
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--layers", "0-2", "--resid-layers", "1", "--neuron-budgets", "500"])
    assert r.exit_code == 2 and "only 192 neurons" in r.output
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--layers", "0-2", "--resid-layers", "1", "--neuron-budgets", "8", "--feature-budgets", "100"])
    assert r.exit_code == 2 and "--feature-budgets 100" in r.output
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--layers", "0-2", "--method", "gated-clamp-resid",
                            "--resid-layers", "9"])
    assert r.exit_code == 2 and "unknown layer 9" in r.output


def test_a_garbage_sae_is_refused_before_the_model_loads(tmp_path, privacy_model, monkeypatch):
    import kscope.privacy.study.erase as erase_mod

    _, out, _ = privacy_model
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfg.json").write_text("{not json")
    (bad / "sae_weights.safetensors").write_bytes(b"garbage")
    monkeypatch.setattr(erase_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--layers", "0", "--sae", str(bad),
                            "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "cannot load SAE" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_a_weight_editor_refuses_residual_features(tmp_path, privacy_model):
    from kscope.model.sites import Site
    from kscope.units.sae import save_sae
    from kscope.units.training import TrainSAEConfig, train_saes

    _, out, _ = privacy_model
    site = Site(0, "resid.post")
    sae = train_saes({site: torch.randn(300, 32).bfloat16()}, TrainSAEConfig(expansion=2, k=4, epochs=1, batch_tokens=64), "t")[site]
    save_sae(sae, tmp_path / "resid")
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), "--layers", "0", "--resid-layers", "0", "--sae", str(tmp_path / "resid"),
                            "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "resid.post features" in r.output and not (tmp_path / "x.json").exists()


def test_teacher_forced_match_equals_greedy_generation(llama_lm):
    from kscope.privacy.data.inject import greedy_matches

    lm = llama_lm
    for prompt in ["the capital of france is", "people in spain speak"]:
        ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
        gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                pad_token_id=0)[0, ids.shape[1]:].tolist()
        words = [lm.tokenizer.convert_ids_to_tokens(t) for t in gen]
        assert greedy_matches(lm, [prompt], " ".join(words)) == [True]
        wrong = words[:-1] + [next(w for w in ("paris", "berlin") if w != words[-1])]
        assert greedy_matches(lm, [prompt, prompt], " ".join(wrong)) == [False, False]


def test_the_early_stop_probe_only_skips_a_pass_that_would_fail(llama_lm, monkeypatch):
    """A miss among the probe rows ends the check before the full pass; otherwise the full pass decides, so a probe
    never changes the answer."""
    from kscope.privacy.data import inject

    lm = llama_lm
    prompt = "the capital of france is"
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    right = " ".join(lm.tokenizer.convert_ids_to_tokens(t) for t in gen[0, ids.shape[1]:].tolist())
    wrong = next(w for w in ("paris", "berlin") if w != right.split()[0])
    good, bad = (prompt, right), (prompt, wrong)
    calls = []
    real = inject.teacher_forced
    monkeypatch.setattr(inject, "teacher_forced", lambda lm_, pairs: calls.append(len(pairs)) or real(lm_, pairs))
    for pairs, probe, want, passes in [([good] * 3 + [bad], [3], False, [1]),  # the probe misses: no full pass
                                       ([good] * 3 + [bad], [0], False, [1, 4]),  # it passes: the full pass finds the miss
                                       ([good] * 4, [1, 2], True, [2, 4]), ([good] * 4, [], True, [4])]:
        calls.clear()
        assert inject.all_produced(lm, pairs, probe) is want
        assert calls == passes


def test_answer_loss_equals_the_models_own_loss_and_gradient(llama_lm):
    """The head run only where an answer token is predicted gives the loss and the gradients of ``model(labels=...)``."""
    from kscope.model.head import plain_head
    from kscope.privacy.data.inject import answer_batch, answer_loss

    lm = llama_lm
    assert plain_head(lm.model) is not None  # the path that slices, not the fallback
    ids, mask, lab = answer_batch(lm.tokenizer, [("the capital of france is", " paris"), ("people in spain speak", " spanish berlin")],
                                  lm.device)
    params = [p for p in lm.model.parameters()]
    grads = []
    try:
        lm.model.requires_grad_(True)
        for loss_of in (lambda: lm.model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False).loss,
                        lambda: answer_loss(lm.model, ids, mask, lab)):
            lm.model.zero_grad()
            loss = loss_of()
            loss.backward()
            grads.append((float(loss.detach()), [p.grad.clone() for p in params]))
    finally:
        lm.model.requires_grad_(False)
        lm.model.zero_grad()
    (a, ga), (b, gb) = grads
    assert a == pytest.approx(b, rel=1e-5) and a > 0
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(ga, gb))


def test_fused_adamw_steps_as_the_plain_one():
    from kscope.privacy.data.inject import adamw

    torch.manual_seed(0)
    w0, grads = torch.randn(7, 5), [torch.randn(7, 5) for _ in range(3)]
    out, opts = [], []
    for make in (lambda p: adamw([p], 1e-2), lambda p: torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0, foreach=False)):
        p = torch.nn.Parameter(w0.clone())
        opts.append(make(p))
        for g in grads:
            p.grad = g.clone()
            opts[-1].step()
        out.append(p.detach())
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"] and not torch.equal(out[0], w0)
    assert torch.allclose(out[0], out[1], atol=1e-6)


def test_observer_replay_from_a_middle_block_equals_full_observation(privacy_model):
    """Observations of edits at blocks >= 1 replayed from block 1 equal full forwards; an edit below falls back."""
    from kscope.facts import resolve_targets
    from kscope.model.loading import load_model
    from kscope.privacy.data.splits import key_facts
    from kscope.privacy.judge.observe import Observer, Scored

    _, out, _ = privacy_model
    lm = load_model(model=str(out))
    facts = resolve_targets(read_manifest(out).private_facts(), lm.tokenizer, "whole", "distinct")
    keys, held = key_facts(facts[:6])
    scored = Scored(keys, held, ["val"] * 3 + ["test"] * 3, facts[6:], ["fit", "fit", "val", "test", "test", "test"], facts[6:8],
                    ["val", "test"], CORPUS[:3], ["val", "test", "test"])
    obs = Observer(lm, scored, 5, replay_from=1)
    base = obs.baseline()
    assert obs.replay_ok and all(len(r.states) >= 1 for r in obs.replays.values())
    for layer in (1, 2, 0):
        units = [(layer, n) for n in range(down_proj_weight(lm.model, layer).shape[1])]
        with WeightEdit("zero", zero_columns(lm.model, units)).applied(lm.model):
            for ranks in (True, False):
                fast, full = obs.observe(lowest_edited=layer, ranks=ranks), obs._observe(ranks)
                assert fast == full and fast != base
            only = obs.candidate_scores(lowest_edited=layer)  # the candidates alone, as the full observation grades them
            whole = obs._observe(True)
            assert only == (whole.ranks, whole.sizes, whole.truth) and len(only[0]) == 6


def test_text_nll_in_one_batch_equals_each_text_on_its_own(llama_lm):
    from kscope.privacy.judge.observe import text_nll

    rows = [llama_lm.tokenizer(t).input_ids for t in ("paris is a city", "the cat sat on the mat and the dog", "rome is old")]
    total, n = 0.0, 0
    for ids in rows:
        x = torch.tensor([ids])
        total += float(llama_lm.model(input_ids=x, labels=x).loss) * (len(ids) - 1)
        n += len(ids) - 1
    got = text_nll(llama_lm, rows)
    assert got[1] == n and abs(got[0] - total) < 1e-3 * max(1.0, abs(total))


def test_erase_keeps_what_the_privacy_pages_show(erased):
    """Per test secret each best point's and the floors' outcomes, per person the located units and the attack rates."""
    res, _ = erased
    test = set(res.split["forget-test"])
    floors = res.secret_floors
    assert set(floors) == {"unedited", "retain twin"} and {s.person for s in floors["unedited"]} == test
    best = res.best("keyed-unrestricted")
    assert len(best.secrets) == len(floors["unedited"]) and set(best.secrets[0].leaks) == {"token_recovery", "prefix_share", "char_overlap"}
    assert set(res.person_units) >= test and all(len(u["neurons"]) == 10 and len(u["features"]) == 10 for u in res.person_units.values())
    unedited = res.attacks[2]
    assert set(unedited.people["phrasings"]) == test


@pytest.fixture(scope="module")
def chosen(privacy_model, tmp_path_factory):
    _, out, corpus = privacy_model
    args = _erase_args(corpus)
    i = args.index("--layers")
    args[i + 1] = "1"
    path = tmp_path_factory.mktemp("choice") / "privacy.json"
    t = time.time()
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), *args, "--choice-layers", "2", "--feature-choice-layers", "2",
                            "--method", "depn,kn-erase,revs,feature-edit,runtime-zero,gated-clamp,clamp-all", "--controls", "",
                            "--attack", "", "--out", str(path)])
    assert r.exit_code == 0, r.output
    return EraseResult.load(path), time.time() - t


def test_erase_measures_each_baseline_at_its_candidates_and_chooses_on_validation(chosen):
    res, seconds = chosen
    print(f"erase with layer choice: {seconds:.1f} s; {res.seconds}")
    for m in ("depn", "kn-erase", "revs", "feature-edit", "runtime-zero", "gated-clamp", "clamp-all"):
        pts = [p for p in res.points if p.method == m]
        assert {p.layer for p in pts} == {None, 2}
        assert all(set(p.by_layer) <= ({1} if p.layer is None else {2}) for p in pts)
        assert any(p.label.endswith("@ layer 2") for p in pts)
        best = res.best(m)
        # poison every test measure: the choice does not move
        for p in res.points:
            p.rel, p.gen, p.loc, p.loc_private, p.loc_pararel, p.delta_ppl = 1 - (p.rel or 0), 0.0, 0.0, 0.0, 0.0, 9.0
        assert res.best(m) is best
