"""Typed results: each job returns a dataclass that writes itself as versioned JSON and reads back.

``to_json`` gives plain JSON (dict keys as strings, NaN as null) with a ``schema`` tag
``kscope.<kind>/<version>``; ``from_json`` rebuilds the dataclass from its type hints (int keys
come back as ints) and refuses another kind, a newer version, or one older than the kind's ``min_version``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from kscope.errors import KscopeError
from kscope.io import read_json, write_json

T = TypeVar("T", bound="Result")


def encode(obj: Any) -> Any:
    """Plain JSON data of a (nested) dataclass / dict / list value."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def decode(hint: Any, value: Any) -> Any:
    """``value`` (JSON data) as the type ``hint``."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return decode(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        kw = {f.name: decode(hints[f.name], value[f.name]) for f in dataclasses.fields(hint) if f.init and f.name in value}
        return hint(**kw)
    if origin in (list, tuple):
        (elem, *_) = typing.get_args(hint) or (Any,)
        return [decode(elem, v) for v in value]
    if origin is dict:
        kt, vt = typing.get_args(hint) or (Any, Any)
        return {(int(k) if kt is int else k): decode(vt, v) for k, v in value.items()}
    if hint is float and isinstance(value, int):
        return float(value)
    return value


class Result:
    """Base of typed job results (dataclasses)."""

    kind: ClassVar[str] = "result"
    version: ClassVar[int] = 1
    min_version: ClassVar[int] = 1  # older results of this kind mean something else and are refused
    min_version_why: ClassVar[str] = ""

    @classmethod
    def schema(cls) -> str:
        return f"kscope.{cls.kind}/{cls.version}"

    def to_json(self) -> dict:
        return {"schema": self.schema(), **encode(self)}

    @classmethod
    def from_json(cls: type[T], data: dict) -> T:
        tag = data.get("schema", "")
        kind, _, ver = tag.partition("/")
        if kind != f"kscope.{cls.kind}":
            raise KscopeError(f"expected a kscope {cls.kind} result, found schema {tag or 'none'!r}")
        if not ver.isdigit() or int(ver) > cls.version:
            raise KscopeError(f"{tag}: this kscope reads {cls.schema()} and older")
        if int(ver) < cls.min_version:
            raise KscopeError(f"{tag}: {cls.min_version_why or f'this kscope reads kscope.{cls.kind}/{cls.min_version} and newer'}")
        return decode(cls, data)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        data = read_json(path)
        if not isinstance(data, dict):
            raise KscopeError(f"{path} is not a kscope {cls.kind} result")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, AttributeError) as e:
            raise KscopeError(f"{path} is not a valid kscope {cls.kind} result ({type(e).__name__}: {e})") from None
