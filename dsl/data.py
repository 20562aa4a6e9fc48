"""The `data { ... }` block and the `input` / `output` declarations, to `dsl.ast` nodes.

Sources: a built-in name (digits, breast_cancer, iris, wine, moons, circles), a `.npz`
file, a `.csv` file with `label=COLUMN`, a folder of images (ends with `/` or has no
extension), or a text file read with `text [level=char|word]`.
"""
from __future__ import annotations

import math
import posixpath
from typing import Callable, Mapping

from . import ast
from .errors import DlnError, Span
from .params import Params
from .read import (Parts, at_most, choice, each_once, flag, integer, needed, no_block, parts,
                   real, show, single, string)
from .syntax import Block, Index, Statement, String, Value, Word

BUILTINS = ("digits", "breast_cancer", "iris", "wine", "moons", "circles")


# ---------------------------------------------------------------- sources
def source(p: Parts) -> ast.Source:
    """`source "digits" | "x.npz" | "t.csv" label=COL | "images/" | "f.txt" text [level=char]`."""
    usage = 'source "digits" or "file.npz", "table.csv" label=COLUMN, "folder/", "file.txt" text'
    at_most(p, 2, usage)
    path_v = needed(p, p.word(0), "a built-in name or a file in quotes", usage)
    path = string(path_v, "the source")
    is_text = p.word(1) is not None and flag(p, p.word(1), ("text",)) == "text"
    kind = "text" if is_text else _source_kind(path, path_v)
    _source_options(p, kind)
    label = string(p.value("label"), "label") if "label" in p.options else None
    level = choice(p.value("level"), "text level", ("char", "word")) if is_text else None
    if kind == "text" and level is None:
        level = "char"
    return ast.Source(kind, path, label=label, level=level, span=p.span)


def _source_kind(path: str, at: Value) -> str:
    extension = posixpath.splitext(path.replace("\\", "/"))[1].lower()
    if path in BUILTINS:
        return "builtin"
    if path.endswith("/") or not extension:
        return "images"
    kinds = {".npz": "npz", ".csv": "csv"}
    if extension in kinds:
        return kinds[extension]
    if extension == ".txt":
        raise DlnError(f'a text source needs the word text: source "{path}" text level=char',
                       span=at.span)
    raise DlnError(f"unknown kind of source '{extension}' — use a built-in "
                   f"({', '.join(BUILTINS)}), a .npz or .csv file, a folder of images ending "
                   f"in '/', or a text file with the word text", span=at.span)


def _source_options(p: Parts, kind: str) -> None:
    """label= belongs to csv sources, level= to text ones."""
    if kind == "csv" and "label" not in p.options:
        raise DlnError('a .csv source needs its label column: source "table.csv" label=COLUMN',
                       span=p.span)
    for key, needs in (("label", "csv"), ("level", "text")):
        if key in p.options and kind != needs:
            raise DlnError(f"option '{key}' is for {needs} sources only",
                           span=p.options[key].key_span)


# ---------------------------------------------------------------- the other data statements
def split(p: Parts) -> ast.Split:
    """`split train=F dev=F [test=F]`: fractions in (0, 1] adding up to 1; missing ones are 0."""
    at_most(p, 0, "split train=0.8 dev=0.1 test=0.1")
    needed(p, p.value("train"), "a train fraction", "split train=0.8 dev=0.1 test=0.1")
    fractions = {key: real(p.value(key), f"the {key} fraction", p.params, 0.0, 1.0, open_low=True)
                 for key in ("train", "dev", "test") if key in p.options}
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6, rel_tol=0.0):
        raise DlnError(f"the split fractions add up to {total:g}, not 1", span=p.span)
    return ast.Split(fractions.get("train", 0.0), fractions.get("dev", 0.0),
                     fractions.get("test", 0.0), span=p.span)


def augment(p: Parts) -> ast.Augment:
    """`augment [flip=horizontal|vertical] [crop=N] [translate=N]`."""
    usage = "augment flip=horizontal crop=2 translate=1"
    at_most(p, 0, usage)
    if not p.options:
        raise DlnError(f"augment needs at least one option: {usage}", span=p.span)
    flip = choice(p.value("flip"), "flip", ("horizontal", "vertical")) if "flip" in p.options \
        else None
    crop = integer(p.value("crop"), "crop", p.params, low=0) if "crop" in p.options else 0
    translate = integer(p.value("translate"), "translate", p.params, low=0) \
        if "translate" in p.options else 0
    return ast.Augment(flip, crop, translate, span=p.span)


def _normalize(p: Parts) -> bool:
    at_most(p, 0, "normalize")
    return True


