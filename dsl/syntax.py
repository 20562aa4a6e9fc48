"""The generic syntax tree of a .dln text, and the parser that builds it.

`grammars/dln.lark` knows nothing of models: a program is statements, a statement is items
(numbers, strings, words, calls, indexes, lists, `key=value` options, a `name:` label) and an
optional `{ ... }` block. `parse_syntax` returns that tree as frozen dataclasses, each node
with its `Span`; `dsl/build.py` gives it meaning.

The Transformer runs inside Lark's LALR parser (one call per reduction), so no `lark.Tree`
is ever built and nothing here recurses. Lark's exceptions are turned into a located
`DlnError` in one place, `_syntax_error`; neither they nor Lark's types leave this module.
"""
from __future__ import annotations

import functools
import importlib.resources
import logging
from dataclasses import dataclass
from typing import Union

import lark
from lark import Lark, Token, Transformer, v_args

from .errors import DlnError, Span


# ---------------------------------------------------------------- the syntax tree
@dataclass(frozen=True)
class Number:
    """`64`, `0.01`, `1e-4`, `-3`; `value` is an int when the text has no `.` or exponent."""

    value: int | float
    text: str
    span: Span


@dataclass(frozen=True)
class String:
    """`"digits"`; `value` without the quotes, escapes resolved."""

    value: str
    span: Span


@dataclass(frozen=True)
class Word:
    """A bare name: a keyword, an activation, a param, a layer name."""

    name: str
    span: Span


Scalar = Union[Number, String, Word]


