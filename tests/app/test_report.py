"""README tables come from a run: the Markdown formatter reproduces the committed tables from a committed results.json."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.app.report import markdown
from kscope.app.reproduce import ReproduceResult

DATA = Path(__file__).resolve().parents[1] / "data"


def test_markdown_reproduces_the_committed_tables():
    res = ReproduceResult.load(DATA / "results_small.json")
    assert markdown(res) == (DATA / "results_small.md").read_text()


def test_report_command_prints_them_with_the_run_stamp(tmp_path):
    (tmp_path / "results.json").write_text((DATA / "results_small.json").read_text())
    r = CliRunner().invoke(app, ["report", "--markdown", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert r.output == (DATA / "results_small.md").read_text()
    first = r.output.splitlines()[0]
    assert first.startswith("_kscope ") and "config " in first and "SAEs: " in first


def test_the_stamp_digests_the_config_but_not_where_it_was_written():
    from kscope.app.report import stamp

    res = ReproduceResult.load(DATA / "results_small.json")
    moved = ReproduceResult.load(DATA / "results_small.json")
    moved.config = {**moved.config, "out": "/elsewhere/report"}
    other = ReproduceResult.load(DATA / "results_small.json")
    other.config = {**other.config, "layer": other.config["layer"] + 1}
    assert stamp(moved) == stamp(res) != stamp(other)


def test_the_tables_carry_the_json_numbers():
    data = json.loads((DATA / "results_small.json").read_text())
    res = ReproduceResult.from_json(data)
    md = markdown(res)
    top = data["compare"]["summary"]["1"]["neuron"]["effects"]["top"]["suppress"]["10"]
    assert f"| 1 | neurons | suppress | 10 | {top['rel']['mean']:+.3f} [" in md and f"| {top['log']['mean']:+.3f} [" in md
    cell = next(c for c in data["sweep"]["cells"] if c["site"] == "resid.post" and c["selection"] == "ig" and c["ablation"] == "error")
    v = cell["verdicts"]["feature vs neuron"]["both"]["10"]  # the Holm-adjusted verdict, as the table says it
    d = v["diff"]
    assert f"| resid.post | {cell['layer']} | {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] {v['says']} |" in md
    assert v["p_holm"] >= v["p"]
    erase = next(iter(data["privacy"].values()))
    top = erase["points"][-1]  # the last point: the all-layers MLP control
    assert top["method"] == "mlp-zero-all"
    assert f"| mlp-zero-all | all | – | {top['n_units']} | – | – | {top['n_weights']:,} | {top['rel']:.2f} | {top['gen']:.2f} |" in md


def test_a_result_of_another_kind_or_a_newer_version_is_refused(tmp_path):
    data = json.loads((DATA / "results_small.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({**data, "schema": "kscope.reproduce/99"}))
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "reads kscope.reproduce/1 and older" in r.output
    (tmp_path / "results.json").write_text(json.dumps({**data, "schema": "kscope.compare/1"}))
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "expected a kscope reproduce result" in r.output


def test_the_pooled_study_table_pools_people_across_privacy_models():
    """Two copies of one privacy model pooled: twice the test people, the same mean Rel, forget quality from the pooled
    truth ratios, and the target counted per model."""
    from kscope.app.report_privacy import study_table

    res = ReproduceResult.load(DATA / "results_small.json")
    erase = next(iter(res.privacy.values()))
    t = study_table({"a": erase, "b": erase})
    assert t.title.startswith("Pooled over 2 privacy models") and "| keyed-unrestricted |" in t.markdown()
    b = erase.best("keyed-unrestricted")
    row = next(r for r in t.rows if r[0] == "keyed-unrestricted")
    assert row[1] == 2 * len(b.rel_people) and row[2].startswith(f"{sum(b.rel_people.values()) / len(b.rel_people):.2f}")
    assert row[-1].endswith("of 2")
