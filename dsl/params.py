"""Params: `param NAME = VALUE` declarations, `--set` overrides, and their substitution.

A param's value is a number, a word or a string. Every word that names a declared param, in a
place where a value is expected, is replaced by the param's value (keeping the span of the
use, so errors point at it); the AST therefore holds concrete values only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from . import ast
from .errors import DlnError, Span, did_you_mean
from .syntax import Call, Index, List, Number, Option, Statement, String, Value, Word

_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ParamDef:
    """A declared param: its current value (a syntax scalar) and where it was declared."""

    name: str
    value: Number | Word | String
    span: Span                  # the whole `param NAME = VALUE` statement
    value_span: Span            # the declared VALUE (kept after an override, for messages)


Params = Mapping[str, ParamDef]


def scalar_of(node: Number | Word | String) -> ast.Scalar:
    """The Python value of a syntax scalar."""
    return node.name if isinstance(node, Word) else node.value


def kind_of(node: Number | Word | String) -> str:
    return {Number: "a number", Word: "a word", String: "a string"}[type(node)]


# ---------------------------------------------------------------- declarations
def declare(stmt: Statement, seen: Params) -> ParamDef:
    """The param a `param NAME = VALUE` statement declares."""
    items = stmt.items
    if stmt.label or stmt.block or len(items) != 1 or not isinstance(items[0], Option):
        raise DlnError("write a param as: param NAME = VALUE", span=stmt.span)
    option = items[0]
    if option.key in seen:
        first = seen[option.key].span.line
        raise DlnError(f"param '{option.key}' is declared twice (first at line {first})",
                       span=option.key_span)
    if not isinstance(option.value, (Number, Word, String)):
        raise DlnError(f"param '{option.key}' must be a number, a word or a string",
                       span=option.value.span)
    return ParamDef(option.key, option.value, stmt.span, option.value.span)


def override(params: Params, overrides: Mapping[str, str]) -> dict[str, ParamDef]:
    """The params with `--set NAME=VALUE` applied; each VALUE must have its param's kind."""
    result = dict(params)
    for name, text in overrides.items():
        if name not in params:
            hint = did_you_mean(name, params) or (
                " — declare it with 'param NAME = VALUE'" if not params else
                f" — the params are {', '.join(params)}")
            raise DlnError(f"unknown param '{name}' in --set {name}={text}{hint}")
        result[name] = _overridden(params[name], str(text))
    return result


def _overridden(param: ParamDef, text: str) -> ParamDef:
    """`param` with the value `text` from the command line, parsed as its declared kind."""
    declared, span = param.value, param.value_span
    if isinstance(declared, String):
        value: Number | Word | String = String(text, span)
    elif isinstance(declared, Number) and _NUMBER.fullmatch(text.strip()):
        value = Number(_to_number(text.strip(), param.name), text.strip(), span)
    elif isinstance(declared, Word) and _NAME.fullmatch(text.strip()):
        value = Word(text.strip(), span)
    else:
        raise DlnError(f"--set {param.name}={text}: param '{param.name}' takes "
                       f"{kind_of(declared)}, like its declared value", span=span)
    return ParamDef(param.name, value, param.span, span)


def _to_number(text: str, name: str) -> int | float:
    if any(c in text for c in ".eE"):
        return float(text)
    try:
        return int(text)
    except ValueError:                      # more digits than Python converts (sys.int_info)
        raise DlnError(f"--set {name}=...: a whole number of {len(text)} digits is too long; write it "
                       f"with an exponent") from None


# ---------------------------------------------------------------- substitution
def substitute(value: Value, params: Params) -> Value:
    """`value` with each word that names a param replaced by the param's value."""
    if isinstance(value, Word):
        return _use(value, params)
    if isinstance(value, (Call, Index)):
        return type(value)(value.name, tuple(_use(a, params) for a in value.args),
                           value.span, value.name_span)
    if isinstance(value, List):
        return List(tuple(_use(a, params) for a in value.args), value.span)
    return value


def _use(node, params: Params):
    """A scalar, or the value of the param it names, located at the use."""
    if not isinstance(node, Word) or node.name not in params:
        return node
    value = params[node.name].value
    if isinstance(value, Number):
        return Number(value.value, value.text, node.span)
    return type(value)(scalar_of(value), node.span)


def substitute_option(option: Option, params: Params) -> Option:
    return Option(option.key, substitute(option.value, params), option.span, option.key_span)
