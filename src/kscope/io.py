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
from kscope.outputs import Written, check_outputs


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


def read_utf8(path: str | Path, what: str) -> str:
    """A text file's contents, or a one-line error naming ``what`` (``--records FILE``, ``text file FILE``) when it is
    missing or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise KscopeError(f"{what}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KscopeError(f"{what}: not UTF-8 text ({e.reason} at byte {e.start})") from None


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
    try:
        honour_umask(tmp, directory=True)
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
    """Refuse, before any work, an output of the wrong kind, not writable, or that would touch an input
    (``kscope.outputs.check_outputs`` of ``path`` and of what it writes inside, ``writes``; ``"."``: the whole directory)."""
    if path is None:
        return
    flag = flag or ("--out-dir" if directory else "--out")
    main = Written(Path(path), flag, str(path), whole=not directory or "." in writes, directory=directory)
    check_outputs([main, *(Written(Path(path) / w, flag, str(path)) for w in writes if w != ".")], inputs)
