"""Progress off a terminal: plain lines (task, done/total, rate, ETA) at most every KSCOPE_PROGRESS_INTERVAL seconds."""

import re
import time

from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.facts import write_fact_file
from kscope.progress import LineProgress, make_progress
from tests.helpers import capital_facts, save_tiny_model


def test_lines_say_done_of_total_rate_and_eta(monkeypatch, capsys):
    monkeypatch.delenv("KSCOPE_QUIET", raising=False)
    monkeypatch.setenv("KSCOPE_PROGRESS_INTERVAL", "0")
    with make_progress() as progress:  # capsys's stderr is not a terminal
        assert isinstance(progress, LineProgress)
        task = progress.add_task("sampling", total=4)
        for _ in range(4):
            time.sleep(0.01)
            progress.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"progress: sampling: 2/4 \(50 %\), [\d.]+/s, ETA \d+s", lines[1]), lines
    assert re.fullmatch(r"progress: sampling: 4/4 done in \d+s \([\d.]+/s\)", lines[-1]), lines
    assert len(lines) == 4


def test_at_most_one_line_per_interval_and_one_when_done(capsys):
    progress = LineProgress(interval=3600)
    other = progress.add_task("open-ended")
    progress.advance(other, 5)
    task = progress.add_task("training", total=1000)
    for _ in range(1001):  # one step past the total: still one "done" line
        progress.advance(task)
    assert [line.split(" done")[0] for line in capsys.readouterr().err.splitlines()] == ["progress: training: 1000/1000"]


def test_a_command_logs_its_stages_when_piped(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    facts = tmp_path / "facts.jsonl"
    write_fact_file(capital_facts(), facts)
    r = CliRunner().invoke(app, ["locate", "--model", str(model), "--facts", str(facts), "--known-top-k", "100", "--min-known-prompts",
                                 "1", "--steps", "2", "--layers", "1", "--no-features", "--out", str(tmp_path / "o.json")],
                           env={"KSCOPE_QUIET": "", "KSCOPE_PROGRESS_INTERVAL": "0"})
    assert r.exit_code == 0, r.output
    assert "progress: known facts: 3/3 done in" in r.output and re.search(r"progress: facts: 1/3 \(33 %\), [\d.]+/s", r.output), r.output
