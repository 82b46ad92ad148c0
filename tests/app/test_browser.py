"""The report and the explorer in a real browser (headless Chromium): every page loads without a script error,
every image decodes, no table is empty; and a screenshot is taken."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from kscope.app.cli import app
from tests.app.conftest import hand_made_erase
from tests.helpers import save_tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium)")
runner = CliRunner()


def chromium(*args: str, timeout: int = 120) -> str:
    out = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--allow-file-access-from-files", "--virtual-time-budget=4000", *args],
                         capture_output=True, text=True, timeout=timeout)
    return out.stdout


def check(page) -> str:
    dom = chromium("--dump-dom", page.as_uri())
    assert "data-check=" in dom, dom[:500]
    return dom.split('data-check="', 1)[1].split('"', 1)[0]


def tiny_sweep(path) -> None:
    """A sweep result over three layers that records per-fact effects for every built-in fact (no sweep is run)."""
    from kscope.analyses.sweep import SweepResult
    from kscope.facts import FactConfig

    SweepResult("tiny", 1, "built-in", [0, 1, 2], ["mlp.out"], [], [], [], {}, {}, {}).save(path)
    data = json.loads(path.read_text())
    data["per_fact"] = {f.uid: {f"{L}/{site}/{kind}": -0.1 * (L + 1) * (1 + i % 3)
                                for L in (0, 1, 2) for site, kind in (("mlp.neurons", "neuron"), ("mlp.out", "feature"))}
                        for i, f in enumerate(FactConfig().load())}
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    save_tiny_model(root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(["the capital of france is paris", "people in spain speak spanish", "new york is a city",
                                   "history and science today", "the eiffel tower is in paris"] * 20))
    out = root / "report"
    out.mkdir()
    hand_made_erase().save(out / "privacy-hand.json")  # a privacy result beside the run: the explorer gives it pages
    tiny_sweep(out / "sweep" / "sweep.json")
    r = runner.invoke(app, ["reproduce", "--model", str(root / "model"), "--layer", "1", "--out", str(out), "--known-top-k", "100",
                            "--min-known-prompts", "1", "--sae-tokens", "400", "--generate", "0", "--text", str(corpus),
                            "--sae-expansion", "2", "--sae-k", "32", "--stages", "compare,interpret,monosemanticity,explorer"])
    assert r.exit_code == 0, r.output
    return out


def test_report_and_explorer_pages_render_whole(report, tmp_path):
    unit = next((report / "explorer" / "units").glob("L1-feature-*.html"))
    person = next((report / "explorer" / "privacy").glob("hand-*.html"))
    pages = [report / "index.html", report / "explorer" / "index.html", report / "explorer" / "fact-0.html", unit,
             next((report / "explorer" / "units").glob("L1-neuron-*.html")), report / "explorer" / "privacy" / "index.html", person]
    for page in pages:
        assert check(page) == "ok", page
    for name, page in (("report", report / "index.html"), ("unit", unit), ("fact", report / "explorer" / "fact-0.html"),
                       ("explorer", report / "explorer" / "index.html"), ("privacy", person)):
        shot = tmp_path / f"{name}.png"
        chromium(f"--screenshot={shot}", "--window-size=1100,900", page.as_uri())
        assert shot.exists() and shot.stat().st_size > 5000, name


def test_the_report_answers_first(report):
    """The verdict block comes before any table, one answer per question, each with its verdict."""
    dom = chromium("--dump-dom", (report / "index.html").as_uri())
    assert 'id="verdicts"' in dom and dom.index('id="verdicts"') < dom.index("<table")
    answers = dom.split('id="verdicts"', 1)[1].split("</section>", 1)[0]
    for key in ("locate", "interpret", "monosemantic"):
        assert f'data-key="{key}"' in answers
    assert answers.count('class="says"') >= 3 and "no difference" not in answers
    assert "<details>" in dom and "<figure>" in dom


def test_a_unit_page_is_a_dashboard(report):
    """Logit effects (10 tokens promoted, 10 suppressed), density in the title, a histogram with axes, centred contexts."""
    for glob in ("L1-feature-*.html", "L1-neuron-*.html"):
        page = next((report / "explorer" / "units").glob(glob))
        dom = chromium("--dump-dom", page.as_uri())
        title = dom.split("<h1>", 1)[1].split("</h1>", 1)[0]
        assert "density" in title and "%" in title
        for cls in ("logit-top", "logit-bottom"):
            table = dom.split(f'class="{cls}"', 1)[1].split("</table>", 1)[0]
            assert table.count("<tr>") == 11, glob  # a header and 10 tokens
        assert ">activation</text>" in dom and ">tokens</text>" in dom
        assert 'class="ctxc"' in dom and 'class="m"' in dom
        assert "interpretability score" in dom


def test_the_explorer_finds_units_and_facts(report):
    """The index's search box filters units and facts client-side (from disk, no server)."""
    idx = report / "explorer" / "index.html"
    dom = chromium("--dump-dom", idx.as_uri())
    assert "no match" not in dom and "units/L1-feature-" in dom and "fact-0.html" in dom
    js = (report / "explorer" / "search.js").read_text()
    assert '"t": "unit"' in js and '"t": "fact"' in js
    fact = (report / "explorer" / "fact-0.html").read_text()
    assert "class='dp'" in fact and "full width" in fact  # the unit sets' ΔP bars side by side, on one scale


