"""The contract tests' inputs: a tiny model, facts, an SAE, a run, and broken or careless variants of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.facts import write_fact_file
from tests.helpers import capital_facts, save_tiny_model

runner = CliRunner()


class _NotFound(BaseHTTPRequestHandler):
    """A web server that is not an LLM API: every path is a 404 page."""

    def _404(self):
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>not found</html>")

    do_GET = do_POST = _404

    def log_message(self, *args):  # quiet
        pass


_HOLD = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"%d\\n" % os.getpid())
print("held", flush=True)
time.sleep(3600)
"""  # holds an output's lock as a kscope run does (kscope.outputs.output_lock), without loading kscope


def _broken_copy(src, dst, tensors: str, how: str) -> str:
    """A copy of the directory ``src`` whose safetensors file ``tensors`` has its first tensor NaN, or lacks it."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / tensors)
    first = sorted(weights)[0]
    if how == "nan":
        weights[first] = torch.full_like(weights[first], float("nan"))
    else:
        del weights[first]
    save_file(weights, dst / tensors, metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """A tiny model, a fact file, an SAE on 1/mlp.out, a compare run; an SAE and a model whose weights are NaN, a model
    missing a tensor, a fact whose second prompt is too long, config files a person wrote, and a server that is no LLM."""
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
    run = root / "run"
    r = runner.invoke(app, ["compare", "--model", str(model), "--facts", str(facts), "--known-top-k", "100", "--min-known-prompts", "1",
                            "--steps", "2", "--layers", "1", "--sae", str(sae), "--generate", "0", "--text", str(corpus),
                            "--out", str(run / "compare.json")])
    assert r.exit_code == 0, r.output
    long_fact = root / "long.jsonl"  # its second prompt does not fit the context of 64 tokens
    long_fact.write_text('{"subject": "france", "relation": "capital", "object": "paris", "prompts": ["the capital of france is", '
                         '"' + "the " * 70 + 'capital of france is"]}\n')
    for name in ("c.yaml", "o.config.yaml", "faithfulness.config.yaml"):
        (root / name).write_text("steps: 2\n")  # written by a person: an input, never written over
    (root / "e.png").write_text("a text file that privacy erase reads with --text\n")
    (root / "sl.config.yaml").symlink_to(root / "c.yaml")  # where a side output goes: a symlink to an input
    os.link(root / "c.yaml", root / "hl.config.yaml")  # and a hard link of one
    (root / ".sj.json.journal.jsonl").symlink_to(facts)  # a journal's place, a symlink to the facts
    (root / "in_sae").symlink_to(sae, target_is_directory=True)  # an input directory reached through a link
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(root.resolve() / ".held.json.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"  # another live run writing root/held.json
    yield {"root": root, "model": str(model), "facts": str(facts), "sae": str(sae), "corpus": str(corpus), "run": str(run),
           "nan_sae": _broken_copy(sae, root / "nan_sae", "sae_weights.safetensors", "nan"),
           "nan_model": _broken_copy(model, root / "nan_model", "model.safetensors", "nan"),
           "holed_model": _broken_copy(model, root / "holed_model", "model.safetensors", "drop"),
           "long_fact": str(long_fact), "web": f"http://127.0.0.1:{server.server_address[1]}/v1"}
    server.shutdown()
    holder.kill()
    holder.wait()


def hand_made_erase():
    """A small ``privacy erase`` result made by hand (the real one takes minutes): two test people with two secrets
    each, two methods' best points, the floors and three attacked model states, located units on layer 1."""
    from kscope.privacy.judge.attacks import AttackRow
    from kscope.privacy.study.results import EraseResult, ErasurePoint, SecretOutcome, Target
    from kscope.stats import Interval

    people, attrs = ["Ada Lind", "Bo Ek"], ["city", "phone"]
    leaks = lambda x: {"token_recovery": x, "prefix_share": x / 2, "char_overlap": x / 3}  # noqa: E731
    secrets = lambda rel, x: [SecretOutcome(p, a, rel, 1.0 if rel else 0.0, 0 if rel else 7, 20, leaks(x))  # noqa: E731
                              for p in people for a in attrs]
    val = {"rel": 0.9, "gen": 0.9, "loc_pararel": 1.0, "loc_private": 1.0, "loc": 1.0, "delta_ppl": 0.0}

    def point(method: str, kind: str, budget: int, rel: float) -> ErasurePoint:
        return ErasurePoint(method, kind, budget, budget, 64 * budget, rel, rel, 1.0, 1.0, 1.0, 10.0, 0.001, Interval(-2.0),
                            lam=1.0, val=val, rel_people={p: rel for p in people}, gen_people={p: rel for p in people},
                            dlogp_people={p: -2.0 for p in people}, secrets=secrets(rel < 0.5, 0.1 if rel > 0.5 else 0.9))

    points = [point("keyed-unrestricted", "keyed", 0, 1.0), point("keyed-features", "keyed", 4, 0.25)]
    rows = []
    for m, x in (("base model (never taught)", 0.0), ("retain twin", 0.05), ("unedited", 1.0), ("keyed-unrestricted", 0.1)):
        rows.append(AttackRow(m, "–" if m != "keyed-unrestricted" else "all", {"phrasings": Interval(x), "int8 weights": Interval(x)},
                              people={"phrasings": {p: x for p in people}, "int8 weights": {p: x for p in people}}))
    units = {p: {"neurons": [[1, u, 1.0 / (u + 1)] for u in range(10)], "features": [[1, u, 0.5 / (u + 1)] for u in range(10)]}
             for p in people}
    return EraseResult(model_dir="privacy/hand", base_model="tiny", build={}, layers=[1], config={"specificity": ["format"]},
                       n_erased=8, n_kept_private=4, n_unrelated=2, points=points, frontier=[0], reach_target=[0], target=Target(),
                       n_erased_people=4, attacks=rows, split={"forget-val": ["Cy Val", "Di Val"], "forget-test": people},
                       secret_floors={"unedited": secrets(True, 1.0), "retain twin": secrets(False, 0.2)}, person_units=units)
