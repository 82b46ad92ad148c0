"""Build a typer command from a config dataclass: every field is an option, declared once.

Nested configs (``kscope.config.nested``) are flattened, their flags prefixed. Two fields that
share a flag (``--seed`` of the facts and of an analysis) become one option that sets both. List
fields take comma-separated values and may repeat. The command's help is the config's docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import typer

from kscope.app.configfile import read_mapping, write_mapping, written_by
from kscope.app.failures import friendly
from kscope.config import check_value, flag_of, parse_float, parse_int, parse_list, show_bound
from kscope.errors import KscopeError
from kscope.outputs import Written, check_outputs, lock_path, output_lock


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
    base, _ = _unwrap_optional(o.hint)
    if _is_list(o.hint):
        ann: Any = Optional[list[str]]
        default = None
        help_ += " Comma-separated; may repeat."
        if md.get("allow_empty") and "empty" not in help_.lower():  # `--controls ,` ran none without saying so
            help_ += " Empty ('' or ','): none."
        if o.default:
            help_ += f" (default: {_show(o.default)})"
    elif base is bool:
        ann, default = bool, o.default
    else:  # numbers reach kscope as text and are parsed there, so a bad one reads as every other error (_value)
        ann, default = Optional[str], o.default
    if md.get("choices"):
        help_ += f" One of: {', '.join(map(str, md['choices']))}."
    if md.get("max") is not None:  # upper bounds surprise; lower ones (>= 1, >= 0) go without saying
        lo, hi = md.get("min"), show_bound(md["max"])
        help_ += f" From {show_bound(lo)} to {hi}." if lo is not None else f" At most {hi}."
    flags = list(o.flags)
    if base is bool:
        name = flags[0][2:]
        flags = [f"--{name}/--no-{name}"]
    metavar = "LIST" if _is_list(o.hint) else {int: "INTEGER", float: "FLOAT"}.get(base)
    opt = typer.Option(... if md.get("required") else default, *flags, help=help_, show_default=not _is_list(o.hint),
                       metavar=metavar)
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
    if isinstance(raw, str):
        return (parse or _elem_parser(f, o.hint))(raw)
    return raw


def _file_value(o: _Opt, v: Any) -> Any:
    """The field value of an option's value in a config file: a string reads as on the command line, a list item by
    item, a number or a boolean as itself (an int field takes no fraction)."""
    if v is None:
        return None
    parse = o.fields[0].metadata.get("parse")
    one = parse or _elem_parser(o.fields[0], o.hint)
    if _is_list(o.hint):
        if isinstance(v, str):
            return _value(o, [v])  # a comma list, as on the command line
        items = [str(x) for x in (v if isinstance(v, list) else [v])]
        return parse(",".join(items)) if parse else [one(x) for x in items]
    is_bool = _unwrap_optional(o.hint)[0] is bool
    if is_bool != isinstance(v, bool) or isinstance(v, (list, dict)):
        raise KscopeError(f"expected {'true or false' if is_bool else 'one value'}, got {v!r}")
    return v if is_bool else one(str(v))


def from_file(path: str, opts: list[_Opt]) -> dict[str, Any]:
    """Field values by option ident from the config file at ``path``; an unknown option name is an error naming it."""
    by_name = {flag[2:]: o for o in opts for flag in o.flags}
    out = {}
    for key, v in read_mapping(path).items():
        o = by_name.get(str(key).replace("_", "-"))
        if o is None:
            close = difflib.get_close_matches(str(key).replace("_", "-"), by_name, 1)
            raise KscopeError(f"--config {path}: unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        try:
            out[o.ident] = _file_value(o, v)
        except KscopeError as e:
            raise KscopeError(f"--config {path}: {key}: {e}") from None
    return out


def config_from_file(cfg_cls: type, path: str) -> Any:
    """``cfg_cls`` with the options of a config file (the rest at their defaults), checked as on the command line."""
    opts = collect(cfg_cls)
    return build(cfg_cls, {}, opts, from_file(path, opts))


def resolved(cfg: Any, opts: list[_Opt]) -> dict[str, Any]:
    """Every option of ``cfg`` by its command-line name, with the value it took: a config file that reruns it."""
    out = {}
    for o in opts:
        v = cfg
        for p in o.paths[0]:
            v = getattr(v, p)
        out[o.flags[0][2:]] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def saved_config_path(cfg: Any, command_name: str) -> Path | None:
    """Where a command's resolved options go: ``<command>.config.yaml`` in its output directory, or
    ``<stem>.config.yaml`` beside its output file (None without an output)."""
    for f in dataclasses.fields(cfg):
        kind, value = f.metadata.get("output"), getattr(cfg, f.name)
        if kind and value:
            return Path(value) / f"{command_name.split()[-1]}.config.yaml" if kind == "dir" else Path(value).with_suffix(".config.yaml")
    return None


def build(cfg_cls: type, values: dict[str, Any], opts: list[_Opt], preset: dict[str, Any] | None = None) -> Any:
    """``cfg_cls`` with the command-line ``values`` (by option ident) filled in, checked option by option; ``preset``
    holds field values (from a config file) for options not given on the command line."""
    tree: dict = {}
    preset = preset or {}
    for o in opts:
        try:
            v = preset[o.ident] if o.ident in preset else _value(o, values.get(o.ident))
        except KscopeError as e:
            raise KscopeError(f"{o.flags[0]}: {e}") from None
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


def declared_writes(cfg: Any, command_name: str) -> list[Written]:
    """Everything ``kscope <command_name>`` writes: what its job declares (``Config.writes``), the resolved config saved
    beside the result, and the lock beside the output."""
    written = cfg.writes()
    main = next((w for w in written if w.main), None)
    if main is None:
        return written
    saved = saved_config_path(cfg, command_name)
    return [*written, *(Written(p, main.flag, main.of) for p in (saved, lock_path(main.path)) if p is not None)]


CONFIG_HELP = ("YAML or TOML file of options: names as on the command line without the dashes, e.g. `layers: 10-14` or "
               "`sae-k: 64`; options given on the command line override it. Every command writes the options it ran with "
               "beside its result (<command>.config.yaml in an output directory, <stem>.config.yaml beside an output file).")


COMMANDS: dict[str, type] = {}  # "privacy erase" -> its config class: every command, for the contract test to enumerate


def command(app: typer.Typer, name: str, cfg_cls: type, run: Callable[[Any], Any], help: str | None = None, group: str = "") -> Callable:
    """Register ``kscope [group] <name>``: its options are ``cfg_cls``'s fields and ``--config FILE``. Before any work it
    refuses what would write over an input (``declared_writes``), validates, and takes the output's lock; it calls
    ``run(cfg)``, then saves the options it ran with beside the result."""
    opts = collect(cfg_cls)
    full = f"{group} {name}".strip()
    COMMANDS[full] = cfg_cls

    def cmd(ctx: typer.Context, config: str | None = None, **values):
        sources = {k: ctx.get_parameter_source(k) for k in values}  # typer bundles its own click: compare by name
        given = {k for k, src in sources.items() if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")}
        preset = {k: v for k, v in from_file(config, opts).items() if k not in given} if config else {}
        cfg = build(cfg_cls, values, opts, preset)
        written = declared_writes(cfg, full)
        saved = saved_config_path(cfg, full)
        own = config is not None and saved is not None and saved.exists() and saved.resolve() == Path(config).resolve() \
            and written_by(config, full)  # rerun from the file this command saved: it is rewritten, not an input
        check_outputs(written, [*cfg.reads(), None if own else config])  # a config file is an input too
        if hasattr(cfg, "validate"):
            cfg.validate()  # refused input takes no lock and leaves nothing (the job validates again: cheap checks)
        main = next((w for w in written if w.main), None)
        with output_lock(main) if main is not None else contextlib.nullcontext():
            result = run(cfg)
            if saved is not None:
                write_mapping(saved, resolved(cfg, opts), full)
        if getattr(result, "exit_code", 0):  # a command that ran but refused part of its job (kscope forget: exit 3)
            raise typer.Exit(result.exit_code)
        return result

    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                               default=typer.Option(None, "--config", help=CONFIG_HELP, metavar="FILE"))
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    cmd.__signature__ = inspect.Signature([context, config, *(_param(o) for o in opts)])  # type: ignore[attr-defined]
    cmd.__name__ = name.replace("-", "_")
    doc = inspect.cleandoc(help or cfg_cls.__doc__ or "")
    app.command(name, help=doc)(friendly(cmd))
    return cmd
