"""Reading one statement: its positional words and options, and typed values from them.

`parts` splits a statement into words (in order) and options (by key), with params
substituted, unknown and repeated options rejected. The readers (`integer`, `real`, `choice`,
...) turn one value into a Python value or raise a `DlnError` at that value's span, saying
what to write instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .errors import DlnError, Span, did_you_mean
from .params import Params, substitute, substitute_option
from .syntax import Block, Call, Index, List, Number, Option, Statement, String, Value, Word


@dataclass(frozen=True)
class Parts:
    """A statement's keyword, positional words and options, params substituted."""

    keyword: str
    span: Span                      # the whole statement
    keyword_span: Span
    words: tuple[Value, ...]
    options: Mapping[str, Option]
    params: tuple[str, ...]         # the declared param names, for "did you mean"

    def word(self, i: int) -> Value | None:
        return self.words[i] if i < len(self.words) else None

    def value(self, key: str) -> Value | None:
        option = self.options.get(key)
        return option.value if option else None


def parts(stmt: Statement, params: Params, allowed: Iterable[str] = (), usage: str = "",
          substitute_words: bool = True) -> Parts:
    """The parts of `stmt`; `allowed` are its option keys, `usage` shows how to write it."""
    allowed = tuple(allowed)
    words: list[Value] = []
    options: dict[str, Option] = {}
    for item in stmt.items:
        if isinstance(item, Option):
            _check_option(stmt, item, allowed, options, usage)
            options[item.key] = substitute_option(item, params)
        else:
            words.append(substitute(item, params) if substitute_words else item)
    keyword = stmt.keyword.name if stmt.keyword else ""
    keyword_span = stmt.keyword.span if stmt.keyword else stmt.span
    return Parts(keyword, stmt.span, keyword_span, tuple(words), options, tuple(params))


def _check_option(stmt: Statement, option: Option, allowed: tuple[str, ...],
                  seen: Mapping[str, Option], usage: str) -> None:
    keyword = stmt.keyword.name if stmt.keyword else "this statement"
    if option.key in seen:
        raise DlnError(f"option '{option.key}' is given twice", span=option.key_span)
    if option.key not in allowed:
        hint = did_you_mean(option.key, allowed)
        if not hint:
            hint = (f" — {keyword} takes {_names(allowed)}" if allowed
                    else f" — {keyword} takes no options")
            hint += f" ({usage})" if usage else ""
        raise DlnError(f"unknown option '{option.key}' for {keyword}{hint}", span=option.key_span)


def _names(names: Iterable[str]) -> str:
    quoted = [f"{n}=" for n in names]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else "".join(quoted)


def at_most(p: Parts, n: int, usage: str) -> None:
    """No more than `n` positional words."""
    if len(p.words) > n:
        extra = p.words[n]
        raise DlnError(f"unexpected {show(extra)} — write {usage}", span=extra.span)


def single(read: Callable[[Parts, Value], object], usage: str) -> Callable[[Parts], object]:
    """A builder for a statement of exactly one word, read with `read(parts, word)`."""
    def build(p: Parts):
        at_most(p, 1, usage)
        return read(p, needed(p, p.word(0), "a value", usage))
    return build


def needed(p: Parts, value: Value | None, what: str, usage: str) -> Value:
    """`value`, which must be there: else an error asking for `what`."""
    if value is None:
        raise DlnError(f"{p.keyword} needs {what}: {usage}", span=p.span)
    return value


def show(value: Value) -> str:
    """How a value is quoted in a message."""
    if isinstance(value, Number):
        return f"'{value.text}'"
    if isinstance(value, String):
        return f'"{value.value}"'
    if isinstance(value, Word):
        return f"'{value.name}'"
    if isinstance(value, (Call, Index)):
        return f"'{value.name}{'(' if isinstance(value, Call) else '['}...'"
    return "a list"


# ---------------------------------------------------------------- numbers
def number(value: Value, what: str, params: Iterable[str]) -> int | float:
    """A number; a word that is no param is reported as an undefined param."""
    if isinstance(value, Number):
        return value.value
    if isinstance(value, Word):
        hint = did_you_mean(value.name, params) or (
            f" — {what} must be a number, or a param declared with 'param {value.name} = VALUE'")
        raise DlnError(f"undefined param '{value.name}'{hint}", span=value.span)
    raise DlnError(f"{what} must be a number, not {show(value)}", span=value.span)


INT64_MAX = 2 ** 63 - 1          # sizes, strides and seeds end up in int64 ONNX attributes and numpy


def integer(value: Value, what: str, params: Iterable[str], low: int = 1) -> int:
    """A whole number from `low` to INT64_MAX."""
    x = number(value, what, params)
    if isinstance(x, float) and not (math.isfinite(x) and x.is_integer()):
        raise DlnError(f"{what} must be a whole number, got {_text(value)}", span=value.span)
    if x < low:
        raise DlnError(f"{what} must be at least {low}, got {_text(value)}", span=value.span)
    if x > INT64_MAX:
        raise DlnError(f"{what} must be at most {INT64_MAX} (a 64-bit integer), got {_text(value)}",
                       span=value.span)
    return int(x)


