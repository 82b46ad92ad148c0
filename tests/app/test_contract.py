"""The input contract, one table: bad or careless input -> exit code 2, a one-line message that names it,
nothing written. Each row was a traceback or a silent wrong answer once."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.errors import KscopeError

runner = CliRunner()


def _fill(args, env, tmp):
    return [a.format(**env, tmp=tmp) for a in args]


def _files(d):
    return sorted(p.relative_to(d) for p in d.rglob("*"))


BASE = ["--model", "{model}", "--facts", "{facts}", "--known-top-k", "100", "--min-known-prompts", "1", "--steps", "2"]

CASES = [
    # name, args, message fragment
    ("max-facts 0", ["compare", *BASE, "--max-facts", "0", "--out", "{tmp}/o.json"], "--max-facts must be >= 1"),
    ("max-facts -1", ["compare", *BASE, "--max-facts", "-1", "--out", "{tmp}/o.json"], "--max-facts must be >= 1"),
    ("top-k 0", ["compare", *BASE, "--top-k", "0", "--out", "{tmp}/o.json"], "--top-k must be >= 1"),
    ("ks -1", ["compare", *BASE, "--ks=-1", "--out", "{tmp}/o.json"], "--ks must be >= 1"),
    ("ks twice", ["compare", *BASE, "--ks", "5,5", "--out", "{tmp}/o.json"], "--ks: 5 is given twice"),
    ("min-known 0", ["compare", *BASE, "--min-known-prompts", "0", "--out", "{tmp}/o.json"], "--min-known-prompts must be >= 1"),
    ("layers twice", ["compare", *BASE, "--layers", "1,1", "--out", "{tmp}/o.json"], "layer 1 is given twice"),
    ("layers backwards", ["compare", *BASE, "--layers", "2-0", "--out", "{tmp}/o.json"], "runs backwards; write 0-2"),
    ("unknown layer", ["compare", *BASE, "--layers", "7", "--out", "{tmp}/o.json"], "unknown layer 7"),
    ("steps 0 erase", ["privacy", "erase", "--model-dir", "{tmp}", "--steps", "0"], "--steps must be >= 1"),
    ("faithfulness ks 0", ["faithfulness", *BASE, "--ks", "0", "--out-dir", "{tmp}/out"], "--ks must be >= 1"),
    ("sae k 0", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--k", "0", "--out", "{tmp}/s"], "--k must be >= 1"),
    ("sae expansion 0", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--expansion", "0", "--out", "{tmp}/s"],
     "--expansion must be >= 1"),
    ("sae k too big", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--k", "10000", "--generate", "0", "--text",
                       "{corpus}", "--out", "{tmp}/s"], "exceeds the SAE width"),
    ("sae of another site", ["compare", *BASE, "--layers", "2", "--sae", "{sae}", "--out", "{tmp}/o.json"],
     "was trained on 1/mlp.out, not on 2/mlp.out"),
    ("relation ids on jsonl", ["compare", *BASE, "--relation-ids", "P36", "--out", "{tmp}/o.json"], "no facts of relation(s) P36"),
    ("out is the facts", ["compare", *BASE, "--out", "{facts}"], "is also an input"),
    ("out unwritable", ["compare", *BASE, "--out", "{facts}/sub/o.json"], "is not a writable directory"),
    ("out-dir is a file", ["faithfulness", *BASE, "--out-dir", "{facts}"], "is a file, not a directory"),
    ("device cuda", ["compare", *BASE, "--device", "cuda", "--out", "{tmp}/o.json"], "no CUDA GPU"),
    ("device bogus", ["compare", *BASE, "--device", "bogus", "--out", "{tmp}/o.json"], "unknown --device 'bogus'"),
    ("model missing dir", ["compare", "--model", "/nonexistent/model", "--out", "{tmp}/o.json"], "no such directory"),
    ("build out is a file", ["privacy", "build", "--model", "{model}", "--out", "{facts}"], "is a file"),
    ("build epochs 0", ["privacy", "build", "--model", "{model}", "--out", "{tmp}/pm", "--epochs", "0"], "--epochs must be >= 1"),
    ("erase not a privacy dir", ["privacy", "erase", "--model-dir", "{model}"], "privacy build"),
    ("erase unknown method", ["privacy", "erase", "--model-dir", "{model}", "--method", "lobotomy"], "unknown method 'lobotomy'"),
    ("reproduce unknown stage", ["reproduce", "--stages", "everything", "--out", "{tmp}/r"], "unknown stage 'everything'"),
    ("reproduce bad privacy run", ["reproduce", "--privacy-runs", "mid-s0", "--out", "{tmp}/r"], "privacy run 'mid-s0'"),
    # NaN and infinity: every comparison with NaN is false, so they passed every bound (issue 24)
    ("lr nan", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--lr", "nan", "--out", "{tmp}/s"], "--lr must be a finite number"),
    ("lr inf", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--lr", "inf", "--out", "{tmp}/s"], "--lr must be a finite number"),
    ("aux-coef nan", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--aux-coef", "nan", "--out", "{tmp}/s"],
     "--aux-coef must be a finite number"),
    ("build lr nan", ["privacy", "build", "--model", "{model}", "--out", "{tmp}/pm", "--lr", "nan"], "--lr must be a finite number"),
    ("heldout-frac nan", ["compare", *BASE, "--heldout-frac", "nan", "--out", "{tmp}/o.json"], "--heldout-frac must be a finite number"),
    ("outlier-factor nan", ["compare", *BASE, "--sae-outlier-factor", "nan", "--out", "{tmp}/o.json"],
     "--sae-outlier-factor must be a finite number"),
    ("coarse-threshold nan", ["compare", *BASE, "--coarse-threshold", "nan", "--out", "{tmp}/o.json"],
     "--coarse-threshold must be a finite number"),
    ("refine-frac nan", ["compare", *BASE, "--refine-frac", "nan", "--out", "{tmp}/o.json"], "--refine-frac must be a finite number"),
    ("max-memory nan", ["compare", *BASE, "--max-memory", "nan", "--out", "{tmp}/o.json"], "--max-memory must be a finite number"),
    ("max-memory inf", ["compare", *BASE, "--max-memory", "inf", "--out", "{tmp}/o.json"], "--max-memory must be a finite number"),
    ("gpus-per-worker nan", ["compare", *BASE, "--gpus-per-worker", "nan", "--out", "{tmp}/o.json"],
     "--gpus-per-worker must be a finite number"),
    ("mix-fracs nan", ["monosemanticity", *BASE, "--mix-fracs", "0.5,nan", "--out-dir", "{tmp}/o"], "--mix-fracs must be a finite number"),
    ("tau nan", ["sweep", *BASE, "--tau", "nan", "--out-dir", "{tmp}/o"], "--tau must be a finite number"),
    ("erase tau -inf", ["privacy", "erase", "--model-dir", "{tmp}", "--taus", "-inf"], "--taus must be a finite number"),
    # empty lists: a comma alone named nothing
    ("measures empty", ["sweep", *BASE, "--measures", ",", "--out-dir", "{tmp}/o"], "--measures needs at least one value"),
    ("stages empty", ["reproduce", "--stages", ",", "--out", "{tmp}/r"], "--stages needs at least one value"),
    ("ks empty", ["compare", *BASE, "--ks", ",", "--out", "{tmp}/o.json"], "--ks needs at least one value"),
    ("relation ids empty", ["compare", *BASE, "--relation-ids", ",", "--out", "{tmp}/o.json"], "--relation-ids needs at least one value"),
    # an output never lies inside, or is, an input (compare --out once wrote its JSON over the SAE's weights)
    ("out in the sae", ["compare", *BASE, "--layers", "1", "--sae", "{sae}", "--out", "{sae}/sae_weights.safetensors"], "lies inside the input directory"),
    ("out in the model", ["compare", *BASE, "--out", "{model}/config.json"], "lies inside the input directory"),
    ("locate out in the model", ["locate", *BASE, "--out", "{model}/tokenizer.json"], "lies inside the input directory"),
    ("out is the corpus", ["compare", *BASE, "--text", "{corpus}", "--out", "{corpus}"], "is also an input"),
    ("out-dir in the sae", ["faithfulness", *BASE, "--layer", "1", "--sae", "{sae}", "--out-dir", "{sae}/o"], "lies inside the input"),
    ("sweep out-dir in the model", ["sweep", *BASE, "--out-dir", "{model}/sweep"], "lies inside the input directory"),
    ("train-sae out in the model", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--out", "{model}/sae"],
     "lies inside the input directory"),
    ("build out in the model", ["privacy", "build", "--model", "{model}", "--out", "{model}/pm"], "lies inside the input directory"),
    ("erase out in the model dir", ["privacy", "erase", "--model-dir", "{model}", "--out", "{model}/e.json"],
     "lies inside the input directory"),
    ("reproduce out is the model", ["reproduce", "--model", "{model}", "--out", "{model}"], "is also an input"),
    ("reproduce out in the model", ["reproduce", "--model", "{model}", "--out", "{model}/report"], "lies inside the input directory"),
    ("single fact that asks nothing", ["locate", "--model", "{model}", "--subject", "france", "--object", "paris", "--prompt",
                                       "the capital of france is paris", "--layers", "1", "--out", "{tmp}/o.json"], "cannot be studied"),
    ("llm url unreachable", ["interpret", *BASE, "--layer", "1", "--sae", "{sae}", "--llm-url", "http://127.0.0.1:9/v1", "--out-dir",
                             "{tmp}/o"], "--llm-url http://127.0.0.1:9/v1: nothing answers at 127.0.0.1:9"),
    ("llm url malformed", ["interpret", *BASE, "--layer", "1", "--sae", "{sae}", "--llm-url", "localhost:8000", "--out-dir", "{tmp}/o"],
     "--llm-url 'localhost:8000' is not an http(s) URL"),
    ("explore with another model", ["explore", "--run-dir", "{run}", "--model", "{sae}"], "was made with"),
    ("explore a run with no compare.json", ["explore", "--run-dir", "{tmp}"], "holds no compare.json"),
    ("device mps without it", ["compare", *BASE, "--device", "mps", "--out", "{tmp}/o.json"], "no MPS device"),
    ("sae release unknown", ["sweep", *BASE, "--sae-release", "no-such-release", "--out-dir", "{tmp}/o"],
     "is not a SAELens pretrained release"),
    ("sae release offline", ["sweep", *BASE, "--sae-release", "gemma-scope-2b-pt-res-canonical", "--out-dir", "{tmp}/o"],
     "not in the Hugging Face cache, and the hub is unreachable"),
    ("reproduce refused by a stage", ["reproduce", "--model", "{model}", "--layer", "7", "--stages", "compare", "--out", "{tmp}/r"],
     "unknown layer 7"),
    # values that can only be a mistake
    ("steps 1e20", ["compare", *BASE, "--steps", "100000000000000000000", "--out", "{tmp}/o.json"], "--steps must be <= 1000"),
    ("epochs 1e11", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--epochs", "100000000000", "--out", "{tmp}/s"],
     "--epochs must be <= 1000"),
    ("build epochs 1e11", ["privacy", "build", "--model", "{model}", "--out", "{tmp}/pm", "--epochs", "100000000000"],
     "--epochs must be <= 1000"),
    ("generate 1e15", ["compare", *BASE, "--generate", "1000000000000000", "--out", "{tmp}/o.json"], "--generate must be <= 1000000"),
    ("expansion 1e15", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--expansion", "1000000000000000", "--out",
                        "{tmp}/s"], "--expansion must be <= 1024"),
    ("sae tokens 1e15", ["compare", *BASE, "--sae-tokens", "1000000000000000", "--out", "{tmp}/o.json"],
     "--sae-max-tokens must be <= 1000000000"),
    ("random draws 1e15", ["compare", *BASE, "--random-draws", "1000000000000000", "--out", "{tmp}/o.json"],
     "--random-draws must be <= 100"),
    ("erase random draws 1e15", ["privacy", "erase", "--model-dir", "{tmp}", "--random-draws", "1000000000000000"],
     "--random-draws must be <= 100"),
    ("gen-len 1e15", ["compare", *BASE, "--gen-len", "1000000000000000", "--out", "{tmp}/o.json"], "--gen-len must be <= 100000"),
    # one error format: the CLI library's own refusals are one line too (issue 39)
    ("steps abc", ["compare", *BASE, "--steps", "abc", "--out", "{tmp}/o.json"], "--steps: expected an integer, got 'abc'"),
    ("seed 1.5", ["compare", *BASE, "--seed", "1.5", "--out", "{tmp}/o.json"], "--seed: expected an integer, got '1.5'"),
    ("lr abc", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--lr", "abc", "--out", "{tmp}/s"],
     "--lr: expected a number, got 'abc'"),
    ("ks 1,x", ["compare", *BASE, "--ks", "1,x", "--out", "{tmp}/o.json"], "--ks: expected an integer, got 'x'"),
    ("unknown option", ["compare", *BASE, "--bogus", "1"], "No such option: --bogus"),
    ("missing option", ["privacy", "erase"], "Missing option '--model-dir'"),
    ("flag given a value", ["compare", *BASE, "--holdout=3"], "Option '--holdout' does not take a value"),
    # silent once: now refused
    ("gpus without workers", ["compare", *BASE, "--gpus-per-worker", "1", "--out", "{tmp}/o.json"],
     "--gpus-per-worker 1 needs --workers or --ray-address"),
    ("prompt empty", ["locate", "--model", "{model}", "--subject", "france", "--object", "paris", "--prompt", ",", "--out",
                      "{tmp}/o.json"], "--prompt needs at least one value"),
    ("a fact left out by the held-out split", ["compare", "--model", "{model}", "--facts", "{long_fact}", "--known-top-k", "100",
                                               "--min-known-prompts", "1", "--layers", "1", "--out", "{tmp}/o.json"],
     "1 known on one side of the held-out split only"),
    # weights are checked at load: NaN scored every unit as null and exited 0
    ("nan sae compare", ["compare", *BASE, "--layers", "1", "--sae", "{nan_sae}", "--out", "{tmp}/o.json"],
     "nan_sae/sae_weights.safetensors: tensor W_dec holds 2048 of 2048 values that are NaN"),
    ("nan sae faithfulness", ["faithfulness", *BASE, "--layer", "1", "--sae", "{nan_sae}", "--out-dir", "{tmp}/o"],
     "tensor W_dec holds 2048 of 2048 values that are NaN"),
    ("nan sae interpret", ["interpret", *BASE, "--layer", "1", "--sae", "{nan_sae}", "--out-dir", "{tmp}/o"],
     "tensor W_dec holds 2048 of 2048 values that are NaN"),
    ("nan sae monosemanticity", ["monosemanticity", *BASE, "--layer", "1", "--sae", "{nan_sae}", "--out-dir", "{tmp}/o"],
     "tensor W_dec holds 2048 of 2048 values that are NaN"),
    ("nan model", ["compare", "--model", "{nan_model}", "--facts", "{facts}", "--out", "{tmp}/o.json"],
     "nan_model/model.safetensors: tensor lm_head.weight holds"),
    ("model lacking a tensor", ["compare", "--model", "{holed_model}", "--facts", "{facts}", "--out", "{tmp}/o.json"],
     "holed_model/model.safetensors: the checkpoint lacks the tensor lm_head.weight"),
    # servers are probed for what they are: a web page answering 404 passed once
    ("llm url answers 404", ["interpret", *BASE, "--layer", "1", "--sae", "{sae}", "--llm-url", "{web}", "--out-dir", "{tmp}/o"],
     "the server there is not an OpenAI-style API (GET /models: HTTP 404"),
    ("llm url bad ipv6", ["interpret", *BASE, "--layer", "1", "--sae", "{sae}", "--llm-url", "http://[::1/v1", "--out-dir", "{tmp}/o"],
     "--llm-url 'http://[::1/v1' is not an http(s) URL"),
    # every file a command writes is checked against the inputs, the side outputs too (issue 39)
    ("out is the config", ["compare", *BASE, "--config", "{root}/c.yaml", "--out", "{root}/c.yaml"], "is also an input"),
    ("resolved config over the config", ["compare", *BASE, "--config", "{root}/o.config.yaml", "--out", "{root}/o.json"],
     "o.config.yaml would overwrite the input"),
    ("out-dir config over the config", ["faithfulness", *BASE, "--config", "{root}/faithfulness.config.yaml", "--out-dir", "{root}"],
     "faithfulness.config.yaml would overwrite the input"),
    ("erase figure over its text", ["privacy", "erase", "--model-dir", "{tmp}", "--text", "{root}/e.png", "--out", "{root}/e.json"],
     "e.png would overwrite the input"),
    ("resolved config is a symlink to the config", ["compare", *BASE, "--config", "{root}/c.yaml", "--out", "{root}/sl.json"],
     "sl.config.yaml would overwrite the input {root}/c.yaml (" + "{root}/sl.config.yaml is a link to it)"),
    ("resolved config is a hard link of the config", ["compare", *BASE, "--config", "{root}/c.yaml", "--out", "{root}/hl.json"],
     "hl.config.yaml would overwrite the input {root}/c.yaml (" + "{root}/hl.config.yaml is a link to it)"),
    ("journal is a symlink to the facts", ["compare", *BASE, "--out", "{root}/sj.json"],
     ".sj.json.journal.jsonl would overwrite the input"),
    ("out inside an input directory", ["compare", *BASE, "--layers", "1", "--sae", "{sae}", "--out", "{sae}/o.json"],
     "lies inside the input directory"),
    ("out inside an input directory through a link", ["compare", *BASE, "--layers", "1", "--sae", "{sae}", "--out",
                                                       "{root}/in_sae/o.json"], "lies inside the input directory"),
    ("sae directory holding an input, through a link", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--generate",
                                                         "0", "--text", "{sae}/cfg.json", "--out", "{root}/in_sae"],
     "writing {root}/in_sae would overwrite the input {sae}/cfg.json"),
    ("journal over the facts", ["compare", "--model", "{model}", "--facts", "{root}/.o.json.journal.jsonl", "--out", "{root}/o.json"],
     ".o.json.journal.jsonl would overwrite the input"),
    ("out name too long", ["compare", *BASE, "--out", "{tmp}/" + "a" * 300 + ".json"], "is too long"),
    # a lock per output: two runs on one --out both exited 0, the last writer winning
    ("out held by another run", ["compare", *BASE, "--out", "{root}/held.json"], "is being written by another kscope run (pid"),
]


@pytest.mark.parametrize("name,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, tmp_path, name, args, fragment):
    before = _files(env["root"])
    r = runner.invoke(app, _fill(args, env, tmp_path), env={"KSCOPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment.format(**env, tmp=tmp_path) in lines[0], r.output
    assert [p for p in _files(tmp_path) if p.parts[0] != "cache"] == []
    assert _files(env["root"]) == before


def test_an_output_directory_may_hold_inputs_but_not_overwrite_them(env, tmp_path):
    """A run directory holds the results its later stages read; a file the command writes there may not be an input."""
    import shutil

    facts = tmp_path / "faithfulness.json"  # a fact file that faithfulness --out-dir would write over
    shutil.copy(env["facts"], facts)
    r = runner.invoke(app, ["faithfulness", *_fill(BASE, env, tmp_path)[:2], "--facts", str(facts), "--out-dir", str(tmp_path)])
    assert r.exit_code == 2 and f"writing {facts} would overwrite the input" in r.output, r.output
    from kscope.app.reproduce import ReproduceConfig

    ReproduceConfig(facts=env["facts"], out=str(env["root"])).validate()  # the facts beside the report: fine
    with pytest.raises(KscopeError, match="would overwrite the input"):
        ReproduceConfig(facts=str(facts), out=str(tmp_path), stages=["faithfulness"]).validate()


def test_explore_uses_the_runs_model_corpus_and_saes(env, tmp_path, monkeypatch):
    """explore once sampled 3,072 x 128 tokens from the model whatever corpus the run had (356 s on a tiny model)."""
    import shutil

    import kscope.app.explorer as explorer

    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    used = []
    real = explorer.build_corpus
    monkeypatch.setattr(explorer, "build_corpus", lambda lm, cfg, *a: used.append((lm.name, cfg)) or real(lm, cfg, *a))
    r = runner.invoke(app, ["explore", "--run-dir", str(run), "--contexts", "2"])
    assert r.exit_code == 0, r.output
    (name, corpus), = used
    assert name == env["model"] and corpus.generate == 0 and corpus.text_files == [env["corpus"]]
    assert (run / "explorer" / "index.html").exists() and list((run / "explorer" / "units").glob("L1-feature-*.html"))


def _corrupt(env, tmp_path, how):
    import shutil

    d = tmp_path / "bad_sae"
    shutil.copytree(env["sae"], d)
    if how == "truncated":
        w = d / "sae_weights.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    elif how == "missing":
        (d / "sae_weights.safetensors").unlink()
    elif how == "cfg":
        (d / "cfg.json").write_text("{not json")
    elif how == "meta":
        (d / "kscope.json").write_text("{not json")
    elif how == "d_in":
        cfg = json.loads((d / "cfg.json").read_text())
        cfg["metadata"]["hook_name"] = "blocks.1.mlp.hook_post"  # 64 wide, the SAE reads 32
        (d / "cfg.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("how,fragment", [("truncated", "cannot load SAE"), ("missing", "has no weights"),
                                          ("cfg", "cannot load SAE"), ("d_in", "does not match"), ("meta", "kscope.json: Expecting")])
def test_corrupt_sae(env, tmp_path, how, fragment):
    d = _corrupt(env, tmp_path, how)
    r = runner.invoke(app, ["compare", *_fill(BASE, env, tmp_path), "--layers", "1", "--sae", str(d), "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2 and fragment in r.output, r.output
    assert not (tmp_path / "o.json").exists()


def test_faithfulness_takes_no_located_units(env, tmp_path):
    """faithfulness ranks every decomposition's units itself: --located was accepted and ignored."""
    from kscope.analyses.faithfulness import FaithfulnessJob

    r = runner.invoke(app, ["faithfulness", *_fill(BASE, env, tmp_path), "--located", str(env["run"]) + "/compare.json",
                            "--out-dir", str(tmp_path / "o")])
    assert r.exit_code == 2 and "No such option: --located" in r.output, r.output
    with pytest.raises(KscopeError, match="reads no located units"):
        FaithfulnessJob(located=str(env["run"]) + "/compare.json").validate()
    assert not (tmp_path / "o").exists()


