"""The deploy spec's field checks: each takes the field's dotted name and its raw value and returns
the value, or raises SpecError naming the field (trellis/core/spec.py composes them)."""

from __future__ import annotations

from typing import Any

from trellis.core.errors import SpecError


def fields_of(where: str, raw: Any, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(raw))
    if missing:
        raise SpecError(f"{where}.{missing[0]}: required field is missing")
    return raw


def typed(
    where: str,
    value: Any,
    kind: type | tuple[type, ...],
    *,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SpecError(f"{where}: expected {name}, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: must be >= {minimum}, got {value!r}")
    if choices is not None and value not in choices:
        raise SpecError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def port(where: str, value: Any) -> int:
    typed(where, value, int, minimum=0)
    if value > 65535:
        raise SpecError(f"{where}: port {value} is out of range (0-65535)")
    return value


def from_mapping(
    cls: type, where: str, raw: Any, checks: dict[str, Any], required: set[str] = frozenset()
) -> Any:
    raw = fields_of(where, raw or {}, set(checks), required)
    return cls(**{k: checks[k](f"{where}.{k}", v) for k, v in raw.items()})


def optional(check: Any) -> Any:
    return lambda w, v: None if v is None else check(w, v)


def integer(minimum: int = 0) -> Any:
    return lambda w, v: typed(w, v, int, minimum=minimum)


def string(choices: tuple[str, ...] | None = None) -> Any:
    return lambda w, v: typed(w, v, str, choices=choices)


def seconds(where: str, v: Any) -> float:
    typed(where, v, (int, float))
    if not v > 0:
        raise SpecError(f"{where}: must be > 0 seconds, got {v!r}")
    return float(v)


def layers_range(where: str, v: Any) -> tuple[int, int]:
    if not (isinstance(v, list | tuple) and len(v) == 2 and all(type(x) is int for x in v)):
        raise SpecError(f"{where}: expected [start, end) as two integers, got {v!r}")
    if not 0 <= v[0] < v[1]:
        raise SpecError(f"{where}: expected [start, end) with 0 <= start < end, got {list(v)}")
    return (v[0], v[1])


def gpu_list(where: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or not all(type(x) is int and x >= 0 for x in v):
        raise SpecError(f"{where}: expected a list of GPU indices, got {v!r}")
    return tuple(v)
