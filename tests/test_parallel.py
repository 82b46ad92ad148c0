"""Fact-parallel execution: Ray workers give the single-process numbers, a killed run resumes to the same
result, a dead worker is replaced, a fact that fails twice is reported and the job finishes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.facts import Fact, write_fact_file
from kscope.parallel import FactTask, ParallelConfig, journal_path, map_facts
from tests.helpers import save_tiny_model

runner = CliRunner()
FACTS = [Fact("france", "capital", "paris", ["the capital of france is", "france 's capital city is"]),
         Fact("germany", "capital", "berlin", ["the capital of germany is", "germany 's capital city is"]),
         Fact("spain", "language", "spanish", ["people in spain speak", "the official language of spain is"]),
         Fact("italy", "capital", "rome", ["the capital of italy is", "italy 's capital city is"])]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("par")
    save_tiny_model(root / "model")
    write_fact_file(FACTS, root / "facts.jsonl")
    return root


def _compare(root, out, *extra, env=None):
    args = ["compare", "--model", str(root / "model"), "--facts", str(root / "facts.jsonl"), "--known-top-k", "100",
            "--min-known-prompts", "1", "--steps", "3", "--layers", "0,2", "--ks", "1,2", "--no-features" if False else "--top-k", "5",
            "--out", str(out), *extra]
    return args


def test_driver_killed_part_way_resumes_to_the_uninterrupted_result(files, tmp_path):
    """A run whose driver dies after 2 facts leaves a journal; --resume runs only the other facts, and the
    result equals one uninterrupted run (same process setup: one torch thread)."""
    env = {**os.environ, "KSCOPE_QUIET": "1", "OMP_NUM_THREADS": "1", "KSCOPE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-c", "import torch; torch.set_num_threads(1); from kscope.app.cli import main; main()"]
    whole, part = tmp_path / "whole.json", tmp_path / "part.json"
    extra = ["--generate", "24", "--gen-len", "16", "--sae-max-tokens", "300", "--sae-expansion", "2", "--sae-k", "32"]
    r = subprocess.run(cmd + _compare(files, whole, *extra)[0:], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(cmd + _compare(files, part, *extra), env={**env, "KSCOPE_TEST_DIE_AFTER": "2"}, capture_output=True, text=True)
    assert r.returncode == 17 and not part.exists()
    lines = journal_path(part).read_text().splitlines()
    assert len(lines) == 3  # the options' fingerprint and two facts
    r = subprocess.run(cmd + _compare(files, part, *extra, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = json.loads(whole.read_text()), json.loads(part.read_text())
    assert b["resumed"] == 2 and a["facts"] == b["facts"] and a["summary"] == b["summary"]
    assert not journal_path(part).exists()
    r = subprocess.run(cmd + _compare(files, part, *extra[:-1], "3", "--resume"), env={**env, "KSCOPE_TEST_DIE_AFTER": "1"},
                       capture_output=True, text=True)
    assert r.returncode == 17
    r = subprocess.run(cmd + _compare(files, part, *extra, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "was written with other options" in r.stderr


def test_refusals_before_any_model_work(files, tmp_path):
    r = runner.invoke(app, _compare(files, tmp_path / "o.json", "--workers", "0"))
    assert r.exit_code == 2 and "--workers must be >= 1" in r.output
    r = runner.invoke(app, _compare(files, tmp_path / "o.json", "--ray-address", "127.0.0.1:1"))
    have_ray = importlib.util.find_spec("ray") is not None
    no_ray = "need Ray: pip install 'kscope[ray]'"  # the README's install has no Ray: every Ray option says so first
    assert r.exit_code == 2 and ("no Ray cluster answers there" if have_ray else no_ray) in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(app, _compare(files, tmp_path / "o.json", "--workers", "2", "--gpus-per-worker", "1"))
        assert r.exit_code == 2 and ("needs 2 GPUs" if have_ray else no_ray) in r.output
    assert not (tmp_path / "o.json").exists()


# --- on Ray (one local cluster for the tests below) -----------------------------------------------------------------

def _setup(tag):
    return tag


def _run(ctx, item):
    """Dies (the whole worker process) the first time it meets 'die' while a marker file is absent; 'bad' always raises."""
    marker = Path(os.environ["KSCOPE_TEST_MARKER"])
    if item == "die" and not marker.exists():
        marker.write_text("died once")
        os._exit(1)
    if item == "bad":
        raise ValueError("this fact always fails")
    return {"item": item, "ctx": ctx, "square": len(item) ** 2}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("m") / "marker"
    os.environ["KSCOPE_TEST_MARKER"] = str(marker)  # inherited by the workers the cluster starts
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


def test_dead_worker_is_replaced_and_a_failing_fact_is_reported(ray_cluster, tmp_path):
    items = ["a", "die", "bad", "dd", "eee"]
    out = map_facts(FactTask(_setup, _run, ("x",)), items, items, ParallelConfig(workers=2), tmp_path / "r.json", {"t": 1})
    assert [r["item"] if r else None for r in out.rows] == ["a", "die", None, "dd", "eee"]
    assert out.failed == [{"key": "bad", "error": "ValueError: this fact always fails"}]
    assert sum(w["facts"] for w in out.per_worker.values()) == 4
    assert journal_path(tmp_path / "r.json").exists()  # kept while a fact failed, so a --resume can retry it


def test_two_workers_give_the_single_process_result(ray_cluster, files, tmp_path):
    extra = ["--generate", "24", "--gen-len", "16", "--sae-max-tokens", "300", "--sae-expansion", "2", "--sae-k", "32", "--threads-per-worker", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = runner.invoke(app, _compare(files, tmp_path / "one.json", *extra))
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, _compare(files, tmp_path / "two.json", *extra, "--workers", "2"))
        assert r.exit_code == 0, r.output
    finally:
        torch.set_num_threads(threads)
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert a["facts"] == b["facts"] and a["summary"] == b["summary"]
    assert sum(w["facts"] for w in b["workers"].values()) == 4 and len(b["workers"]) == 2
