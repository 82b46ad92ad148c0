"""Typed configs whose fields are the command-line options.

A field declares its option once: default, help, flag name, parser and the checks on its value
(``min``, ``max``, ``choices``). ``kscope.app.options`` turns a config class into a command; the
same checks run when a config is built in Python (``Config.__post_init__``), so a bad value is a
``KscopeError`` naming the option, before any model work.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kscope.errors import KscopeError
from kscope.outputs import Written, check_outputs, journal_path

# Upper bounds of counts whose larger values can only be typos that cost hours or all memory (shown in --help)
MAX_STEPS = 1000  # IG steps: beyond this the Riemann sum has long converged
MAX_EPOCHS = 1000  # training epochs (SAEs, privacy injection), for the same reason
MAX_DRAWS = 100  # draws of a random control per fact
MAX_TEXTS = 1_000_000  # texts generated or read (768 sequences take ~4 min on 2 CPU cores)
MAX_EXPANSION = 1024  # SAE width / site width (Gemma Scope's widest: ~455)
MAX_TOKENS = 1_000_000_000  # activation tokens held in memory (the default: 120,000)
MAX_LENGTH = 100_000  # tokens per text or window, beyond any model's context


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    parse: Callable[[str], Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[Any] | None = None,
    required: bool = False,
    unique: bool = False,
    allow_empty: bool = False,
    finite: bool = True,
    reads: bool = False,
    output: str | None = None,
    label: str | None = None,
    cli: bool = True,
) -> Any:
    """A config field that is also a CLI option ``--flag`` (default: the field name with dashes).

    ``parse`` turns one command-line string into the value (list fields: each comma-separated
    item); ``min``/``max``/``choices`` check the value (each element of a list); ``required``
    makes the option mandatory on the command line (the field's default is then ``None``);
    ``unique`` refuses a list that repeats a value; a list must hold a value unless ``allow_empty``
    (an empty list then means something, said in the help); a float must be finite (no NaN, no
    infinity) unless ``finite=False``; ``reads`` marks a path the command reads (outputs may not touch it);
    ``label`` names one value in messages ("unknown method 'x'").
    """
    md = {"help": help, "flag": flag, "aliases": tuple(aliases), "parse": parse, "min": min, "max": max,
          "choices": tuple(choices) if choices is not None else None, "required": required, "unique": unique,
          "allow_empty": allow_empty, "finite": finite, "reads": reads, "output": output, "label": label, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=None if required and default is MISSING else default, metadata=md)


def nested(cls: type, prefix: str = "", hide: Sequence[str] = (), **overrides: Any) -> Any:
    """A sub-config; its options appear on the command line as ``--<prefix><flag>`` (fields in ``hide``, which the
    parent sets itself, do not)."""
    return field(default_factory=lambda: cls(**overrides), metadata={"nested": True, "prefix": prefix, "hide": tuple(hide)})


def flag_of(f: dataclasses.Field, prefix: str = "") -> str:
    return "--" + prefix + (f.metadata.get("flag") or f.name.replace("_", "-"))


def check_value(f: dataclasses.Field, value: Any, flag: str) -> None:
    """Raise ``KscopeError`` if ``value`` breaks the field's declared checks: a finite number, a non-empty list without
    repeats, ``min``/``max``/``choices``. NaN must be refused first: every comparison with it is false."""
    md = f.metadata
    if value is None:
        return
    is_list = isinstance(value, (list, tuple))
    items = value if is_list else [value]
    if is_list and not items and not md.get("allow_empty"):
        raise KscopeError(f"{flag} needs at least one value")
    if md.get("unique") and len(set(items)) < len(items):
        dup = next(v for v in items if items.count(v) > 1)
        raise KscopeError(f"{flag}: {dup!r} is given twice")
    for v in items:
        if isinstance(v, float) and md.get("finite", True) and not math.isfinite(v):
            raise KscopeError(f"{flag} must be a finite number, got {v}")
        if md.get("choices") is not None and v not in md["choices"]:
            what = md.get("label") or f"{flag} value"
            raise KscopeError(f"unknown {what} {v!r}; choose from {', '.join(map(str, md['choices']))}")
        if md.get("min") is not None and v < md["min"]:
            raise KscopeError(f"{flag} must be >= {show_bound(md['min'])}, got {v}")
        if md.get("max") is not None and v > md["max"]:
            raise KscopeError(f"{flag} must be <= {show_bound(md['max'])}, got {v}")


def show_bound(x: float) -> str:
    """A bound as written: ``1000000000``, not ``1e+09``; ``0.9``, not ``0.900000``."""
    return str(x) if isinstance(x, int) else f"{x:g}"


class Config:
    """Base of every config: checks each declared option's value when built."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if "help" in f.metadata:
                check_value(f, getattr(self, f.name), flag_of(f))

    def writes(self) -> list[Written]:
        """Every path the job writes, declared before any work so that none may touch an input: a file output with its
        journal of per-fact rows beside it; an output directory with what ``written_inside`` names in it (by default the
        whole directory). A job that writes more declares it by overriding this (figures, further journals)."""
        out: list[Written] = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            kind, value = f.metadata.get("output"), getattr(self, f.name)
            if not kind or not value:
                continue
            p, flag = Path(value), flag_of(f)
            if kind == "file":
                out += [Written(p, flag, value), Written(journal_path(p), flag, value)]
                continue
            inside = self.written_inside()
            out.append(Written(p, flag, value, whole=inside is None, directory=True))
            out += [Written(p / name, flag, value) for name in inside or ()]
        return out

    def written_inside(self) -> list[str] | None:
        """The names the job writes inside its output directory; None: it writes (or replaces) the whole directory."""
        return None

    def check_writes(self, also: Sequence[Written] = (), inputs: Sequence[str | Path | None] = ()) -> None:
        """Refuse, before any work, a path ``writes()`` (and ``also``) names that would touch an input (``reads()`` and
        ``inputs``), or one the file system cannot take (``kscope.outputs.check_outputs``)."""
        check_outputs([*self.writes(), *also], [*self.reads(), *inputs])

    def reads(self) -> list[str]:
        """The files and directories this config names as inputs (options declared ``reads=True``, nested configs
        included): no output may be one of them or lie inside one."""
        out: list[str] = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Config):
                out += value.reads()
            elif f.metadata.get("reads") and value:
                out += [value] if isinstance(value, str) else list(value)
        return out


