"""Atomic result writing: a file is either complete or absent, never half-written."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from kscope.errors import KscopeError


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path, directory: bool = False) -> None:
    """Give a temp file (0600) or dir (0700) the mode a plain ``open``/``mkdir`` would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` via a temp file beside ``path`` and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON, atomically (NaN becomes null)."""
    return write_text(path, json.dumps(_clean(data), indent=2))


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a missing, unreadable or malformed file is a ``KscopeError`` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise KscopeError(f"cannot read {path}: {e}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: str | Path) -> None:
    """Remove temp directories a killed writer of ``out`` left behind (``.<name>-<pid>-*`` of a dead pid)."""
    out = Path(out)
    for d in out.parent.glob(f".{out.name}-*-*"):
        pid = d.name[len(out.name) + 2 :].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temp directory beside ``out``; on success everything in it gets the modes the umask gives and it becomes
    ``out`` (replacing it if ``replace``), on error it is removed, so ``out`` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-{os.getpid()}-"))
    honour_umask(tmp, directory=True)
    try:
        yield tmp
        for d, dirs, files in os.walk(tmp):  # writers such as safetensors and save_pretrained make 0600 files
            for name in dirs + files:
                if not os.path.islink(os.path.join(d, name)):
                    honour_umask(os.path.join(d, name), directory=name in dirs)
        if out.exists():
            if not replace:
                raise FileExistsError(out)
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | Path | None, inputs: Sequence[str | Path | None] = (), directory: bool = False,
                   writes: Sequence[str] = (), flag: str | None = None) -> None:
    """Refuse, before any work, an output of the wrong kind, not writable, or that would touch an input.

    The output may not be one of the ``inputs`` nor lie inside an input directory. ``writes`` names what a directory
    output writes or replaces (relative to it; ``"."`` for the directory itself): none of those may be an input or hold
    one. An input inside an output directory is otherwise fine (a run directory holds the results its later stages read).
    """
    if path is None:
        return
    p = Path(path)
    flag = flag or ("--out-dir" if directory else "--out")
    if directory and p.exists() and not p.is_dir():
        raise KscopeError(f"{flag} {path} is a file, not a directory")
    if not directory and p.is_dir():
        raise KscopeError(f"{flag} {path} is a directory; give a file path")
    out = p.expanduser().resolve()
    targets = [out, *((out / w).resolve() for w in writes)]
    for i in inputs:
        if i is None or str(i) == "":
            continue
        src = Path(i).expanduser().resolve()
        if out == src:
            raise KscopeError(f"{flag} {path} is also an input; choose another path")
        if src.is_dir() and src in out.parents:
            raise KscopeError(f"{flag} {path} lies inside the input directory {i}; choose another path")
        for t in targets[1:]:
            if t == src or t in src.parents:
                raise KscopeError(f"{flag} {path}: writing {t} would overwrite the input {i}; choose another path")
    anc = p if directory else p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise KscopeError(f"cannot write {path}: {anc} is not a writable directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise KscopeError(f"cannot write {path}: permission denied")
