"""Strict config loading, shared by every frozen config dataclass (STYLE rule 4: unknown keys are errors)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any], what: str, ignore: frozenset[str] = frozenset()) -> T:
    """``cls(**data)`` with JSON lists turned back into tuples; keys ``cls`` does not have are refused by
    name (``ignore``: bookkeeping keys to drop, e.g. a version stamp)."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known - ignore
    if unknown:
        raise ValueError(f"unknown {what} config keys: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})
