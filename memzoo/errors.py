"""Exceptions memzoo raises for bad input. All subclass ``ValueError`` so callers that
catch ``ValueError`` keep working; each message says what was wrong and what is valid."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class MemzooError(ValueError):
    """Base class of memzoo's input errors."""


class UnknownNameError(MemzooError):
    """An unknown variant, task, backend or field name."""


class InputError(MemzooError):
    """A tensor of the wrong type, dtype, shape, device or value range."""


class StateError(MemzooError):
    """A state that does not belong to this model (variant, config, batch, device, dtype)."""


def one_line(exc: ValidationError, most: int = 3) -> str:
    """A pydantic error in one line: ``where: what (got ...)``, the first few."""
    errors = exc.errors()
    # a sequence whose items failed is also reported too short (pydantic counts only the
    # valid items): the item errors say what is wrong
    failed_items = {tuple(e["loc"][:-1]) for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
    errors = [e for e in errors if not (e["type"] == "too_short" and tuple(e["loc"]) in failed_items)]
    parts = []
    for e in errors[:most]:
        where = ".".join(str(x) for x in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if e["type"] in ("json_invalid", "value_error", "assertion_error") or isinstance(got, dict) else f" (got {got!r:.60})"
        parts.append(f"{where}: {msg}{shown}" if where else f"{msg}")
    more = len(errors) - most
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
