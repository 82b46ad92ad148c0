"""Config files: a mapping of option names (as on the command line, without the dashes) to values, in YAML or TOML.

``kscope <command> --config FILE`` reads one (flags given on the command line override it); every command writes
its resolved options as YAML beside its result, so a result carries the file that reruns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kscope.errors import KscopeError
from kscope.io import write_text


def _toml():
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        try:
            import tomli as tomllib  # the same parser, for Python 3.10
        except ImportError:
            raise KscopeError("TOML config files need Python 3.11 or tomli (pip install tomli); or write the file as YAML") from None
    return tomllib


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The option mapping in ``path`` (``.toml``: TOML, anything else: YAML); a missing or malformed file, or one that
    is not a mapping, is a ``KscopeError`` naming it."""
    p = Path(path)
    if not p.is_file():
        raise KscopeError(f"--config {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            data = _toml().loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except KscopeError:
        raise
    except Exception as e:  # noqa: BLE001 - UnicodeDecodeError, YAMLError, TOMLDecodeError
        raise KscopeError(f"--config {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KscopeError(f"--config {path}: expected a mapping of option names to values")
    return data


def _head(command: str) -> str:
    return f"# kscope {command}: every option of the run that wrote this file."


def write_mapping(path: str | Path, mapping: dict[str, Any], command: str) -> Path:
    """``mapping`` as YAML at ``path`` (atomically), headed by how to rerun it."""
    import yaml

    head = f"{_head(command)} Rerun: kscope {command} --config {Path(path).name}\n"
    return write_text(path, head + yaml.safe_dump(mapping, sort_keys=False, allow_unicode=True))


def written_by(path: str | Path, command: str) -> bool:
    """Did ``kscope <command>`` write the config file at ``path`` (``write_mapping``)? A rerun from it may replace it with
    the options it runs with; a config file a person wrote is an input, never written over."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(_head(command))
    except (OSError, ValueError):
        return False