def parse_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (blanks dropped)."""
    return [part.strip() for part in str(text).split(",") if part.strip()]


def parse_int(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise KscopeError(f"expected an integer, got {text!r}") from None


def parse_float(text: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise KscopeError(f"expected a number, got {text!r}") from None


def parse_layers(text: str) -> list[int]:
    """``"12"``, ``"10,12,14"``, ``"10-14"``, ``"0-27:3"`` (every third) or a mix, in the order given; a layer
    given twice is refused."""
    out: list[int] = []
    for part in parse_list(text):
        m = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+)(?:\s*:\s*(\d+))?)?", part)
        if not m:
            raise KscopeError(f"cannot parse layers {text!r}; use 12, 10,12, 10-14 or 0-27:3")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        step = int(m.group(3)) if m.group(3) else 1
        if b < a:
            raise KscopeError(f"layer range {part!r} runs backwards; write {b}-{a}")
        if step < 1:
            raise KscopeError(f"layer range {part!r}: the step must be >= 1")
        out.extend(range(a, b + 1, step))
    if not out:
        raise KscopeError("no layers given")
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise KscopeError(f"layer {dup[0]} is given twice in {text!r}")
    return out


def require(value: Any, flag: str) -> Any:
    """``value``, or a ``KscopeError`` saying that ``flag`` must be given."""
    if value is None or value == "":
        raise KscopeError(f"{flag} is required")
    return value