def real(value: Value, what: str, params: Iterable[str], low: float | None = None,
         high: float | None = None, open_low: bool = False, open_high: bool = False) -> float:
    """A number in the interval given by `low`, `high` (closed unless `open_*`)."""
    x = float(number(value, what, params))
    bad = (not math.isfinite(x)
           or (low is not None and (x < low or (open_low and x == low)))
           or (high is not None and (x > high or (open_high and x == high))))
    if bad:
        raise DlnError(f"{what} must be {_interval(low, high, open_low, open_high)}, "
                       f"got {_text(value)}", span=value.span)
    return x


def _interval(low, high, open_low, open_high) -> str:
    if high is None:
        return f"{'>' if open_low else '≥'} {_g(low)}"
    if low is None:
        return f"{'<' if open_high else '≤'} {_g(high)}"
    return f"in {'(' if open_low else '['}{_g(low)}, {_g(high)}{')' if open_high else ']'}"


def _g(x: float) -> str:
    return f"{x:g}"


def _text(value: Value) -> str:
    return value.text if isinstance(value, Number) else show(value)


# ---------------------------------------------------------------- words and strings
def choice(value: Value, what: str, choices: Iterable[str]) -> str:
    """One of the words `choices`; else "unknown WHAT 'x' — did you mean 'y'?"."""
    choices = tuple(choices)
    if isinstance(value, Word) and value.name in choices:
        return value.name
    if isinstance(value, Word):
        hint = did_you_mean(value.name, choices) or f" — write {_alternatives(choices)}"
        raise DlnError(f"unknown {what} '{value.name}'{hint}", span=value.span)
    raise DlnError(f"{what} must be {_alternatives(choices)}, not {show(value)}", span=value.span)


def _alternatives(choices: tuple[str, ...]) -> str:
    return " or ".join(", ".join(choices).rsplit(", ", 1)) if choices else "nothing"


def string(value: Value, what: str) -> str:
    """A string (`"..."`), or a bare word taken as text."""
    if isinstance(value, (String, Word)):
        return value.value if isinstance(value, String) else value.name
    raise DlnError(f"{what} must be a string in double quotes, not {show(value)}", span=value.span)


def flag(p: Parts, value: Value, choices: Iterable[str]) -> str:
    """A trailing flag word of statement `p` (`last`, `trainable`, `per_step`)."""
    choices = tuple(choices)
    if isinstance(value, Word) and value.name in choices:
        return value.name
    hint = did_you_mean(value.name, choices) if isinstance(value, Word) else ""
    raise DlnError(f"unexpected {show(value)} after {p.keyword}"
                   f"{hint or ' — it takes ' + _alternatives(choices) + ' here'}", span=value.span)


def each_once(block: Block, table: Mapping, name: str, build) -> tuple[dict, dict]:
    """The statements of a block whose statements may each stand once: field -> the value
    `build(keyword, stmt)` makes, and field -> the statement's span. `table[keyword][0]` is the field."""
    fields: dict[str, object] = {}
    spans: dict[str, Span] = {}
    for stmt in block.statements:
        keyword = block_keyword(stmt, table, name)
        field = table[keyword][0]
        if field in fields:
            raise DlnError(f"{keyword} is given twice in {name} (first at line {spans[field].line})",
                           span=stmt.keyword.span)
        fields[field] = build(keyword, stmt)
        spans[field] = stmt.span
    return fields, spans


def block_keyword(stmt: Statement, table: Mapping, block: str) -> str:
    """The statement's keyword, which must be one the block knows."""
    if stmt.keyword is None:
        raise DlnError(f"a statement in {block} starts with a keyword — one of {', '.join(table)}",
                       span=stmt.span)
    keyword = stmt.keyword.name
    if keyword not in table:
        hint = did_you_mean(keyword, table) or f" — {block} takes {', '.join(table)}"
        raise DlnError(f"unknown {block} statement '{keyword}'{hint}", span=stmt.keyword.span)
    no_label(stmt, keyword)
    no_block(stmt, keyword)
    return keyword


def no_block(stmt: Statement, keyword: str) -> None:
    """Statements other than blocks must not carry `{ ... }`."""
    if stmt.block is not None:
        raise DlnError(f"{keyword} does not take a block {{ ... }}", span=stmt.block.span)


def no_label(stmt: Statement, keyword: str) -> None:
    if stmt.label is not None:
        raise DlnError(f"{keyword} does not take a name '{stmt.label.name}:'", span=stmt.label.span)


def args_of(value: Value) -> tuple:
    """The arguments of a call, index or list (none for a scalar)."""
    return value.args if isinstance(value, (Call, Index, List)) else ()
