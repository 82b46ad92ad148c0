"""README tables come from a run: the Markdown formatter reproduces the committed tables from a committed results.json."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.app.report import markdown
from kscope.app.reproduce import ReproduceResult
from kscope.privacy.study.results import EraseResult

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
    v = cell["verdicts"]["feature vs neuron"]["10"]  # the Holm-adjusted verdict, as the table says it, with each op's difference
    s, e = (v["ops"][op]["diff"] for op in ("suppress", "enhance"))
    assert (f"| resid.post | {cell['layer']} | sup {s['mean']:+.2f} [{s['lo']:+.2f}, {s['hi']:+.2f}] · enh {e['mean']:+.2f} "
            f"[{e['lo']:+.2f}, {e['hi']:+.2f}]: {v['says']} |") in md
    assert v["p_holm"] >= v["p"] and "no difference" not in md
    erase = next(iter(data["privacy"].values()))
    top = erase["points"][-1]  # the last point: the all-layers MLP control
    assert top["method"] == "mlp-zero-all"
    assert f"| mlp-zero-all | all | – | {top['n_units']} | – | – | {top['n_weights']:,} | {top['rel']:.2f} | {top['gen']:.2f} |" in md


def test_a_result_of_another_kind_or_a_newer_version_is_refused(tmp_path):
    data = json.loads((DATA / "results_small.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({**data, "schema": "kscope.reproduce/99"}))
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "reads kscope.reproduce/2 and older" in r.output
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


def test_privacy_pages_show_each_test_person_and_survive_an_older_result(tmp_path):
    """A page per test person and an index line each; a result made before per-person data gives notes, not empty tables."""
    from kscope.app.privacy_pages import outcome_line, write_privacy_pages
    from tests.app.conftest import hand_made_erase

    res = hand_made_erase()
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "L1-neuron-3.html").write_text("a unit page")
    index = write_privacy_pages(tmp_path, {"hand": res}).read_text()
    assert index.count("<tr><td class='s who'>") == 2 and "Cy Val" not in index
    assert outcome_line(res, "Ada Lind").startswith("unedited produces 2 of 2 secrets · erased on the held-out template, most by "
                                                    "keyed-unrestricted 2/2 · keyed-features 0/2")
    page = (tmp_path / "privacy" / "hand-ada-lind.html").read_text()
    assert '<a href="../units/L1-neuron-3.html">3</a>' in page and "<td>4</td>" in page  # linked when the explorer has it
    old = EraseResult.from_json({**json.loads(json.dumps(res.to_json())), "schema": "kscope.privacy-erase/5",
                                 "secret_floors": {}, "person_units": {}})
    for p in old.points + old.attacks:
        p.secrets = []
        p.people = {}
    write_privacy_pages(tmp_path / "old", {"old": old})
    page = (tmp_path / "old" / "privacy" / "old-ada-lind.html").read_text()
    assert "keeps no per-secret outcomes" in page and "keeps no per-person located units" in page
    assert "<tbody></tbody>" not in page


def test_a_fact_page_maps_layers_only_when_a_sweep_or_several_layers_say_so(tmp_path):
    """No sweep and one layer: no heat map; a sweep's per-fact record gives one row per unit set, one column per layer."""
    from kscope.analyses.sweep import SweepResult
    from kscope.app.explorer import fact_page, layer_grid, sweep_per_fact
    from kscope.locate.compare import FactLocation

    f = FactLocation("capital:France", "France", "capital", "Paris", " Paris", False, ["The capital of France is"])
    assert sweep_per_fact(tmp_path) == {} and layer_grid(f, None) == ({}, "")
    assert 'class="heat"' not in fact_page(f, str, None)
    SweepResult("tiny", 1, "built-in", [0, 3], ["mlp.out", "resid.post"], [], [], [], {}, {}, {}).save(tmp_path / "sweep" / "sweep.json")
    data = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    data["per_fact"] = {f.uid: {"0/mlp.neurons/neuron": -0.5, "3/mlp.neurons/neuron": -0.1, "0/mlp.out/feature": -0.9,
                                "3/resid.post/feature": 0.2, "3/mlp.out/pca": None}}
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(data))
    grid, caption = layer_grid(f, sweep_per_fact(tmp_path)[f.uid])
    assert grid == {"neuron": {0: -0.5, 3: -0.1}, "feature @ mlp.out": {0: -0.9}, "feature @ resid.post": {3: 0.2}}
    page = fact_page(f, str, sweep_per_fact(tmp_path)[f.uid])
    assert 'class="heat"' in page and "not measured" in page and "+0.20" in page and "sweep" in caption