# keyword -> (Data field, option keys, builder)
DATA_STATEMENTS: Mapping[str, tuple[str, tuple[str, ...], Callable[[Parts], object]]] = {
    "source": ("source", ("label", "level"), source),
    "split": ("split", ("train", "dev", "test"), split),
    "train_dev": ("train_dev", (), single(lambda p, v: real(v, "train_dev", p.params, 0.0, 1.0,
                                                          open_low=True, open_high=True),
                                        "train_dev 0.05")),
    "dev_source": ("dev_source", ("label", "level"), source),
    "test_source": ("test_source", ("label", "level"), source),
    "normalize": ("normalize", (), _normalize),
    "augment": ("augment", ("flip", "crop", "translate"), augment),
    "human_error": ("human_error", (), single(lambda p, v: real(v, "human_error", p.params, 0.0,
                                                              1.0), "human_error 0.01")),
    "sequence_length": ("sequence_length", (), single(
        lambda p, v: integer(v, "sequence_length", p.params), "sequence_length 32")),
    "vocab_size": ("vocab_size", (), single(lambda p, v: integer(v, "vocab_size", p.params),
                                          "vocab_size 5000")),
}


def build_data(block: Block, params: Params, span: Span) -> ast.Data:
    """`data { ... }`: each statement at most once; `source` required."""
    def build(keyword: str, stmt: Statement):
        _, options, make = DATA_STATEMENTS[keyword]
        return make(parts(stmt, params, options))
    fields, spans = each_once(block, DATA_STATEMENTS, "data", build)
    if "source" not in fields:
        raise DlnError('data needs a source, like source "digits"', span=span)
    return ast.Data(**fields, span=span, spans=spans)


# ---------------------------------------------------------------- input and output
def _declared(stmt: Statement, params: Params, what: str, usage: str) -> tuple[str, Parts]:
    """The name and the type words of `input NAME: TYPE` / `output NAME: TYPE`."""
    no_block(stmt, what)
    if stmt.label is None or stmt.label_first:
        raise DlnError(f"write {usage}", span=stmt.span)
    p = parts(stmt, params, (), usage)
    needed(p, p.word(0), "a type", usage)
    return stmt.label.name, p


def build_input(stmt: Statement, params: Params) -> ast.InputDecl:
    """`input x: float[64]`, `float[C, H, W]` or `tokens`."""
    usage = "input x: float[64] (or float[1, 28, 28], or tokens)"
    name, p = _declared(stmt, params, "input", usage)
    at_most(p, 1, usage)
    t = p.word(0)
    if isinstance(t, Index) and t.name == "float":
        if not t.args:
            raise DlnError("float needs a shape, like float[64]", span=t.span)
        shape = tuple(integer(a, "an input dimension", p.params) for a in t.args)
        return ast.InputDecl(name, "float", shape, span=stmt.span)
    kind = choice(_head(t), "input type", ("float", "tokens"))
    if kind == "float" or isinstance(t, Index):
        raise DlnError("write float[64] for vectors, float[C, H, W] for images, or tokens",
                       span=t.span)
    return ast.InputDecl(name, "tokens", (), span=stmt.span)


def build_output(stmt: Statement, params: Params) -> ast.OutputDecl:
    """`output y: binary | class[C] | class[cat, dog] | real[K] | tokens per_step`."""
    usage = "output y: binary (or class[10], real[3], tokens per_step)"
    name, p = _declared(stmt, params, "output", usage)
    at_most(p, 2, usage)
    t = p.word(0)
    kind = choice(_head(t), "output type", ("binary", "class", "real", "tokens"))
    sized = kind in ("class", "real")
    if sized != isinstance(t, Index) or (kind != "tokens" and p.word(1) is not None):
        raise DlnError(f"write {'binary' if kind == 'binary' else _sized_usage(kind)}",
                       span=t.span if p.word(1) is None else p.word(1).span)
    if kind == "tokens":
        step = p.word(1)
        if step is None or flag(p, step, ("per_step",)) != "per_step":
            raise DlnError("write tokens per_step: the next token at every step", span=t.span)
        return ast.OutputDecl(name, "tokens", 0, per_step=True, span=stmt.span)
    if kind == "binary":
        return ast.OutputDecl(name, "binary", 1, span=stmt.span)
    return _sized_output(name, kind, t, p, stmt.span)


def _sized_output(name: str, kind: str, t: Index, p: Parts, span: Span) -> ast.OutputDecl:
    """class[10], class[cat, dog] (the labels), real[3]."""
    if not t.args:
        raise DlnError(f"write {_sized_usage(kind)}", span=t.span)
    if kind == "class" and all(isinstance(a, (Word, String)) for a in t.args):
        labels = tuple(string(a, "a class label") for a in t.args)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise DlnError("class labels must be two or more distinct names, like class[cat, dog]",
                           span=t.span)
        return ast.OutputDecl(name, "class", len(labels), labels=labels, span=span)
    if len(t.args) != 1:
        raise DlnError(f"write {_sized_usage(kind)}", span=t.span)
    low = 2 if kind == "class" else 1
    size = integer(t.args[0], f"the number of {'classes' if kind == 'class' else 'targets'}",
                   p.params, low=low)
    return ast.OutputDecl(name, kind, size, span=span)


def _sized_usage(kind: str) -> str:
    return {"class": "class[10] (the number of classes) or class[cat, dog]",
            "real": "real[3] (the number of targets)",
            "tokens": "tokens per_step"}.get(kind, kind)


def _head(t: Value) -> Word:
    """The type's name as a word (`class` of `class[10]`)."""
    if isinstance(t, Index):
        return Word(t.name, t.name_span)
    if isinstance(t, Word):
        return t
    raise DlnError(f"expected a type, not {show(t)}", span=t.span)
