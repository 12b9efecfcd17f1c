"""Checking a value against a type annotation, and saying what was expected in words a newcomer reads."""

from __future__ import annotations

import collections.abc
import difflib
import types
import typing
from typing import Any, Literal, Union


def describe_type(hint: Any) -> str:
    """The type in words a newcomer reads: "a whole number", "one of 'full', 'lora'"."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is typing.Callable or origin is collections.abc.Callable:
        return "a function"
    words = {bool: "True or False", int: "a whole number", float: "a number", str: "a string in quotes",
             list: "a list [...]", tuple: "a tuple (...)", dict: "a dict {...}"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def check_type(value: Any, hint: Any) -> tuple[bool, Any]:
    """(does `value` fit `hint`, the value normalised): ints pass for floats, lists for tuples; bool is no int."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint)), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, normalised = check_type(value, arg)
            if ok:
                return True, normalised
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is list or origin is list:
        ok = isinstance(value, (list, tuple))
        return ok, list(value) if ok else value
    if hint is tuple or origin is tuple:
        ok = isinstance(value, (list, tuple))
        return ok, tuple(value) if ok else value
    if hint is typing.Callable or origin is collections.abc.Callable:
        return callable(value), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value


def did_you_mean(word: str, choices: typing.Iterable[str], aliases: dict[str, str] | None = None) -> str:
    """" Did you mean 'x'?" for the closest of `choices`, or for `aliases[word]` (another name of the same thing)."""
    choices = list(choices)
    if aliases and word in aliases and aliases[word] in choices:
        return f" Did you mean '{aliases[word]}'?"
    by_lower = {c.lower(): c for c in choices}
    close = [by_lower[word.lower()]] if word.lower() in by_lower else []
    close += [c for c in difflib.get_close_matches(word, choices, n=3, cutoff=0.6) if c not in close]
    if not close:
        return ""
    if difflib.SequenceMatcher(None, word.lower(), close[0].lower()).ratio() >= 0.85:
        close = close[:1]  # a plain typo: name the one fix
    return " Did you mean " + " or ".join(f"'{c}'" for c in close[:3]) + "?"
