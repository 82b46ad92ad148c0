"""One line per failure: bad input (``KscopeError``, exit 2), the CLI library's own usage errors (exit 2) and faults of
the machine (a full disk, a name too long, memory: exit 1) each end as one ``error:`` line on stderr, never a traceback
or a usage box."""

from __future__ import annotations

import errno
import functools
import sys
from typing import Any, Callable

import typer
from typer.core import TyperGroup

from kscope.errors import KscopeError

_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
           errno.ENAMETOOLONG: "a file name is too long", errno.EROFS: "the file system is read-only"}


def print_error(message: str) -> None:
    """One line on stderr, never wrapped (logs and pipes read it whole)."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()


def fault_message(e: BaseException) -> str | None:
    """The one line for a fault of the machine that ``e`` (or what caused it) is, or None for anything else. Libraries
    that write files in their own code (safetensors) raise their own types, with the OS error in the text."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FAULTS:
            where = f" (writing {seen.filename})" if seen.filename else ""
            return f"{_FAULTS[seen.errno]}{where}; what was written whole is kept, nothing half-written is left"
        text = str(seen)
        if "No space left on device" in text or "StorageFull" in text:
            return f"no space left on the device ({type(seen).__name__}); nothing half-written is left"
        if isinstance(seen, MemoryError) or "can't allocate memory" in text or type(seen).__name__ == "OutOfMemoryError":
            return f"out of memory ({text.splitlines()[0][:160] if text else type(seen).__name__}); ask for less"
        seen = seen.__cause__ or seen.__context__
    return None


def friendly(fn: Callable) -> Callable:
    """Print ``KscopeError`` as one line and exit 2, a fault of the machine as one line and exit 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KscopeError as e:
            print_error(str(e))
            raise typer.Exit(2) from None
        except Exception as e:  # noqa: BLE001 - only faults are caught, the rest goes on
            message = fault_message(e)
            if message is None:
                raise
            print_error(message)
            raise typer.Exit(1) from None

    return wrapper


def _usage(e: Exception) -> bool:
    """Is ``e`` a usage error of click (typer bundles its own copy of click: its classes are told apart by name)?"""
    names = {k.__name__ for k in type(e).__mro__}
    return "UsageError" in names and "NoArgsIsHelpError" not in names  # `kscope` alone shows its help, as asked


class OneLineGroup(TyperGroup):
    """A command group whose usage errors (an option it does not know, a missing value) print one ``error:`` line."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - usage errors only, the rest goes on
            _one_line(e)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001
            _one_line(e)


def _one_line(e: Exception):
    if not _usage(e):
        raise e
    print_error(e.format_message())  # type: ignore[attr-defined]
    raise typer.Exit(getattr(e, "exit_code", 2))
