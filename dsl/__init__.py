"""The dlnc front end: .dln text to the typed AST (`dsl.ast.Program`).

    load(text, path=None, overrides=None) -> Program    # parse, check, substitute params
    load_file(path, overrides=None) -> Program
    format_source(text, path=None) -> str               # the canonical form (`dlnc fmt`)
    parse_syntax(text, path=None) -> Syntax             # the generic syntax tree

Every user error is a `DlnError` carrying the path, the source text and a `Span`.
"""
from __future__ import annotations

from typing import Mapping

from . import ast
from .build import build_program
from .errors import DlnError, Span
from .format import format_syntax
from .syntax import parse_syntax

__all__ = ["DlnError", "Span", "ast", "format_source", "load", "load_file", "parse_syntax"]


def load(text: str, path: str | None = None,
         overrides: Mapping[str, str] | None = None) -> ast.Program:
    """The program in `text`; `overrides` are `--set NAME=VALUE` pairs for its params."""
    text = text.removeprefix("\ufeff")
    try:
        program = build_program(parse_syntax(text, path), overrides)
    except DlnError as e:
        raise e.located(path, text) from None
    return _with_origin(program, path, text)


def _with_origin(program: ast.Program, path: str | None, text: str) -> ast.Program:
    from dataclasses import replace
    return replace(program, path=path, source=text)


def load_file(path: str, overrides: Mapping[str, str] | None = None) -> ast.Program:
    """The program in the file `path` (UTF-8)."""
    return load(read_source(path), path, overrides)


def read_source(path: str) -> str:
    """The text of a .dln file; a missing or unreadable file is a `DlnError` naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DlnError("no such file", path=str(path)) from None
    except IsADirectoryError:
        raise DlnError("is a folder, not a .dln file", path=str(path)) from None
    except OSError as e:
        raise DlnError(f"cannot read the file: {e.strerror or e}", path=str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DlnError(f"not UTF-8 text: byte 0x{data[e.start]:02x} on line {line} — save the "
                       f"file as UTF-8", path=str(path)) from None


def format_source(text: str, path: str | None = None) -> str:
    """The canonical form of `text`: parse(format_source(x)) == parse(x)."""
    text = text.removeprefix("\ufeff")
    return format_syntax(parse_syntax(text, path), text)
