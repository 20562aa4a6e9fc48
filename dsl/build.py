"""The generic syntax tree to the typed `dsl.ast.Program`, checking what the language defines.

The top level is `model NAME` first, then in any order: `param`s, `data { }`, `input`,
`output`, `layers { }`, `train { }` (optional) and `search KIND { }` (optional), each once.
Params are collected (and `--set` overrides applied) before anything else is read, so a
param may be used above its declaration.
"""
from __future__ import annotations

from typing import Mapping

from . import ast
from .data import DATA_STATEMENTS, build_data, build_input, build_output
from .errors import DlnError, Span, did_you_mean
from .layers import LAYERS, build_layers
from .params import ParamDef, declare, override, scalar_of
from .read import no_block, no_label
from .syntax import Statement, Syntax, Word
from .train import TRAIN_STATEMENTS, build_search, build_train

TOP_LEVEL = ("model", "param", "data", "input", "output", "layers", "train", "search")
BLOCKS = ("data", "layers", "train")


def build_program(syntax: Syntax, overrides: Mapping[str, str] | None = None) -> ast.Program:
    """The program `syntax` declares, with params substituted and overrides applied."""
    statements = syntax.statements
    model = _model(statements)
    params = override(_params(statements), overrides or {})
    sections = _sections(statements[1:], statements[0].span)
    layers = build_layers(_block(sections["layers"], "layers"), params)
    names = tuple(layer.name for layer in layers)
    data = sections.get("data")
    train = sections.get("train")
    return ast.Program(
        name=model.name,
        params=tuple(ast.Param(p.name, scalar_of(p.value), p.span) for p in params.values()),
        data=build_data(_block(data, "data"), params, data.span) if data else None,
        input=build_input(sections["input"], params),
        output=build_output(sections["output"], params),
        layers=layers,
        train=build_train(_block(train, "train"), params, names, train.span) if train
        else ast.Train(),
        search=build_search(sections["search"], params) if "search" in sections else None,
        span=statements[0].span,
    )


def _model(statements: tuple[Statement, ...]) -> Word:
    """`model NAME`, which must be the first statement."""
    first = statements[0] if statements else None
    if first is None or first.keyword is None or first.keyword.name != "model":
        span = first.span if first else Span.point(1, 1)
        raise DlnError("a program starts with 'model NAME', like model digits_deep", span=span)
    no_label(first, "model")
    no_block(first, "model")
    if len(first.items) != 1 or not isinstance(first.items[0], Word):
        raise DlnError("write model NAME, with one name, like model digits_deep", span=first.span)
    return first.items[0]


def _params(statements: tuple[Statement, ...]) -> dict[str, ParamDef]:
    params: dict[str, ParamDef] = {}
    for stmt in statements:
        if stmt.keyword is not None and stmt.keyword.name == "param":
            param = declare(stmt, params)
            params[param.name] = param
    return params


def _sections(statements: tuple[Statement, ...], model: Span) -> dict[str, Statement]:
    """The top-level statements other than params, by keyword; each at most once."""
    sections: dict[str, Statement] = {}
    for stmt in statements:
        keyword = _top_keyword(stmt)
        if keyword == "param":
            continue
        if keyword in sections:
            raise DlnError(f"{_what(keyword)} is given twice (first at line "
                           f"{sections[keyword].span.line})", span=stmt.keyword.span)
        sections[keyword] = stmt
    for required in ("input", "output", "layers"):
        if required not in sections:
            raise DlnError(f"the program has no {required} — {_example(required)}", span=model)
    return sections


def _top_keyword(stmt: Statement) -> str:
    """The keyword of a top-level statement; a misplaced one says where it belongs."""
    if stmt.keyword is None:
        raise DlnError(f"a statement starts with a keyword — one of {', '.join(TOP_LEVEL)}",
                       span=stmt.span)
    keyword = stmt.keyword.name
    if keyword in TOP_LEVEL and keyword != "model":
        return keyword
    if keyword == "model":
        raise DlnError("model NAME is given twice; a file declares one model",
                       span=stmt.keyword.span)
    for block, table in (("layers", LAYERS), ("train", TRAIN_STATEMENTS),
                         ("data", DATA_STATEMENTS)):
        if keyword in table:
            raise DlnError(f"'{keyword}' belongs inside {block} {{ ... }}", span=stmt.keyword.span)
    hint = did_you_mean(keyword, TOP_LEVEL) or f" — the top level takes {', '.join(TOP_LEVEL)}"
    raise DlnError(f"unknown statement '{keyword}'{hint}", span=stmt.keyword.span)


def _block(stmt: Statement, keyword: str):
    """The `{ ... }` of a block statement, which takes no words."""
    no_label(stmt, keyword)
    if stmt.items:
        raise DlnError(f"{keyword} takes no words before its block: {keyword} {{ ... }}",
                       span=stmt.items[0].span)
    if stmt.block is None:
        raise DlnError(f"{keyword} needs a block: {keyword} {{ ... }}", span=stmt.span)
    return stmt.block


def _what(keyword: str) -> str:
    return f"the {keyword} block" if keyword in BLOCKS else f"{keyword}"


def _example(keyword: str) -> str:
    return {"input": "declare it like input x: float[64]",
            "output": "declare it like output y: class[10]",
            "layers": "write layers { dense 10 softmax }"}[keyword]
