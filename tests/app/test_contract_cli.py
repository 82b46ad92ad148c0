"""The contract at the command line (issue 39): what --help promises (bounds, what an empty list means) and devices
written as torch writes them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kscope.app.cli import app
from tests.app.test_contract import BASE, _fill

runner = CliRunner()


def test_cpu_with_an_index_is_cpu(env, tmp_path):
    """`--device cpu:0` passed the checks, loaded the model, then failed in safetensors with a traceback."""
    from kscope.model.loading import ModelConfig

    assert ModelConfig(device="cpu:0").device == "cpu"
    r = runner.invoke(app, ["compare", *_fill(BASE, env, tmp_path), "--layers", "1", "--sae", env["sae"], "--device", "cpu:0",
                            "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("command,flag,says", [
    ("compare", "--random-draws", "From 0 to 100."), ("compare", "--generate", "From 0 to 1000000."),
    ("compare", "--sae-expansion", "From 1 to 1024."), ("compare", "--sae-max-tokens", "From 1 to 1000000000."),
    ("train-sae", "--expansion", "From 1 to 1024."), ("privacy erase", "--random-draws", "From 1 to 100."),
    ("privacy erase", "--controls", "Empty ('' or ','): none."), ("reproduce", "--erase-controls", "Empty ('' or ','): none."),
    ("compare", "--baselines", 'empty (""): none.'),
])
def test_help_shows_bounds_and_what_empty_means(command, flag, says):
    """`--random-draws 1e15` ran for ever and `--controls ,` ran none, while --help said neither."""
    r = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "4000"}, terminal_width=4000)
    line = next(line for line in r.output.splitlines() if f" {flag} " in line or f" {flag}," in line)
    assert says in " ".join(line.split()), line