def test_the_check_catches_a_broken_page(report, tmp_path):
    """The self-check is not vacuous: a missing image, an empty table and a script error are each reported."""
    page = (report / "index.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("</body>", '<img src="nowhere.png"><table><tr><th>x</th></tr></table>'
                                              "<script>undefinedFunction()</script></body>"))
    verdict = check(broken)
    assert "broken image nowhere.png" in verdict and "empty table" in verdict and "script error" in verdict
    assert json.loads((report / "results.json").read_text())["compare"]["n_facts"] >= 1


def test_a_privacy_page_shows_each_persons_units_secrets_and_attacks(report):
    """Linked from the report and the explorer; per test person their located units, each method's outcome on each secret
    beside the unedited model and the retain twin, each attack beside the floors; every table filled."""
    assert "explorer/privacy/index.html" in (report / "index.html").read_text()
    assert "privacy/index.html" in chromium("--dump-dom", (report / "explorer" / "index.html").as_uri())
    index = chromium("--dump-dom", (report / "explorer" / "privacy" / "index.html").as_uri())
    assert "hand-ada-lind.html" in index and "hand-bo-ek.html" in index and "Cy Val" not in index  # test people only
    assert "unedited produces 2 of 2 secrets" in index
    dom = chromium("--dump-dom", (report / "explorer" / "privacy" / "hand-ada-lind.html").as_uri())
    for cls in ("located", "methods", "secret", "attacks"):
        table = dom.split(f'class="{cls}"', 1)[1].split("</table>", 1)[0]
        assert table.count("<td") > 2, cls
    secret = dom.split('class="secret"', 1)[1].split("</table>", 1)[0]
    assert "unedited" in secret and "retain twin" in secret and "keyed-features" in secret and "not produced" in secret
    attacks = dom.split('class="attacks"', 1)[1].split("</table>", 1)[0]
    assert "base model (never taught)" in attacks and "retain twin" in attacks and "unedited" in attacks
    assert "Ada Lind" in (report / "explorer" / "search.js").read_text()


def test_a_fact_page_maps_its_units_across_the_sweeps_layers(report):
    """With a sweep that records per-fact effects, the fact page shows a layers x unit-set heat map."""
    dom = chromium("--dump-dom", (report / "explorer" / "fact-0.html").as_uri())
    heat = dom.split('class="heat"', 1)[1].split("</figure>", 1)[0]
    assert heat.count("<rect") >= 6 + 2 and ">layer</text>" in heat  # 3 layers x 2 sets, and the 2 row swatches
    assert dom.index('class="heat"') < dom.index("<h2>Layer 1</h2>")