def test_the_privacy_figures_include_the_white_box_attacks_per_layer(tmp_path):
    """plot_all writes the white-box figure (per layer, beside the never-taught model, the twin and the unedited model)
    when the attacks kept per-layer rates, and the attack table names it."""
    from kscope.app.privacy_figures import plot_all
    from kscope.app.report_privacy import tables

    res = ReproduceResult.load(DATA / "results_small.json")
    erase = next(iter(res.privacy.values()))
    assert any(row.layers for row in erase.attacks)
    plot_all(erase, tmp_path, "privacy-x")
    assert (tmp_path / "privacy-x-whitebox.png").stat().st_size > 5000
    assert ("Privacy erasure, x: attacks", "privacy-x-whitebox.png") in [(h, f) for h, _, f in tables("x", erase)]


def test_the_trace_of_where_secrets_are_computed_gets_a_table_and_a_panel(tmp_path):
    from kscope.app.privacy_figures import plot_trace
    from kscope.app.report_privacy import tables
    from kscope.privacy.locate.trace import BlockCell
    from kscope.stats import mean_ci

    erase = next(iter(ReproduceResult.load(DATA / "results_small.json").privacy.values()))
    assert not any(h.endswith("computed") for h, _, _ in tables("x", erase))  # absent unless traced
    layers = sorted({c.layer for c in erase.trace.cells})
    erase.trace.blocks = [BlockCell(L, s, mean_ci([-0.1 * (i + 1) * L, -0.2 * L])) for L in layers
                          for i, s in enumerate(("block", "below", "above"))]
    erase.trace.computed = layers[-1:]
    table = next(t for h, t, _ in tables("x", erase) if h.endswith("where the secrets are computed"))
    assert len(table.rows) == len(layers) and f"layers {layers[-1]}" in table.title
    plot_trace(erase, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 5000


def test_pooled_attacks_cluster_by_model_and_the_per_layer_table_gives_the_figure_values(tmp_path):
    """Attacks over two privacy models: per person, clustered by model (a state only one model attacked: by person); the
    per-layer table holds the mean over models of the figure's per-layer shares, a run of exactly-zero layers as one row."""
    import copy

    from kscope.app.privacy_figures import plot_whitebox
    from kscope.app.report_attacks import pooled_attack_table, whitebox_layers_table
    from kscope.stats import cluster_robust

    a = next(iter(ReproduceResult.load(DATA / "results_small.json").privacy.values()))
    b = copy.deepcopy(a)
    hp = "head-projection@4"
    for row in b.attacks:
        row.people[hp] = {w: min(1.0, x + 0.5) for w, x in row.people[hp].items()}
        row.layers[hp]["all"] = [min(1.0, x + 0.5) for x in row.layers[hp]["all"]]
    b.attacks = [r for r in b.attacks if r.method != "depn"]
    t = pooled_attack_table({"a": a, "b": b})
    col = t.headers.index(hp)
    row = next(r for r in t.rows if r[0] == "unedited")
    ua, ub = (next(r for r in m.attacks if r.method == "unedited").people[hp] for m in (a, b))
    want = cluster_robust([*ua.values(), *ub.values()], ["a"] * len(ua) + ["b"] * len(ub)).interval
    assert row[1] == "2 of 2" and row[2] == len(ua) + len(ub) and row[col] == want.fmt(".2f")
    depn = next(r for r in t.rows if r[0] == "depn")
    da = next(r for r in a.attacks if r.method == "depn").people[hp]
    assert depn[1] == "1 of 2" and depn[col] == cluster_robust(list(da.values()), [f"a:{w}" for w in da]).interval.fmt(".2f")
    assert [r[0] for r in t.rows][:3] == ["base model (never taught)", "retain twin", "unedited"]
    assert any(r[0] == "keyed-random-directions (control)" and "λ 0.1" in r[3] for r in t.rows)  # one state across models' λ
    old = copy.deepcopy(a)
    for r in old.attacks:
        r.people = {}
    assert pooled_attack_table({"a": old, "b": old}) is None  # results without per-person rates: no table of dashes

    layers = whitebox_layers_table({"a": a, "b": b})
    j = layers.headers.index("unedited")
    ya, yb = (next(r for r in m.attacks if r.method == "unedited").layers[hp]["all"] for m in (a, b))
    last = len(ya) - 1
    cell = next(r for r in layers.rows if str(r[0]) == str(last) or str(r[0]).endswith(f"–{last}"))[j]
    assert cell.split(" / ")[0] == f"{(ya[last] + yb[last]) / 2:.2f}"
    assert "depn (1 of 2 models)" in layers.headers
    tiny = copy.deepcopy(a)
    for r in tiny.attacks:
        for v in r.layers.values():
            v["all"] = [0.0, 0.0, 0.001, 0.0, 0.0][: len(v["all"])] + [0.0] * max(0, len(v["all"]) - 5)
    rows = whitebox_layers_table({"a": tiny}).rows
    assert rows[0][0] == "0–1" and rows[1][0] == 2 and rows[1][1].startswith("0.00")  # 0.001 is not nothing, though it prints 0.00
    plot_whitebox({"a": a, "b": b}, tmp_path / "pooled.png")
    assert (tmp_path / "pooled.png").stat().st_size > 5000
