"""The input contract, one table: bad or careless input -> exit code 2, a one-line message that names it,
nothing written. Each row was a traceback or a silent wrong answer once."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.facts import write_fact_file
from tests.helpers import capital_facts, save_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, a fact file, an SAE on 1/mlp.out, a privacy model and a located file."""
    root = tmp_path_factory.mktemp("contract")
    model = root / "model"
    save_tiny_model(model)
    facts = root / "facts.jsonl"
    write_fact_file(capital_facts()[:2], facts)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(["the capital of france is paris", "people in spain speak spanish", "new york is a city",
                                   "history and science today"] * 10))
    sae = root / "sae"
    r = runner.invoke(app, ["train-sae", "--model", str(model), "--site", "1/mlp.out", "--out", str(sae), "--expansion", "2",
                            "--k", "4", "--max-tokens", "300", "--generate", "0", "--text", str(corpus), "--epochs", "1"])
    assert r.exit_code == 0, r.output
    return {"root": root, "model": str(model), "facts": str(facts), "sae": str(sae), "corpus": str(corpus)}


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
]


@pytest.mark.parametrize("name,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, tmp_path, name, args, fragment):
    before = _files(env["root"])
    r = runner.invoke(app, _fill(args, env, tmp_path), env={"KSCOPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], r.output
    assert _files(tmp_path) in ([], [tmp_path / "cache"]) or not any(p.suffix == ".json" for p in tmp_path.rglob("*"))
    assert _files(env["root"]) == before


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
    elif how == "d_in":
        cfg = json.loads((d / "cfg.json").read_text())
        cfg["metadata"]["hook_name"] = "blocks.1.mlp.hook_post"  # 64 wide, the SAE reads 32
        (d / "cfg.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("how,fragment", [("truncated", "cannot load SAE"), ("missing", "has no weights"),
                                          ("cfg", "cannot load SAE"), ("d_in", "does not match")])
def test_corrupt_sae(env, tmp_path, how, fragment):
    d = _corrupt(env, tmp_path, how)
    r = runner.invoke(app, ["compare", *_fill(BASE, env, tmp_path), "--layers", "1", "--sae", str(d), "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2 and fragment in r.output, r.output
    assert not (tmp_path / "o.json").exists()


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
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "f.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


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
