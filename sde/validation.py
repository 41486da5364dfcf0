"""Small checks of user arguments, shared by sde, solvers and samplers (after scipy's ``_ivp/common.py``).

Each returns the value in its working type (a float, an int, a bool) or raises with a message that
names the argument, what is allowed and what was given.  ``owner`` (a class or function name), when
given, is put in front, so an error deep in a composite object still says whose argument it was.
Booleans are not numbers here: ``True`` is refused where a count or a scale is expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Literal, overload

__all__ = ["check_number", "check_positive", "check_nonnegative", "check_in_range", "check_count",
           "check_flag", "check_choice", "check_predicts"]


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def _is_real(value) -> bool:
    """An int or float (numpy's scalars too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name: str, value, owner: str | None = None, *, what: str = "a finite number") -> float:
    """A finite real number (int or float) as a float."""
    if not (_is_real(value) and math.isfinite(value)):
        raise ValueError(f"{_prefix(owner)}{name} must be {what}, got {value!r}")
    return float(value)


def check_positive(name: str, value, owner: str | None = None, *, why: str = "") -> float:
    """A finite number > 0 as a float; ``why`` (e.g. " (the McCallum-Foster zeta)") follows the rule."""
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{_prefix(owner)}{name} must be a positive finite number{why}, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value, owner: str | None = None, *, why: str = "") -> float:
    """A finite number >= 0 as a float."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{_prefix(owner)}{name} must be a finite number >= 0{why}, got {value!r}")
    return float(value)


def check_in_range(name: str, value, low: float, high: float, owner: str | None = None, *,
                   closed: str = "both", why: str = "") -> float:
    """A number in the interval from ``low`` to ``high`` as a float; ``closed`` is "both", "left",
    "right" or "neither" (which ends belong to it)."""
    left = closed in ("both", "left")
    right = closed in ("both", "right")
    inside = _is_real(value) and not math.isnan(value) and (
        (value >= low if left else value > low) and (value <= high if right else value < high))
    if not inside:
        interval = f"{'[' if left else '('}{low:g}, {high:g}{']' if right else ')'}"
        raise ValueError(f"{_prefix(owner)}{name} must be a number in {interval}{why}, got {value!r}")
    return float(value)


def check_count(name: str, value, owner: str | None = None, *, minimum: int = 1, maximum: int | None = None,
                why: str = "") -> int:
    """An int (numpy's too, not a bool) >= ``minimum`` (and <= ``maximum`` when given), as an int."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= minimum and (
        maximum is None or int(value) <= maximum)
    if not ok:
        rule = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{_prefix(owner)}{name} must be an int {rule}{why}, got {value!r}")
    return int(value)


@overload
def check_flag(name: str, value, owner: str | None = None, *, allow_none: Literal[False] = False) -> bool: ...
@overload
def check_flag(name: str, value, owner: str | None = None, *, allow_none: bool) -> bool | None: ...
def check_flag(name: str, value, owner: str | None = None, *, allow_none: bool = False) -> bool | None:
    """True or False, or None where ``allow_none`` (None meaning the default): a string such as "no", or
    1, would otherwise count as a truth value."""
    if isinstance(value, bool) or (value is None and allow_none):
        return value
    allowed = "True, False or None (the default)" if allow_none else "True or False"
    raise TypeError(f"{_prefix(owner)}{name} must be {allowed}, got {value!r}")


def check_choice(name: str, value, choices: Iterable, owner: str | None = None, *, why: str = ""):
    """One of ``choices``: the same object, or an equal str/int/float/tuple (so a tensor, or True for 1,
    is refused rather than compared)."""
    choices = tuple(choices)
    plain = isinstance(value, (str, int, float, tuple)) and not isinstance(value, bool)
    ok = any(value is c or (plain and value == c) for c in choices)
    if not ok:
        names = [repr(c) for c in choices]
        allowed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise ValueError(f"{_prefix(owner)}{name} must be {allowed}{why}, got {value!r}")
    return value


#: the solvers' spelling before 0.2 -> the Model's (``sde.PREDICTIONS``), for the error that names it
_OLD_PREDICTS = {"data": "x0", "noise": "eps"}


def check_predicts(value, choices: Iterable[str] = ("x0", "eps"), owner: str | None = None) -> str:
    """What a solver integrates, spelt as :class:`samplers.Model`'s ``predicts`` (one of ``choices``, a
    subset of ``sde.PREDICTIONS``); the solvers' old spelling ``"data"``/``"noise"`` is refused with the
    new name."""
    choices = tuple(choices)
    if isinstance(value, str) and value in _OLD_PREDICTS and _OLD_PREDICTS[value] in choices:
        raise ValueError(f"{_prefix(owner)}predicts={value!r} is spelt predicts={_OLD_PREDICTS[value]!r} (the "
                         f"Model's names, sde.PREDICTIONS)")
    return check_choice("predicts", value, choices, owner)
