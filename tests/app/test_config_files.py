"""Config files: every command takes --config FILE (YAML or TOML; flags override it) and saves the options it ran with
beside its result; a saved file reruns the same configuration."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml
from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.app.options import config_from_file
from kscope.app.reproduce import fingerprint, stage_configs
from kscope.facts import write_fact_file
from kscope.locate.compare import CompareConfig
from tests.helpers import capital_facts, save_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    model = save_tiny_model(root / "model")
    facts = root / "facts.jsonl"
    write_fact_file(capital_facts(), facts)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(["the capital of france is paris", "people in spain speak spanish", "new york is a city",
                                   "history and science today"] * 10))
    return {"model": str(model), "facts": str(facts), "corpus": str(corpus)}


def test_compare_flags_saved_config_rerun_same_fingerprint(inputs, tmp_path):
    first = tmp_path / "first.json"
    r = runner.invoke(app, ["compare", "--model", inputs["model"], "--facts", inputs["facts"], "--known-top-k", "100",
                            "--min-known-prompts", "1", "--steps", "2", "--layers", "1", "--ks", "1,2", "--sae-expansion", "2",
                            "--sae-k", "4", "--sae-tokens", "300", "--generate", "0", "--text", inputs["corpus"], "--out", str(first)])
    assert r.exit_code == 0, r.output
    saved = tmp_path / "first.config.yaml"
    assert yaml.safe_load(saved.read_text())["sae-k"] == 4
    second = tmp_path / "second.json"
    r = runner.invoke(app, ["compare", "--config", str(saved), "--out", str(second)])  # a flag overrides the file
    assert r.exit_code == 0, r.output
    a, b = config_from_file(CompareConfig, str(saved)), config_from_file(CompareConfig, str(tmp_path / "second.config.yaml"))
    assert (a.out, b.out) == (str(first), str(second))
    assert fingerprint(a) == fingerprint(replace(b, out=a.out))
    one, two = (json.loads(p.read_text()) for p in (first, second))
    assert {**one["config"], "out": None} == {**two["config"], "out": None}
    assert one["summary"] == two["summary"]  # the same study, the same numbers


def _parsed_reproduce(monkeypatch, args):
    import kscope.app.reproduce as reproduce

    seen = []
    monkeypatch.setattr(reproduce, "run_reproduce", seen.append)
    r = runner.invoke(app, ["reproduce", *args])
    assert r.exit_code == 0, r.output
    return seen[0]


def test_reproduce_reruns_from_its_config_file_alone(monkeypatch, tmp_path):
    out = tmp_path / "report"
    flags = _parsed_reproduce(monkeypatch, ["--layer", "9", "--max-facts", "7", "--sweep-layers", "0-27:9", "--sweep-widths", "1,8",
                                            "--privacy-runs", "early-s0,full-s1", "--sae-k", "64", "--no-holdout", "--out", str(out)])
    saved = out / "reproduce.config.yaml"
    again = _parsed_reproduce(monkeypatch, ["--config", str(saved)])
    assert fingerprint(again) == fingerprint(flags)
    assert {u: fingerprint(c) for u, c in stage_configs(again).items()} == {u: fingerprint(c) for u, c in stage_configs(flags).items()}
    assert (again.layer, again.sweep_layers, again.sae_train.k, again.holdout) == (9, [0, 9, 18, 27], 64, False)
    assert _parsed_reproduce(monkeypatch, ["--config", str(saved), "--max-facts", "3"]).max_facts == 3


def test_toml_and_yaml_values_read_as_on_the_command_line(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('layers = "10-12"\nks = [1, 2]\nsae-k = 64\nmax_memory = 512\nholdout = false\nrelation-ids = "P36,P103"\n')
    cfg = config_from_file(CompareConfig, str(toml))
    assert (cfg.layers, cfg.delta_prob.ks, cfg.sae_train.k, cfg.attribution.max_memory, cfg.holdout, cfg.facts.relations) == \
        ([10, 11, 12], [1, 2], 64, 512.0, False, ["P36", "P103"])


@pytest.mark.parametrize("text,suffix,fragment", [
    ("sae-k: 64\nbogus-option: 1\n", ".yaml", "unknown option 'bogus-option'"),
    ("sae-kk: 64\n", ".yaml", "unknown option 'sae-kk'; did you mean 'sae-k'?"),
    ("max-facts: 2.5\n", ".yaml", "max-facts: expected an integer, got '2.5'"),
    ("holdout: 1\n", ".yaml", "holdout: expected true or false, got 1"),
    ("coarse-threshold: .nan\n", ".yaml", "--coarse-threshold must be a finite number"),
    ("- a list\n", ".yaml", "expected a mapping of option names to values"),
    ("layers: [1\n", ".yaml", "cannot read it"),
    ("layers = [1\n", ".toml", "cannot read it"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, suffix, fragment):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    r = runner.invoke(app, ["compare", "--config", str(path), "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_the_committed_privacy_study_config_is_large_enough_to_decide():
    """configs/privacy-study.yaml: >= 40 people with >= 20 erased per model, 3 injection seeds, >= 5 draws per random control."""
    from pathlib import Path

    from kscope.app.options import config_from_file
    from kscope.app.reproduce import ReproduceConfig
    from kscope.privacy.data.splits import split_people

    cfg = config_from_file(ReproduceConfig, str(Path(__file__).resolve().parents[2] / "configs" / "privacy-study.yaml"))
    split = split_people([f"p{i}" for i in range(cfg.privacy.n_people)], cfg.privacy.forget, 0)
    assert cfg.privacy.n_people >= 40 and len(split.forget) >= 20 and len(cfg.privacy_seeds) >= 3
    assert cfg.erase.random_draws >= 5 and cfg.stages == ["privacy-build", "privacy-erase"] and cfg.privacy.retain_twin


def test_the_committed_pararel_sweep_config_asks_for_enough_facts_under_the_new_rules():
    """configs/pararel-sweep.yaml: the sweep alone on ParaRel, >= 200 known facts asked for, held out, one edit rule."""
    from pathlib import Path

    from kscope.app.options import config_from_file
    from kscope.app.reproduce import ReproduceConfig

    cfg = config_from_file(ReproduceConfig, str(Path(__file__).resolve().parents[2] / "configs" / "pararel-sweep.yaml"))
    assert cfg.stages == ["sweep"] and cfg.max_facts >= 200 and cfg.facts.endswith("pararel") and cfg.holdout
    assert cfg.edits.ablate_to == "mean" and len(cfg.sweep_layers) >= 10


def test_the_committed_deep_erasure_config_spans_the_depth_and_traces_whole_blocks():
    """configs/deep-erasure.yaml: the privacy stages with the whole-block trace and a keyed band over most of the depth."""
    from pathlib import Path

    from kscope.app.options import config_from_file
    from kscope.app.reproduce import ReproduceConfig

    cfg = config_from_file(ReproduceConfig, str(Path(__file__).resolve().parents[2] / "configs" / "deep-erasure.yaml"))
    assert cfg.stages == ["privacy-build", "privacy-erase"] and cfg.erase.trace_blocks and cfg.privacy.retain_twin
    assert cfg.erase.layers == [6, 12, 18, 24, 28] and cfg.erase.random_draws >= 3
    assert {"keyed-features", "keyed-neurons-params"} <= set(cfg.erase.methods) and "keyed-random-directions" in cfg.erase.controls
