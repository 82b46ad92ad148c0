"""End-to-end CLI on a tiny model saved to disk (loaded by local path, like any HF model)."""

import json
import os

import pytest
from typer.testing import CliRunner

from tests.helpers import save_tiny_model
from kscope.app.cli import app
from kscope.facts import write_fact_file

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_model(d)
    return d


@pytest.fixture
def fact_file(tmp_path, facts):
    p = tmp_path / "facts.jsonl"
    write_fact_file(facts, p)
    return p


def _sae(model_dir, tmp_path):
    out = tmp_path / "sae"
    r = runner.invoke(app, ["train-sae", "--model", str(model_dir), "--site", "1/mlp.out", "--out", str(out),
                            "--expansion", "2", "--k", "4", "--max-tokens", "500", "--generate", "40", "--gen-len", "16", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    return out


def test_train_sae_then_compare(model_dir, fact_file, facts, tmp_path):
    sae = _sae(model_dir, tmp_path)
    assert (sae / "cfg.json").exists()
    out = tmp_path / "cmp.json"
    r = runner.invoke(app, ["compare", "--model", str(model_dir), "--facts", str(fact_file), "--layers", "1",
                            "--sae", str(sae), "--known-top-k", "100", "--min-known-prompts", "1", "--steps", "4",
                            "--ks", "1,2", "--generate", "40", "--gen-len", "16", "--baseline-fit-tokens", "200", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["n_facts"] == 3 and res["split"].startswith("paraphrase") and res["schema"] == "kscope.compare/4"
    s = res["summary"]["1"]
    assert set(s) == {"neuron", "feature", "basis", "pca", "random"}  # the same-site baselines beside the paper's two kinds
    assert s["neuron"]["site"] == "1/mlp.neurons" and s["feature"]["site"] == "1/mlp.out" and s["pca"]["site"] == "1/mlp.out"
    e = s["neuron"]["effects"]
    assert set(e["top"]) == {"suppress", "enhance"} and set(e["top"]["suppress"]) == {"1", "2"}
    assert set(e["top"]["suppress"]["2"]) == {"rel", "log", "dx", "per_dx", "collateral"}  # the edit's size and collateral
    assert e["top"]["suppress"]["2"]["dx"]["mean"] > 0 and e["top"]["suppress"]["2"]["collateral"]["mean"] is not None
    assert e["random"]["suppress"]["2"]["collateral"] is None and {s[k]["effects"]["ablated_to"] for k in s} == {"mean"}
    for kind in ("neuron", "feature"):  # the controls: k random and k matched random units of each kind, per fact
        assert set(s[kind]["effects"]["random"]["suppress"]) == {"1", "2"} and s[kind]["effects"]["matched"] is not None
        assert all(f["layers"]["1"][kind]["effects"]["random"] for f in res["facts"])
        # the positive control (the whole unit set suppressed) is measured; its sign on a random tiny model is chance
        assert abs(s[kind]["effects"]["all"]["log"]["mean"]) > 0
    assert s["pca"]["effects"]["random"] is None and s["pca"]["effects"]["all"] is not None
    fact = res["facts"][0]
    assert len(fact["layers"]["1"]["neuron"]["top"]) == 10
    by_uid = {f.uid: f for f in facts}
    for f in res["facts"]:  # held out: chosen on prompts 0, 2, ...; measured on 1, 3, ...
        given = by_uid[f["uid"]]
        assert f["selected_on"] == given.prompts[0::2] and f["prompts"] == given.prompts[1::2]
        assert len(f["p_clean"]) == len(f["prompts"])


def test_analyses_reuse_located_units_only_when_chosen_on_the_same_prompts(facts):
    """An analysis takes a compare result's units only if they were chosen on its selection prompts: a held-out
    compare serves a held-out analysis, an in-sample one (or a locate run) does not."""
    from types import SimpleNamespace as NS

    from kscope.analyses.common import located_tops
    from kscope.facts import split_prompts

    def result(selected_on):
        return NS(facts=[NS(uid=f.uid, prompts=f.prompts, selected_on=selected_on(f),
                            layers={1: {"neuron": NS(top=[NS(unit=3)]), "feature": NS(top=[NS(unit=4)])}})
                         for f in facts])

    held = [split_prompts(f, True)[0] for f in facts]
    assert located_tops(result(lambda f: f.prompts[0::2]), held, 1) == {"neuron": [[3]] * 3, "feature": [[4]] * 3}
    assert located_tops(result(lambda f: f.prompts), held, 1) is None
    assert located_tops(result(lambda f: f.prompts), facts, 1) is not None
    assert located_tops(result(lambda f: None), facts, 1) is not None  # older results: chosen on their prompts


def test_locate_single_fact(model_dir, tmp_path):
    out = tmp_path / "loc.json"
    r = runner.invoke(app, ["locate", "--model", str(model_dir), "--subject", "france", "--object", "paris",
                            "--prompt", "the capital of france is", "--prompt", "france 's capital city is",
                            "--layers", "0,2", "--no-features", "--steps", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert set(res["facts"][0]["layers"]) == {"0", "2"}
    top = res["facts"][0]["layers"]["0"]["neuron"]["top"]
    assert top[0]["score"] >= top[-1]["score"]


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--layers", "7"], "unknown layer 7"),
        (["--layers", "x"], "cannot parse layers"),
        (["--facts", "/nonexistent/facts.jsonl"], "does not exist"),
        (["--site", "attn.out"], "unknown site kind"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(model_dir, fact_file, tmp_path, args, msg):
    out = tmp_path / "never.json"
    base = ["compare", "--model", str(model_dir), "--steps", "2", "--known-top-k", "100", "--out", str(out)]
    if "--facts" not in args:
        base += ["--facts", str(fact_file)]
    if "--layers" not in args:
        base += ["--layers", "1"]
    r = runner.invoke(app, base + args)
    assert r.exit_code == 2, r.output
    assert msg in " ".join(r.output.split())
    assert not out.exists()


def test_multi_token_target_is_rejected_for_single_fact(model_dir, tmp_path):
    r = runner.invoke(app, ["locate", "--model", str(model_dir), "--subject", "x", "--object", "new york",
                            "--prompt", "the city is", "--no-features", "--layers", "0", "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2
    assert "not one token" in r.output


def test_empty_fact_file(model_dir, tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    r = runner.invoke(app, ["compare", "--model", str(model_dir), "--facts", str(p), "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2 and "no facts" in r.output


CORPUS = ["--generate", "40", "--gen-len", "16"]  # the default corpus (3072 sequences) is for real models


@pytest.fixture(scope="module")
def tiny_sae(model_dir, tmp_path_factory):
    return _sae(model_dir, tmp_path_factory.mktemp("sae"))


@pytest.mark.parametrize("cmd,extra", [("faithfulness", ["--fit-tokens", "300", "--ks", "1,2"]),
                                       ("interpret", ["--contexts", "40"]),
                                       ("monosemanticity", ["--top-units", "2"])])
def test_analysis_commands_write_json_and_png(model_dir, fact_file, tiny_sae, tmp_path, cmd, extra):
    r = runner.invoke(app, [cmd, "--model", str(model_dir), "--facts", str(fact_file), "--layer", "1",
                            "--sae", str(tiny_sae), "--out-dir", str(tmp_path), *CORPUS, *extra]
                      + ([] if cmd == "faithfulness" else []), env={"KSCOPE_QUIET": "1"})
    # The random tiny model knows nothing at top-1: faithfulness etc. must say so clearly.
    assert r.exit_code == 2 and "none of the 3 facts is known" in " ".join(r.output.split())
    assert not (tmp_path / f"{cmd}.json").exists()


@pytest.mark.parametrize("cmd,extra,keys", [
    ("faithfulness", ["--fit-tokens", "300", "--ks", "1,2"], {"decompositions"}),
    ("interpret", ["--contexts", "40"], {"results"}),
    ("monosemanticity", ["--top-units", "2"], {"results"}),
])
def test_analysis_commands_succeed(model_dir, fact_file, tiny_sae, tmp_path, cmd, extra, keys):
    r = runner.invoke(app, [cmd, "--model", str(model_dir), "--facts", str(fact_file), "--layer", "1", "--sae", str(tiny_sae),
                            "--known-top-k", "100", "--min-known-prompts", "1", "--out-dir", str(tmp_path), *CORPUS, *extra])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / f"{cmd}.json").read_text())
    assert keys <= set(res)
    assert (tmp_path / f"{cmd}.png").stat().st_size > 1000
    if cmd == "faithfulness":
        assert set(res["decompositions"]) == {"feature", "pca", "ica", "random"}
        assert res["decompositions"]["pca"]["l0"] <= res["decompositions"]["feature"]["l0"] + 1
    else:
        assert set(res["results"]) == {"neuron", "feature"}


def test_monosemanticity_tests_units_on_prompts_they_were_not_chosen_on(model_dir, fact_file, facts, tiny_sae, tmp_path, monkeypatch):
    import kscope.analyses.common as common
    import kscope.analyses.monosemanticity as mono

    chosen, related = [], {}
    real_attr, real_mono = common.attribute_fact, mono.unit_monosemanticity
    monkeypatch.setattr(common, "attribute_fact", lambda lm, fact, *a, **k: chosen.append(set(fact.prompts)) or real_attr(lm, fact, *a, **k))

    def spy_mono(lm, fs, *a, **k):
        related.update({f.uid: set(f.prompts) for f in fs})
        return real_mono(lm, fs, *a, **k)

    monkeypatch.setattr(mono, "unit_monosemanticity", spy_mono)
    r = runner.invoke(app, ["monosemanticity", "--model", str(model_dir), "--facts", str(fact_file), "--layer", "1", "--sae",
                            str(tiny_sae), "--known-top-k", "100", "--min-known-prompts", "1", "--out-dir", str(tmp_path), *CORPUS,
                            "--top-units", "2"])
    assert r.exit_code == 0, r.output
    assert set(related) == {f.uid for f in facts}
    for f in facts:
        sel = set().union(*(c for c in chosen if c <= set(f.prompts)))
        assert sel and not sel & related[f.uid] and sel | related[f.uid] == set(f.prompts)


def test_reproduce_writes_report_and_resumes(model_dir, tmp_path):
    cwd = os.getcwd()
    out = tmp_path / "report"
    args = ["reproduce", "--model", str(model_dir), "--layer", "1", "--out", str(out), "--known-top-k", "100",
            "--min-known-prompts", "1", "--sae-tokens", "400", "--generate", "40", "--gen-len", "16", "--sae-expansion", "2", "--sae-k", "32",
            "--stages", "compare,faithfulness,interpret,monosemanticity"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    plan = r.output.split("stage 1/4")[0]  # the plan comes before any stage, and the one SAE is trained before the stages too
    assert "SAE corpus: " in plan and "SAEs: 0 of 1 cached, 1 to train" in plan and "compare: runs, ~" in plan
    assert "estimated total" in plan and "SAEs" in plan.split("estimated total")[1]
    res = json.loads((out / "results.json").read_text())
    assert {"compare", "faithfulness", "interpret", "monosemanticity"} <= set(res)
    assert {"saes", "compare", "faithfulness", "interpret", "monosemanticity"} == set(res["stage_seconds"])
    first_seconds = res["stage_seconds"]
    page = (out / "index.html").read_text()
    assert "Neurons, features and same-site baselines" in page and "compare.png" in page and (out / "compare.png").exists()
    stamp = (out / "compare.json").stat().st_mtime_ns
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "done, resumed" in r.output and "compare: done with these options, reused" in r.output
    assert (out / "compare.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "results.json").read_text())["stage_seconds"]  # a reused stage keeps the time it took
    assert again == {k: v for k, v in first_seconds.items() if k != "saes"}
    os.chdir(tmp_path)  # the same directory spelled relatively is the same run
    try:
        r = runner.invoke(app, [a if a != str(out) else "report" for a in args])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0 and "options changed" not in r.output and (out / "compare.json").stat().st_mtime_ns == stamp
    r = runner.invoke(app, ["reproduce", "--model", str(model_dir), "--out", str(out), "--stages", "everything"])
    assert r.exit_code == 2 and "unknown stage" in r.output
    # Other facts: compare runs again (it is not reused under the new options), and so do the stages that read it.
    r = runner.invoke(app, [*args[:-2], "--max-facts", "2", "--stages", "compare,interpret"])
    assert r.exit_code == 0, r.output
    assert "compare (options changed: running again)" in r.output and "interpret (options changed" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["compare"]["n_facts"] == 2 and "up to 2 known facts" in res["facts_note"]
    assert "faithfulness" not in res or res["faithfulness"] is None  # made under the old options: not reported as current


def test_reproduce_hands_the_sweep_its_protocols_and_widths(tmp_path):
    from kscope.app.reproduce import ReproduceConfig, stage_configs

    cfg = ReproduceConfig(out=str(tmp_path), layer=9, sweep_selection=["ig", "activation"], sweep_ablation=["reconstruction"],
                          sweep_widths=[1, 8])
    sweep = stage_configs(cfg)["sweep"]
    assert (sweep.selection, sweep.ablation, sweep.widths, sweep.width_layer) == (["ig", "activation"], ["reconstruction"], [1, 8], 9)
    assert stage_configs(ReproduceConfig(out=str(tmp_path)))["sweep"].widths == []