def test_corrupt_manifest_and_located_file(env, tmp_path):
    import shutil

    pm = tmp_path / "pm"
    shutil.copytree(env["model"], pm)
    (pm / "kscope_privacy.json").write_text('{"schema": "kscope.privacy-model/1", "facts": ')
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(pm), "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 2 and "cannot read" in r.output, r.output
    (pm / "kscope_privacy.json").write_text('{"schema": "kscope.privacy-model/1", "facts": []}')
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(pm), "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 2 and "not a valid kscope privacy-model" in r.output, r.output
    bad = tmp_path / "located.json"
    bad.write_text('{"schema": "kscope.faithfulness/1"}')
    r = runner.invoke(app, ["monosemanticity", *_fill(BASE, env, tmp_path), "--layer", "1", "--sae", env["sae"], "--located", str(bad),
                            "--out-dir", str(tmp_path / "o")])
    assert r.exit_code == 2 and "expected a kscope compare result" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_fact_file_problems_name_the_line(env, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"subject": "x", "relation": "r", "object": "paris", "prompts": ["a"]}\n{"subject": "caf\xe9"}\n')
    r = runner.invoke(app, ["compare", "--model", env["model"], "--facts", str(bad), "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2 and f"{bad}:2: not UTF-8" in r.output
    s = tmp_path / "held.jsonl"
    s.write_text('{"subject": "x", "relation": "r", "object": "paris", "prompts": ["a"], "heldout_prompts": "the capital"}\n')
    r = runner.invoke(app, ["compare", "--model", env["model"], "--facts", str(s), "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2 and "'heldout_prompts' must be a list of strings" in r.output


def _row(subject, obj, prompts, relation="capital", uid=None):
    return {"subject": subject, "relation": relation, "object": obj, "prompts": prompts} | ({"uid": uid} if uid else {})


FRANCE = _row("france", "paris", ["the capital of france is", "france 's capital city is"])
FACT_CASES = [
    # name, fact rows, note fragment, (subject, object, prompts) of the facts studied. Policy: a fact or prompt that cannot
    # be studied is left out with a note naming it; the run goes on with the others.
    ("repeated fact", [FRANCE, FRANCE], "1 repeated facts are left out: france -> paris (capital)", [("france", "paris", 2)]),
    ("repeated uid", [_row("france", "paris", ["the capital of france is"], uid="a"),
                      _row("germany", "berlin", ["the capital of germany is"], uid="a")], "repeated facts are left out: germany",
     [("france", "paris", 1)]),
    ("two objects, one subject", [FRANCE, _row("france", "rome", ["the capital of france is"])], None,
     [("france", "paris", 2), ("france", "rome", 1)]),
    ("unknown object token", [FRANCE, _row("spain", "zzzunknown", ["the capital of spain is"])],
     "facts whose object holds the unknown token '<unk>' are left out: spain -> zzzunknown", [("france", "paris", 2)]),
    ("prompt ends with its object", [_row("france", "paris", ["the capital of france is paris .", "the capital of france is"]),
                                     _row("spain", "madrid", ["spain 's capital city is madrid"])],
     "2 prompts that already end with their object are left out", [("france", "paris", 1)]),
    ("prompt beyond the context", [_row("france", "paris", ["the capital of france is", "the " * 70 + "capital of france is"])],
     "do not fit the model's context of 64 tokens", [("france", "paris", 1)]),
]


@pytest.mark.parametrize("name,rows,fragment,studied", FACT_CASES, ids=[c[0] for c in FACT_CASES])
def test_facts_that_cannot_be_studied_are_left_out_with_a_note(env, tmp_path, name, rows, fragment, studied):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.json"
    r = runner.invoke(app, ["locate", "--model", env["model"], "--facts", str(path), "--known-top-k", "100", "--min-known-prompts", "1",
                            "--steps", "2", "--layers", "1", "--no-features", "--out", str(out)])
    assert r.exit_code == 0, r.output
    notes = " ".join(r.output.split())
    assert fragment is None and "left out" not in notes or fragment in notes, r.output
    res = json.loads(out.read_text())
    assert sorted((f["subject"], f["object"], len(f["prompts"])) for f in res["facts"]) == studied
    assert len({f["uid"] for f in res["facts"]}) == len(res["facts"])


def test_fewer_known_facts_than_asked_is_said(env, tmp_path):
    r = runner.invoke(app, ["locate", *_fill(BASE, env, tmp_path), "--max-facts", "5", "--layers", "1", "--no-features",
                            "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 0, r.output
    assert "2 facts studied, not 5 (--max-facts): the source has 2 and all of them are known" in " ".join(r.output.split())


def test_errors_are_one_unwrapped_line(env, tmp_path):
    long = tmp_path / ("a-very-long-directory-name-" * 6) / "facts.jsonl"
    r = runner.invoke(app, ["compare", "--model", env["model"], "--facts", str(long), "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2
    assert f"fact source {long} does not exist" in r.output.splitlines()[-1]


def test_hub_id_offline_fails_fast_and_clearly(tmp_path):
    import time

    t = time.time()
    r = runner.invoke(app, ["compare", "--model", "someorg/some-model", "--out", str(tmp_path / "o.json")],
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.exit_code == 2 and "the hub is unreachable" in r.output
    assert time.time() - t < 20


def test_results_honour_the_umask(tmp_path):
    from kscope.io import atomic_dir, write_json
    from kscope.plots import pyplot, save_figure

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        fig, _ = pyplot().subplots()
        save_figure(fig, tmp_path / "f.png")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
            os.close(os.open(d / "weights", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors and save_pretrained write
            (d / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "f.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "weights").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d" / "sub").stat().st_mode) == 0o755


def test_a_trained_sae_honours_the_umask(env):
    """SAELens wrote sae_weights.safetensors 0600 whatever the umask."""
    mask = os.umask(0)
    os.umask(mask)
    for path in (Path(env["sae"]) / "sae_weights.safetensors", Path(env["sae"]) / "cfg.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_stale_temp_dirs_of_killed_writers_are_removed(tmp_path):
    from kscope.io import atomic_dir

    dead = tmp_path / ".model-999999999-abc"
    dead.mkdir()
    alive = tmp_path / f".model-{os.getpid()}-def"
    alive.mkdir()
    with atomic_dir(tmp_path / "model") as d:
        (d / "w").write_text("w")
    assert not dead.exists() and alive.exists() and (tmp_path / "model" / "w").exists()


def test_truncated_model_directory_is_a_clear_error(env, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(env["model"], d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    r = runner.invoke(app, ["compare", "--model", str(d), "--facts", env["facts"], "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2 and "cannot load model" in r.output, r.output


def test_ks_beyond_top_k_are_measured_not_capped(env, tmp_path):
    out = tmp_path / "c.json"
    r = runner.invoke(app, ["compare", *_fill(BASE, env, tmp_path), "--layers", "1", "--top-k", "1", "--ks", "1,12,40",
                            "--sae", env["sae"], "--baselines", "", "--out", str(out)])  # baselines: 32 directions, fewer than 40
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    entry = res["facts"][0]["layers"]["1"]["neuron"]
    dp = entry["effects"]["top"]["suppress"]
    assert len(entry["top"]) == 1 and set(res["summary"]["1"]) == {"neuron", "feature"}
    assert len({round(dp[k]["log"], 12) for k in ("1", "12", "40")}) == 3  # three different ablations of dense neurons, none capped


def test_python_api_refuses_what_the_cli_refuses():
    from kscope.locate.attribution import AttributionConfig
    from kscope.locate.delta_prob import DeltaProbConfig
    from kscope.units.training import TrainSAEConfig

    with pytest.raises(KscopeError, match="--coarse-threshold must be a finite number, got nan"):
        AttributionConfig(coarse_threshold=float("nan"))
    with pytest.raises(KscopeError, match="--lr must be a finite number, got inf"):
        TrainSAEConfig(lr=float("inf"))
    with pytest.raises(KscopeError, match="--ks needs at least one value"):
        DeltaProbConfig(ks=[])
    with pytest.raises(KscopeError, match="--steps must be <= 1000"):
        AttributionConfig(steps=10**20)


def test_llm_explainer_failure_mid_run_is_one_error():
    from kscope.analyses.autointerp import LLMExplainer

    with pytest.raises(KscopeError, match="the LLM explainer at http://127.0.0.1:9/v1/chat/completions failed"):
        LLMExplainer("http://127.0.0.1:9/v1", "m", timeout=3).explain([["a"]], [[1.0]])

