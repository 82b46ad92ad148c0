"""What a command writes, declared before any work, checked against its inputs, and held by one run at a time.

Every config declares the paths its job writes (``Config.writes``: results, journals, figures, SAE and model
directories); the CLI adds the resolved config it saves beside the result and the lock. ``check_outputs`` refuses,
before any model work, a written path that is an input (the same path, a symlink to it or a hard link of it), lies
inside an input directory, or is a directory written whole that holds an input, and a name too long for the file
system. ``output_lock`` refuses a second live run on the same output at once.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from kscope.errors import KscopeError

TEMP_MARGIN = 20  # what a temp name adds to a written name: ".<name>-<pid>-XXXXXXXX" (io.atomic_dir, io.write_text, plots)


@dataclass(frozen=True)
class Written:
    """A path a command writes. ``flag``/``of``: the option it derives from and that option's value (for messages).
    ``whole``: written or replaced whole (a file, an SAE or model directory); False for an output directory the command
    writes into, where inputs may lie (a run directory holds what its later stages read). ``directory``: the path is a
    directory (checked for the option's own path: a file there is refused)."""

    path: Path
    flag: str
    of: str
    whole: bool = True
    directory: bool = False

    @property
    def main(self) -> bool:
        """Is this the option's own path (not a side output beside or inside it)?"""
        return self.path == Path(self.of)


def journal_path(out: str | Path) -> Path:
    """The journal of per-fact rows beside ``out`` (``kscope.parallel``)."""
    out = Path(out)
    return out.parent / f".{out.name}.journal.jsonl"


def lock_path(out: str | Path) -> Path:
    """The lock file beside an output file or directory, named after where it really lies (``--out-dir .`` and a link to
    the output share one lock)."""
    out = _resolve(out)
    return out.parent / f".{out.name or 'root'}.lock"


def _resolve(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def _plain(p: str | Path) -> str:
    """``p`` made absolute without following links (to tell a link from the input itself in messages)."""
    return os.path.normpath(os.path.abspath(Path(p).expanduser()))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # a hard link (or a symlink) of the input
    except OSError:
        return False


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a name too long to look up
        return False


def _existing(p: Path) -> Path:
    while not _exists(p) and p != p.parent:
        p = p.parent
    return p


def _name_max(p: Path) -> int:
    try:
        return os.pathconf(_existing(p), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_names(w: Written) -> None:
    """Every name on the way to ``w`` that does not exist yet must fit the file system with a temp name's extra."""
    limit = _name_max(w.path.parent) - TEMP_MARGIN
    p = w.path.expanduser()
    for part in [p, *p.parents]:
        if _exists(part):
            break
        n = len(part.name.encode())
        if n > limit:
            raise KscopeError(f"{w.flag}: the name {part.name[:32]}... is too long ({n} bytes; at most {limit} fit here, "
                              f"with the temporary name written beside it); choose a shorter path")
    if len(str(_resolve(p)).encode()) + TEMP_MARGIN > 4096:
        raise KscopeError(f"{w.flag}: the path {str(p)[:48]}... is too long for the file system; choose a shorter one")


def _check_kind(w: Written, directory: bool) -> None:
    """The main output is of the right kind and can be written."""
    p = w.path
    if directory and p.exists() and not p.is_dir():
        raise KscopeError(f"{w.flag} {w.of} is a file, not a directory")
    if not directory and p.is_dir():
        raise KscopeError(f"{w.flag} {w.of} is a directory; give a file path")
    anc = p if directory else p.parent
    anc = _existing(anc)
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise KscopeError(f"cannot write {w.of}: {anc} is not a writable directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise KscopeError(f"cannot write {w.of}: permission denied")


def check_outputs(written: Sequence[Written], inputs: Sequence[str | Path | None]) -> None:
    """Refuse, before any work, a written path that would touch an input, or one the file system cannot take.

    A written path may not be an input (equal, a symlink to it, a hard link of it) nor lie inside an input directory; one
    written ``whole`` may not hold an input either. Each option's own path must be of its kind and writable.
    """
    srcs = [(str(i), _resolve(i)) for i in inputs if i is not None and str(i) != ""]
    for w in written:
        _check_names(w)  # first: a name too long cannot even be looked up
    for w in written:
        if w.main:
            _check_kind(w, w.directory)
        out = _resolve(w.path)
        for given, src in srcs:
            if out == src or _same_file(w.path, Path(given)):
                link = "" if _plain(w.path) == _plain(given) else f" ({w.path} is a link to it)"
                if w.main:
                    raise KscopeError(f"{w.flag} {w.of} is also an input{link}; choose another path")
                raise KscopeError(f"{w.flag} {w.of}: writing {w.path} would overwrite the input {given}{link}; choose another path")
            if src in out.parents and src.is_dir():
                if w.main:
                    raise KscopeError(f"{w.flag} {w.of} lies inside the input directory {given}; choose another path")
                raise KscopeError(f"{w.flag} {w.of}: writing {w.path} would write inside the input directory {given}; choose "
                                  "another path")
            if w.whole and out in src.parents:
                raise KscopeError(f"{w.flag} {w.of}: writing {w.path} would overwrite the input {given}; choose another path")


def _remove_empty(dirs: Sequence[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            pass  # not empty (it holds results or a journal), or already gone


@contextmanager
def output_lock(main: Written) -> Iterator[None]:
    """Hold ``main`` for this run: a second live run on it is refused at once (the lock dies with its process, so a killed
    run holds nothing). Directories made for the output that are still empty at the end are removed, so a run that
    failed leaves no empty ``--out-dir`` behind."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): no lock
        yield
        return
    path = lock_path(main.path)
    made = [p for p in [main.path.expanduser(), *path.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            _remove_empty(made)
            raise KscopeError(f"{main.flag} {main.of} is being written by another kscope run{f' (pid {holder})' if holder else ''}; "
                              "wait for it to finish or choose another path") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed it as we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid only names the holder in the message
    try:
        yield
    finally:
        Path(path).unlink(missing_ok=True)  # before the lock goes, so the next run makes a fresh file
        os.close(fd)
        _remove_empty(made)