@dataclass(frozen=True)
class Call:
    """`leaky_relu(0.2)`, `log_uniform(1e-4, 1e-1)`."""

    name: str
    args: tuple[Scalar, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Index:
    """`float[1, 28, 28]`, `class[10]`."""

    name: str
    args: tuple[Scalar, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class List:
    """`[0.1, 0.01]` (only as an option's value)."""

    args: tuple[Scalar, ...]
    span: Span


Value = Union[Number, String, Word, Call, Index, List]


@dataclass(frozen=True)
class Option:
    """`key=value` (spaces around `=` allowed)."""

    key: str
    value: Value
    span: Span
    key_span: Span


@dataclass(frozen=True)
class Label:
    """`name:` before a statement (`trunk: dense 64`) or after its keyword (`input x: ...`)."""

    name: str
    span: Span


Item = Union[Number, String, Word, Call, Index, Option]


@dataclass(frozen=True)
class Block:
    """`{ statements }`; `span` runs from `{` to `}`."""

    statements: tuple["Statement", ...]
    span: Span


@dataclass(frozen=True)
class Statement:
    """`[label:] keyword items [{ block }]`.

    `keyword` is the first item when it is a word (None for `lr = uniform(0, 1)` in a search
    block); `label_first` tells `trunk: dense 64` from `input x: float[64]`.
    """

    keyword: Word | None
    items: tuple[Item, ...]
    label: Label | None
    block: Block | None
    span: Span
    label_first: bool = False
    commas: bool = False            # items were separated by commas (`freeze a, b`)


@dataclass(frozen=True)
class Syntax:
    """A whole .dln text: its top-level statements."""

    statements: tuple[Statement, ...]


# ---------------------------------------------------------------- spans
def token_span(token: Token) -> Span:
    return Span(token.line, token.column, token.end_line, token.end_column)


def join(first: Span, last: Span) -> Span:
    """The span from the start of `first` to the end of `last`."""
    return Span(first.line, first.column, last.end_line, last.end_column)


def _unquote(text: str) -> str:
    """The value of a string literal: `\\"`, `\\\\`, `\\n` and `\\t` are escapes."""
    escapes = {"n": "\n", "t": "\t"}
    out, chars = [], iter(text[1:-1])
    for c in chars:
        out.append(escapes.get(n, n) if c == "\\" and (n := next(chars, "")) else c)
    return "".join(out)


def _number(text: str, span: Span | None = None) -> int | float:
    if any(c in text for c in ".eE"):
        return float(text)
    try:
        return int(text)
    except ValueError:                      # more digits than Python converts (sys.int_info)
        digits = len(text.lstrip("-"))
        raise DlnError(f"a whole number of {digits} digits is too long; write it with an exponent, "
                       f"like 1e{digits - 1}", span=span) from None


def _args(args: tuple | None) -> tuple:
    return args if args is not None else ()


def _is_comma(child) -> bool:
    return isinstance(child, Token) and child.type == "COMMA"


# ---------------------------------------------------------------- the transformer
def make_statement(items: list, block: Block | None, commas: bool) -> Statement:
    """A statement from its items: pulls out the label and the keyword."""
    labels = [i for i, item in enumerate(items) if isinstance(item, Label)]
    if len(labels) > 1:
        extra = items[labels[1]]
        raise DlnError(f"a statement has at most one label; remove '{extra.name}:'", span=extra.span)
    label, label_first = None, False
    if labels:
        at = labels[0]
        label = items.pop(at)
        if at > 1 or (at == 1 and not isinstance(items[0], Word)):
            raise DlnError(f"a label '{label.name}:' stands at the start of a statement "
                           f"or right after its keyword", span=label.span)
        label_first = at == 0
        if not items:
            raise DlnError(f"'{label.name}:' labels nothing — write a statement after it",
                           span=label.span)
    keyword = items.pop(0) if isinstance(items[0], Word) else None
    start = label.span if label_first else (keyword or items[0]).span
    end = block.span if block else (items[-1].span if items else (keyword or label).span)
    if label and not label_first and not items and not block:
        end = label.span
    return Statement(keyword, tuple(items), label, block, join(start, end), label_first, commas)


class _ToSyntax(Transformer):
    """One-line constructors from Lark's reductions to the syntax tree."""

    @v_args(inline=True)
    def number(self, t):
        return Number(_number(t, token_span(t)), str(t), token_span(t))

    @v_args(inline=True)
    def string(self, t):
        return String(_unquote(str(t)), token_span(t))

    @v_args(inline=True)
    def word(self, t):
        return Word(str(t), token_span(t))

    @v_args(inline=True)
    def call(self, name, _lpar, args, rpar):
        return Call(str(name), _args(args), join(token_span(name), token_span(rpar)), token_span(name))

    @v_args(inline=True)
    def index(self, name, _lsqb, args, rsqb):
        return Index(str(name), _args(args), join(token_span(name), token_span(rsqb)), token_span(name))

    @v_args(inline=True)
    def list(self, lsqb, args, rsqb):
        return List(_args(args), join(token_span(lsqb), token_span(rsqb)))

    @v_args(inline=True)
    def option(self, key, value):
        return Option(str(key), value, join(token_span(key), value.span), token_span(key))

    @v_args(inline=True)
    def label(self, name, colon):
        return Label(str(name), join(token_span(name), token_span(colon)))

    def args(self, children):
        return tuple(c for c in children if not _is_comma(c))

    def statement(self, children):
        block = children.pop() if isinstance(children[-1], Block) else None
        items = [c for c in children if not _is_comma(c)]
        return make_statement(items, block, commas=len(items) < len(children))

    def block(self, children):
        return Block(tuple(children[1:-1]), join(token_span(children[0]), token_span(children[-1])))

    def start(self, children):
        return Syntax(tuple(children))


# ---------------------------------------------------------------- the parser
class _Conflicts(logging.Handler):
    """Collects the grammar conflicts Lark reports while it builds its LALR tables."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "conflict" in record.getMessage().lower():
            self.messages.append(record.getMessage())


def grammar_text() -> str:
    """grammars/dln.lark, read as package data."""
    return (importlib.resources.files("grammars") / "dln.lark").read_text(encoding="utf-8")


@functools.cache
def _parser() -> Lark:
    """The LALR parser; any shift/reduce or reduce/reduce conflict fails the build."""
    handler, level = _Conflicts(), lark.logger.level
    lark.logger.addHandler(handler)
    lark.logger.setLevel(logging.DEBUG)
    try:
        parser = Lark(grammar_text(), parser="lalr", lexer="contextual", transformer=_ToSyntax(),
                      maybe_placeholders=True)
    finally:
        lark.logger.removeHandler(handler)
        lark.logger.setLevel(level)
    if handler.messages:
        raise RuntimeError("grammars/dln.lark has LALR conflicts:\n" + "\n".join(handler.messages))
    return parser



def parse_syntax(text: str, path: str | None = None) -> Syntax:
    """The syntax tree of `text`; a syntax error is a `DlnError` located in `path`."""
    try:
        return _parser().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        raise _syntax_error(e, text).located(path, text) from None
    except DlnError as e:
        raise e.located(path, text) from None


# ---------------------------------------------------------------- friendly syntax errors
# What each terminal of the grammar is called in a message.
_TERMINALS = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "LBRACE": "'{'",
    "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "COLON": "':'", "COMMA": "','", "_EQUAL": "'='", "_SEP": "a new line or ';'",
    "$END": "the end of the file",
}
_VALUE = {"NAME", "NUMBER", "STRING"}
_ENDS = {"_SEP", "RBRACE", "$END"}


def _syntax_error(e: lark.exceptions.UnexpectedInput, text: str) -> DlnError:
    """The one place where Lark's parse errors become located, friendly messages."""
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        return _bad_character(text, e.pos_in_stream, Span.point(e.line, e.column))
    token = getattr(e, "token", None)
    expected = _narrow(set(getattr(e, "expected", ()) or ()), _stack(e))
    if token is None or isinstance(e, lark.exceptions.UnexpectedEOF) or token.type == "$END":
        return _unexpected_end(text, expected, _open(_stack(e), "LBRACE"))
    return DlnError(f"unexpected {_describe_token(token)} — expected {_describe_expected(expected)}",
                    span=_token_point(token))


def _bad_character(text: str, pos: int, span: Span) -> DlnError:
    char = text[pos] if 0 <= pos < len(text) else ""
    if char == '"':
        return DlnError("unterminated string — close it with '\"' on the same line", span=span)
    if char.isalpha():
        return DlnError(f"unexpected character '{char}' — names use the letters A-Z and a-z, "
                        f"digits and '_'", span=span)
    if char in "./\\":
        return DlnError(f"unexpected character '{char}' — write file names in double quotes, "
                        f'like "{_path_around(text, pos)}"', span=span)
    shown = char if char.isprintable() else f"U+{ord(char):04X}" if char else "end of input"
    return DlnError(f"unexpected character '{shown}'", span=span)


def _path_around(text: str, pos: int) -> str:
    """The file-name-like run of characters around `pos`."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./\\")
    start, end = pos, pos
    while start > 0 and text[start - 1] in allowed:
        start -= 1
    while end < len(text) and text[end] in allowed:
        end += 1
    return text[start:end]


def _unexpected_end(text: str, expected: set[str], braces: list[Token]) -> DlnError:
    span = _end_point(text)
    if braces:
        line = braces[-1].line
        return DlnError(f"unexpected end of file — expected '}}' to close the block opened at "
                        f"line {line}", span=span)
    return DlnError(f"unexpected end of file — expected {_describe_expected(expected)}", span=span)


def _stack(e: lark.exceptions.UnexpectedInput) -> list:
    """The parser's value stack when it stopped: syntax nodes and tokens not yet reduced."""
    return list(getattr(getattr(e, "state", None), "value_stack", None) or [])


_CLOSER = {"LBRACE": "RBRACE", "LPAR": "RPAR", "LSQB": "RSQB"}


def _open(stack: list, *kinds: str) -> list[Token]:
    """The opening brackets of these kinds still unclosed on the stack, innermost last."""
    opened: list[Token] = []
    for v in stack:
        if isinstance(v, Token) and v.type in kinds:
            opened.append(v)
        elif isinstance(v, Token) and opened and v.type == _CLOSER[opened[-1].type]:
            opened.pop()
    return opened


def _narrow(expected: set[str], stack: list) -> set[str]:
    """Keep only the closer of the innermost open `(` or `[` (LALR merges their states)."""
    if not {"RPAR", "RSQB"} <= expected:
        return expected
    inner = _open(stack, "LPAR", "LSQB")
    wrong = {"RPAR", "RSQB"} - {_CLOSER[inner[-1].type]} if inner else set()
    return expected - wrong


def _end_point(text: str) -> Span:
    """Just after the last character of the last non-blank line."""
    lines = text.rstrip().split("\n")
    return Span.point(len(lines), len(lines[-1].expandtabs(1)) + 1)


def _token_point(token: Token) -> Span:
    if token.type == "_SEP":
        return Span.point(token.line, token.column)
    return token_span(token)


def _describe_token(token: Token) -> str:
    if token.type == "_SEP":
        return "end of line" if token == "\n" else "';'"
    return f"'{token}'"


def _describe_expected(expected: set[str]) -> str:
    """What the parser could have taken, in words."""
    if _VALUE <= expected:
        if "LBRACE" in expected:
            return "a word, a number, a string, an option, '{' or the end of the statement"
        if expected & _ENDS and "COMMA" not in expected:
            return "a statement or '}'" if "RBRACE" in expected else "a statement"
        rest = sorted(_TERMINALS.get(t, t) for t in expected - _VALUE - {"LSQB"})
        return " or ".join(["a value"] + rest)
    words = sorted(_TERMINALS.get(t, repr(t)) for t in expected)
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)
