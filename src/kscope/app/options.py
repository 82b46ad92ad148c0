"""Build a typer command from a config dataclass: every field is an option, declared once.

Nested configs (``kscope.config.nested``) are flattened, their flags prefixed. Two fields that
share a flag (``--seed`` of the facts and of an analysis) become one option that sets both. List
fields take comma-separated values and may repeat. The command's help is the config's docstring.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import typer

from kscope.config import check_value, flag_of, parse_float, parse_int, parse_list
from kscope.errors import KscopeError


@dataclass
class _Opt:
    ident: str  # python identifier of the CLI parameter
    flags: list[str]
    paths: list[tuple[str, ...]]  # where the value goes in the (nested) config
    fields: list[dataclasses.Field]
    hint: Any
    default: Any


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _is_list(hint: Any) -> bool:
    return typing.get_origin(_unwrap_optional(hint)[0]) in (list, tuple)


def _elem_parser(f: dataclasses.Field, hint: Any) -> Callable[[str], Any]:
    base, _ = _unwrap_optional(hint)
    if _is_list(hint):
        base = typing.get_args(base)[0]
    return {int: parse_int, float: parse_float}.get(base, str)


def _walk(cls: type, inst: Any, prefix: str = "", path: tuple[str, ...] = (), hide: tuple[str, ...] = ()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in hide:
            continue
        value = getattr(inst, f.name)
        if f.metadata.get("nested"):
            yield from _walk(type(value), value, prefix + f.metadata.get("prefix", ""), path + (f.name,), f.metadata.get("hide", ()))
        elif f.metadata.get("cli", "help" in f.metadata):
            yield f, hints[f.name], flag_of(f, prefix), [f"--{prefix}{a}" for a in f.metadata.get("aliases", ())], path + (f.name,), value


def collect(cfg_cls: type) -> list[_Opt]:
    """The command-line options of ``cfg_cls`` (defaults read from ``cfg_cls()``)."""
    opts: dict[str, _Opt] = {}
    for f, hint, flag, aliases, path, default in _walk(cfg_cls, cfg_cls()):
        if flag in opts:  # the same option for several fields
            o = opts[flag]
            if _unwrap_optional(o.hint)[0] != _unwrap_optional(hint)[0]:
                raise TypeError(f"{flag} declared with two types in {cfg_cls.__name__}")
            o.paths.append(path)
            o.fields.append(f)
            continue
        opts[flag] = _Opt(flag[2:].replace("-", "_"), [flag, *aliases], [path], [f], hint, default)
    return list(opts.values())


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _param(o: _Opt) -> inspect.Parameter:
    f = o.fields[0]
    md = f.metadata
    help_ = md.get("help", "")
    base, optional = _unwrap_optional(o.hint)
    if _is_list(o.hint):
        ann: Any = Optional[list[str]]
        default = None
        help_ += " Comma-separated; may repeat."
        if o.default:
            help_ += f" (default: {_show(o.default)})"
    elif base is bool:
        ann, default = bool, o.default
    else:
        ann = Optional[str] if base not in (int, float, str) else (Optional[base] if optional or o.default is None else base)
        default = o.default
    if md.get("choices"):
        help_ += f" One of: {', '.join(map(str, md['choices']))}."
    if md.get("max") is not None:  # upper bounds surprise; lower ones (>= 1, >= 0) go without saying
        help_ += f" From {md['min']:g} to {md['max']:g}." if md.get("min") is not None else f" At most {md['max']:g}."
    flags = list(o.flags)
    if base is bool:
        name = flags[0][2:]
        flags = [f"--{name}/--no-{name}"]
    opt = typer.Option(... if md.get("required") else default, *flags, help=help_, show_default=not _is_list(o.hint),
                       metavar="LIST" if _is_list(o.hint) else None)
    return inspect.Parameter(o.ident, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)


def _value(o: _Opt, raw: Any) -> Any:
    """The field value of an option's command-line input (``None``: not given, keep the default)."""
    f = o.fields[0]
    parse = f.metadata.get("parse")
    if raw is None:
        return o.default
    if _is_list(o.hint):
        if parse:  # the whole list at once (e.g. layer ranges)
            return parse(",".join(raw))
        elem = _elem_parser(f, o.hint)
        return [elem(x) for r in raw for x in parse_list(r)]
    if parse and isinstance(raw, str):
        return parse(raw)
    return raw


def build(cfg_cls: type, values: dict[str, Any], opts: list[_Opt]) -> Any:
    """``cfg_cls`` with the command-line ``values`` (by option ident) filled in, checked option by option."""
    tree: dict = {}
    for o in opts:
        v = _value(o, values.get(o.ident))
        for f, path in zip(o.fields, o.paths):
            check_value(f, v, o.flags[0])
            node = tree
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = v

    def make(cls: type, node: dict, inst: Any):
        kw = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("nested"):
                sub = getattr(inst, f.name)
                kw[f.name] = make(type(sub), node.get(f.name, {}), sub)
            elif f.name in node:
                kw[f.name] = node[f.name]
            elif f.init:
                kw[f.name] = getattr(inst, f.name)
        return cls(**kw)

    return make(cfg_cls, tree, cfg_cls())


def print_error(message: str) -> None:
    """One line on stderr, never wrapped (logs and pipes read it whole)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def friendly(fn: Callable) -> Callable:
    """Print ``KscopeError`` as one line and exit 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KscopeError as e:
            print_error(str(e))
            raise typer.Exit(2) from None

    return wrapper


def command(app: typer.Typer, name: str, cfg_cls: type, run: Callable[[Any], Any], help: str | None = None) -> Callable:
    """Register ``kscope <name>``: its options are ``cfg_cls``'s fields; it calls ``run(cfg)``."""
    opts = collect(cfg_cls)

    def cmd(**values):
        return run(build(cfg_cls, values, opts))

    cmd.__signature__ = inspect.Signature([_param(o) for o in opts])  # type: ignore[attr-defined]
    cmd.__name__ = name.replace("-", "_")
    doc = inspect.cleandoc(help or cfg_cls.__doc__ or "")
    app.command(name, help=doc)(friendly(cmd))
    return cmd
