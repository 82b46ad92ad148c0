"""Every file a command writes obeys the contract (issue 39), as tables: each declared output checked against the inputs,
the disk filling up at each kind of write, corrupt journals, a copied run, and cache keys that depend only on inputs."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kscope.app.options as options
import kscope.io
import kscope.parallel
from kscope.app.cli import app
from kscope.errors import KscopeError
from tests.app.test_contract import BASE, _fill

runner = CliRunner()

# Each command with the options it needs, its outputs under {tmp}/out. A new command needs a row (test below).
ARGS = {
    "compare": ["--model", "{model}", "--out", "{tmp}/out/c.json"],
    "locate": ["--model", "{model}", "--out", "{tmp}/out/l.json"],
    "train-sae": ["--model", "{model}", "--layers", "1", "--sites", "mlp.out,resid.post", "--out", "{tmp}/out/saes"],
    "faithfulness": ["--model", "{model}", "--out-dir", "{tmp}/out/o"],
    "interpret": ["--model", "{model}", "--out-dir", "{tmp}/out/o"],
    "monosemanticity": ["--model", "{model}", "--out-dir", "{tmp}/out/o"],
    "sweep": ["--model", "{model}", "--out-dir", "{tmp}/out/o"],
    "privacy build": ["--model", "{model}", "--out", "{tmp}/out/pm"],
    "privacy erase": ["--model-dir", "{model}", "--out", "{tmp}/out/e.json"],
    "reproduce": ["--model", "{model}", "--out", "{tmp}/out/r"],
    "explore": ["--run-dir", "{tmp}/out/run"],
    "forget": ["--model", "{model}", "--records", "{facts}", "--out", "{tmp}/out/f"],
}


def test_every_command_has_a_row():
    assert set(ARGS) == set(options.COMMANDS)


def _declared(name, args, monkeypatch):
    """What ``kscope <name> <args>`` declares it writes (the CLI stops right after reading the declaration)."""
    seen = []

    def stop(written, inputs):
        seen.append(written)
        raise KscopeError("stop")

    with monkeypatch.context() as m:
        m.setattr(options, "check_outputs", stop)
        runner.invoke(app, [*name.split(), *args])
    return seen[0]


@pytest.mark.parametrize("name", sorted(ARGS))
def test_every_file_a_command_writes_is_checked_against_its_inputs(env, tmp_path, monkeypatch, name):
    """Each path a command declares (its result, resolved config, journals, figures, SAE and model directories, the lock)
    is refused as an output when an input (here the --config file) lies there, before any work, and the input is left as
    it was; the declaration is what the CLI checks, so an output it does not declare fails no row but fails this one."""
    args = _fill(ARGS[name], env, tmp_path)
    written = _declared(name, args, monkeypatch)
    names = [w.path.name for w in written]
    assert any(n.endswith(".config.yaml") for n in names) and any(n.endswith(".lock") for n in names), written
    for w in written:
        w.path.parent.mkdir(parents=True, exist_ok=True)
        w.path.write_text("{}\n")  # a config file a person wrote, where the command would write
        r = runner.invoke(app, [*name.split(), *args, "--config", str(w.path)])
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1, (w, r.output)
        assert re.search(r"is also an input|would overwrite the input|is a file, not a directory", errors[0]), (w, errors)
        assert w.path.read_text() == "{}\n"
        w.path.unlink()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


# The disk fills up (an injected ENOSPC) at each kind of write: one `error:` line, exit 1, nothing half-written, and a
# rerun (with --resume where the command journals) finishes.
SMALL_SAE = ["--sae-tokens", "300", "--sae-k", "4", "--generate", "0", "--text", "{corpus}"]
FULL = [
    # name, command, where the disk fills, files that must be absent after, the rerun's extra options
    ("compare: the result", ["compare", *BASE, "--layers", "1", "--sae", "{sae}", "--out", "{tmp}/o.json"], "file:.o.json-*",
     ["o.json"], ["--resume"]),
    ("compare: a journal row", ["compare", *BASE, "--layers", "1", "--sae", "{sae}", "--out", "{tmp}/o.json"], "journal:2",
     ["o.json"], ["--resume"]),
    ("faithfulness: the figure", ["faithfulness", *BASE, "--layer", "1", "--sae", "{sae}", "--fit-tokens", "50", "--eval-tokens", "50",
                                  *SMALL_SAE, "--out-dir", "{tmp}/o"], "file:.faithfulness.png-*",
     ["o/faithfulness.png", "o/faithfulness.json"], ["--resume"]),
    ("train-sae: the weights (safetensors)", ["train-sae", "--model", "{model}", "--site", "1/mlp.out", "--k", "4", "--max-tokens",
                                               "300", "--generate", "0", "--text", "{corpus}", "--epochs", "1", "--out", "{tmp}/s"],
     "safetensors:sae_lens.saes.sae", ["s"], []),
    ("privacy build: the model (safetensors)", ["privacy", "build", "--model", "{model}", "--people", "4", "--epochs", "1",
                                                 "--no-retain-twin", "--out", "{tmp}/pm"],
     "safetensors:transformers.modeling_utils", ["pm"], []),
    ("reproduce: a journal row", ["reproduce", "--model", "{model}", "--facts", "{facts}", "--layer", "1", "--known-top-k", "100",
                                  "--min-known-prompts", "1", *SMALL_SAE, "--stages", "compare", "--out", "{tmp}/r"], "journal:2",
     ["r/compare.json"], []),
]
STORAGE_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _fill_disk(monkeypatch, where: str) -> None:
    kind, arg = where.split(":", 1)
    if kind == "file":  # a file written whole (kscope.io.write_text, plots.save_figure): as its temp file is finished
        real = kscope.io.honour_umask

        def fail(path, directory=False):
            if Path(path).match(arg):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            real(path, directory)

        monkeypatch.setattr(kscope.io, "honour_umask", fail)
    elif kind == "journal":  # the n-th row, half written
        real_write, n = kscope.parallel._write_all, [0]

        def fail(fd, data):
            n[0] += 1
            if n[0] == int(arg):
                os.write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(fd, data)

        monkeypatch.setattr(kscope.parallel, "_write_all", fail)
    else:  # safetensors writes in its own code and raises its own type
        import importlib

        from safetensors import SafetensorError

        module = importlib.import_module(arg)
        name = "save_file" if hasattr(module, "save_file") else "safe_save_file"

        def fail(tensors, filename, *a, **kw):
            Path(filename).write_bytes(b"half")
            raise SafetensorError(STORAGE_FULL)

        monkeypatch.setattr(module, name, fail)


def _temp_files(d: Path) -> list[Path]:
    return [p for p in d.rglob(".*") if "-" in p.name]  # .<name>-XXXX (files) and .<name>-<pid>-XXXX (directories)


@pytest.mark.parametrize("name,args,where,absent,rerun", FULL, ids=[c[0] for c in FULL])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(env, tmp_path, monkeypatch, name, args, where, absent, rerun):
    args = _fill(args, env, tmp_path)
    with monkeypatch.context() as m:
        _fill_disk(m, where)
        r = runner.invoke(app, args)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "no space left on the device" in errors[0], r.output
    assert not _temp_files(tmp_path) and not [a for a in absent if (tmp_path / a).exists()], _temp_files(tmp_path)
    for journal in tmp_path.rglob(".*.journal.jsonl"):  # kept, and every line whole
        assert all(json.loads(line) for line in journal.read_text().splitlines())
    r = runner.invoke(app, [*args, *rerun])
    assert r.exit_code == 0, r.output
    assert not list(tmp_path.rglob(".*.journal.jsonl")) and not _temp_files(tmp_path)


@pytest.fixture(scope="module")
def interrupted(env, tmp_path_factory):
    """compare's journal after the disk filled at its second fact: the header and one whole row."""
    d = tmp_path_factory.mktemp("interrupted")
    args = _fill(["compare", *BASE, "--layers", "1", "--sae", "{sae}", "--out", str(d / "o.json")], env, d)
    with pytest.MonkeyPatch.context() as m:
        _fill_disk(m, "journal:2")
        assert runner.invoke(app, args).exit_code == 1
    lines = (d / ".o.json.journal.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 2
    return args, lines


JOURNALS = [
    # name, the journal's lines, exit code, message fragment
    ("garbage line", lambda h, row: [h, b"\xff\xfe\x00 garbage\n", row], 2, ".o.json.journal.jsonl:2: not a journal line"),
    ("a list, not a row", lambda h, row: [h, b"[1, 2]\n", row], 2, ".o.json.journal.jsonl:2: not a journal row"),
    ("a row without its key", lambda h, row: [h, b'{"row": [1]}\n', row], 2, ".o.json.journal.jsonl:2: not a journal row"),
    ("a header that is no object", lambda h, row: [b"42\n", row], 2, ".o.json.journal.jsonl:1: not a kscope journal"),
    ("another run's options", lambda h, row: [b'{"fingerprint": "0"}\n', row], 2, "was written with other options"),
    ("a last line cut short", lambda h, row: [h, row, b'{"key": "1:germany-capital", "ro'], 0,
     ".o.json.journal.jsonl:3: a row cut by the interruption is dropped"),
]


@pytest.mark.parametrize("name,lines,code,fragment", JOURNALS, ids=[c[0] for c in JOURNALS])
def test_a_corrupt_journal_is_refused_with_its_line_or_its_cut_tail_dropped(interrupted, tmp_path, name, lines, code, fragment):
    args, (head, row) = interrupted
    out = tmp_path / "o.json"
    args = [a if not a.endswith("o.json") else str(out) for a in args]
    (tmp_path / ".o.json.journal.jsonl").write_bytes(b"".join(lines(head, row)))
    r = runner.invoke(app, [*args, "--resume"])
    text = " ".join(r.output.split())
    assert r.exit_code == code and fragment in text, r.output
    assert out.exists() == (code == 0)
    if code:
        assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1


def test_a_lock_dies_with_its_run(env, tmp_path):
    """A run killed with -9 holds nothing: the next run on its output goes ahead (the lock file it left is reused)."""
    from kscope.outputs import Written, output_lock
    from tests.app.conftest import _HOLD

    tmp_path = tmp_path.resolve()  # the lock lies beside where the output really is
    out = tmp_path / "o.json"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / ".o.json.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    main = Written(out, "--out", str(out))
    with pytest.raises(KscopeError, match=f"--out {out} is being written by another kscope run \\(pid {holder.pid}\\)"):
        with output_lock(main):
            pass
    holder.kill()
    holder.wait()
    with output_lock(main):
        assert (tmp_path / ".o.json.lock").read_text().strip() == str(os.getpid())
    assert not list(tmp_path.iterdir())  # the lock file goes with the run



def test_one_output_has_one_lock_however_it_is_written(tmp_path, monkeypatch):
    """`--out-dir .`, a relative path and a link to the output directory are one output: one lock."""
    from kscope.outputs import lock_path

    (tmp_path / "runs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "runs", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "runs")
    want = tmp_path.resolve() / ".runs.lock"
    assert lock_path(".") == lock_path("../runs") == lock_path(tmp_path / "link") == want

def test_a_copied_run_reruns_nothing(env, tmp_path):
    """`kscope reproduce --config RUN/reproduce.config.yaml --out RUN2` on a copy of a run reran every stage ("options
    changed"): the run directory's location is no input. Runs made before (absolute paths in their fingerprints) are
    reused where they lie."""
    from dataclasses import replace

    from kscope.app.options import config_from_file
    from kscope.app.reproduce import FINGERPRINTS, ReproduceConfig, stage_configs, stage_fingerprints

    run, copy = tmp_path / "run", tmp_path / "copy"
    r = runner.invoke(app, _fill(["reproduce", "--model", "{model}", "--facts", "{facts}", "--layer", "1", "--known-top-k", "100",
                                  "--min-known-prompts", "1", *SMALL_SAE, "--stages", "compare", "--out", str(run)], env, tmp_path))
    assert r.exit_code == 0, r.output
    shutil.copytree(run, copy)
    stamp = (copy / "compare.json").stat().st_mtime_ns
    r = runner.invoke(app, ["reproduce", "--config", str(copy / "reproduce.config.yaml"), "--out", str(copy)])
    assert r.exit_code == 0 and "done, resumed" in r.output and "options changed" not in r.output, r.output
    assert (copy / "compare.json").stat().st_mtime_ns == stamp
    cfg = config_from_file(ReproduceConfig, str(copy / "reproduce.config.yaml"))
    assert cfg.out == str(copy)  # the rerun rewrote the file it was given (kscope wrote it) with the options it ran with
    legacy = stage_fingerprints(stage_configs(replace(cfg, out=str(copy.resolve()))), None)
    (copy / FINGERPRINTS).write_text(json.dumps({"compare": legacy["compare"]}))
    r = runner.invoke(app, ["reproduce", "--config", str(copy / "reproduce.config.yaml")])
    assert r.exit_code == 0 and "done, resumed" in r.output and "options changed" not in r.output, r.output


def test_keys_depend_only_on_inputs(env, tmp_path):
    """One model saved in two directories, its config written by another transformers version with other metadata, gets
    one fingerprint and one SAE key; a change of what it computes gets another."""
    from kscope.model.loading import ModelConfig, load_model
    from kscope.model.sites import Site
    from kscope.units.corpus import Corpus
    from kscope.units.provision import sae_key
    from kscope.units.training import TrainSAEConfig

    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for d in (a, b, c):
        shutil.copytree(env["model"], d)
    conf = json.loads((b / "config.json").read_text())
    conf |= {"transformers_version": "4.46.0", "_commit_hash": "0abc", "use_cache": False, "architectures": ["Other"]}
    (b / "config.json").write_text(json.dumps(conf))
    (c / "config.json").write_text(json.dumps(conf | {"rms_norm_eps": 1e-5}))
    fps = [load_model(ModelConfig(model=str(d))).fingerprint for d in (a, b, c)]
    corpus = Corpus(["some text", "more text"], "test", 0.1, 0)
    keys = [sae_key(fp, Site(1, "mlp.out"), TrainSAEConfig(), corpus, 64) for fp in fps]
    assert fps[0] == fps[1] != fps[2] and keys[0] == keys[1] != keys[2]


@pytest.mark.parametrize("serves", ["models", "chat"])
def test_an_openai_style_server_is_accepted(serves):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kscope.net import check_openai_url

    class API(BaseHTTPRequestHandler):
        def _reply(self, ok, body):
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def do_GET(self):
            self._reply(serves == "models" and self.path == "/v1/models", {"object": "list", "data": [{"id": "m"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._reply(serves == "chat" and self.path == "/v1/chat/completions", {"choices": [{"message": {"content": "x"}}]})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), API)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_openai_url(f"http://127.0.0.1:{server.server_address[1]}/v1", "--llm-url", "m")
    finally:
        server.shutdown()
