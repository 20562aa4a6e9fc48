"""The `layers { ... }` block: one statement per layer, to `dsl.ast` layer nodes.

Each layer kind has one builder below, registered in `LAYERS` with its option keys and its
usage line. A layer is named by its label (`trunk: dense 64`) or `<kind>_<index>` by position
from 1 (`dense_1`, `maxpool_2`; recurrent layers use the cell name: `gru_2`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from . import ast
from .errors import DlnError, Span, did_you_mean
from .params import Params
from .read import Parts, at_most, choice, flag, integer, needed, no_block, parts, real, show, string
from .syntax import Block, Call, Statement, String, Value, Word

ACTIVATIONS = ("linear", "sigmoid", "tanh", "relu", "leaky_relu", "softmax")


@dataclass(frozen=True)
class LayerKind:
    build: Callable[[Parts, str], ast.Layer]    # (parts, name) -> layer
    options: tuple[str, ...]
    usage: str


# ---------------------------------------------------------------- activations
def activation(value: Value, params) -> ast.Activation:
    """`relu`, `leaky_relu` (slope 0.01) or `leaky_relu(0.2)`."""
    if isinstance(value, Call):
        kind = choice(Word(value.name, value.name_span), "activation", ACTIVATIONS)
        if kind != "leaky_relu" or len(value.args) != 1:
            usage = "leaky_relu(0.2)" if kind == "leaky_relu" else kind
            raise DlnError(f"write {usage} — only leaky_relu takes an argument, its slope",
                           span=value.span)
        alpha = real(value.args[0], "the leaky_relu slope", params, low=0.0)
        return ast.Activation("leaky_relu", alpha, value.span)
    return ast.Activation(choice(value, "activation", ACTIVATIONS), 0.01, value.span)


def _activation_at(p: Parts, i: int) -> tuple[ast.Activation, dict[str, Span]]:
    value = p.word(i)
    if value is None:
        return ast.Activation(), {}
    return activation(value, p.params), {"activation": value.span}


def _spans(p: Parts, **words: Value | None) -> dict[str, Span]:
    """Field → span for the given words and every option."""
    spans = {key: option.value.span for key, option in p.options.items()}
    spans.update({key: v.span for key, v in words.items() if v is not None})
    return spans


# ---------------------------------------------------------------- the layer kinds
def dense(p: Parts, name: str) -> ast.Layer:
    usage = "dense UNITS [ACTIVATION], like dense 64 relu"
    at_most(p, 2, usage)
    units_v = needed(p, p.word(0), "a number of units", usage)
    units = "vocab" if isinstance(units_v, Word) and units_v.name == "vocab" else \
        integer(units_v, "dense units", p.params)
    act, act_span = _activation_at(p, 1)
    return ast.Dense(name, p.span, _spans(p, units=units_v) | act_span, units=units, activation=act)


def conv(p: Parts, name: str) -> ast.Layer:
    usage = "conv FILTERS size=F [stride=S] [padding=valid|same|P] [ACTIVATION]"
    at_most(p, 2, usage)
    filters = integer(needed(p, p.word(0), "a number of filters", usage), "conv filters", p.params)
    size = integer(needed(p, p.value("size"), "a filter size", usage), "conv size", p.params)
    stride = integer(p.value("stride"), "conv stride", p.params) if "stride" in p.options else 1
    padding = _padding(p.value("padding"), p.params)
    act, act_span = _activation_at(p, 1)
    return ast.Conv(name, p.span, _spans(p, filters=p.word(0)) | act_span, filters=filters,
                    size=size, stride=stride, padding=padding, activation=act)


def _padding(value: Value | None, params) -> int | str:
    """valid (0), same, or a number of pixels P ≥ 0."""
    if value is None:
        return 0
    if isinstance(value, Word):
        return {"valid": 0, "same": "same"}[choice(value, "padding", ("valid", "same"))]
    return integer(value, "conv padding", params, low=0)


def pool(kind: str) -> Callable[[Parts, str], ast.Layer]:
    def build(p: Parts, name: str) -> ast.Layer:
        usage = f"{kind}pool size=F [stride=S]"
        at_most(p, 0, usage)
        size = integer(needed(p, p.value("size"), "a window size", usage), f"{kind}pool size",
                       p.params)
        stride = integer(p.value("stride"), f"{kind}pool stride", p.params) \
            if "stride" in p.options else size
        return ast.Pool(name, p.span, _spans(p), kind=kind, size=size, stride=stride)
    return build


def bare(node: type) -> Callable[[Parts, str], ast.Layer]:
    """Layers without words or options: flatten, one_hot, last."""
    def build(p: Parts, name: str) -> ast.Layer:
        at_most(p, 0, p.keyword)
        return node(name, p.span, _spans(p))
    return build


def dropout(p: Parts, name: str) -> ast.Layer:
    usage = "dropout keep_prob=P, like dropout keep_prob=0.8"
    at_most(p, 0, usage)
    keep = real(needed(p, p.value("keep_prob"), "keep_prob", usage), "keep_prob", p.params,
                low=0.0, high=1.0, open_low=True)
    return ast.Dropout(name, p.span, _spans(p), keep_prob=keep)


def batchnorm(p: Parts, name: str) -> ast.Layer:
    at_most(p, 0, "batchnorm [momentum=0.9] [eps=1e-5]")
    momentum = real(p.value("momentum"), "batchnorm momentum", p.params, 0.0, 1.0,
                    open_high=True) if "momentum" in p.options else 0.9
    eps = real(p.value("eps"), "batchnorm eps", p.params, low=0.0, open_low=True) \
        if "eps" in p.options else 1e-5
    return ast.BatchNorm(name, p.span, _spans(p), momentum=momentum, eps=eps)


def embed(p: Parts, name: str) -> ast.Layer:
    usage = "embed DIM, like embed 32"
    at_most(p, 1, usage)
    dim = integer(needed(p, p.word(0), "a dimension", usage), "embed dimension", p.params)
    return ast.Embed(name, p.span, _spans(p, dim=p.word(0)), dim=dim)


def recurrent(cell: str) -> Callable[[Parts, str], ast.Layer]:
    flags = ("tanh", "relu", "last") if cell == "rnn" else ("last",)

    def build(p: Parts, name: str) -> ast.Layer:
        usage = f"{cell} UNITS{' [tanh|relu]' if cell == 'rnn' else ''} [last]"
        at_most(p, 1 + len(flags) - (cell == "rnn"), usage)
        units = integer(needed(p, p.word(0), "a number of units", usage), f"{cell} units", p.params)
        words = [flag(p, w, flags) for w in p.words[1:]]
        _no_repeats(p, words)
        act = next((w for w in words if w != "last"), "tanh")
        return ast.Recurrent(name, p.span, _spans(p, units=p.word(0)), cell=cell, units=units,
                             activation=act, last="last" in words)
    return build


def _no_repeats(p: Parts, words: list[str]) -> None:
    for i, w in enumerate(words):
        clash = [v for v in words[:i] if v == w or {v, w} == {"tanh", "relu"}]
        if clash:
            raise DlnError(f"'{w}' conflicts with '{clash[0]}' before it", span=p.words[1 + i].span)


def pretrained(p: Parts, name: str) -> ast.Layer:
    usage = 'pretrained "FILE.onnx" [until="TENSOR"] [trainable]'
    at_most(p, 2, usage)
    path_v = needed(p, p.word(0), "an ONNX file", usage)
    if not isinstance(path_v, String) or not path_v.value.endswith(".onnx"):
        raise DlnError(f"pretrained takes an ONNX file in quotes, like \"model.onnx\"; got "
                       f"{show(path_v)}", span=path_v.span)
    until = string(p.value("until"), "until") if "until" in p.options else None
    trainable = p.word(1) is not None and flag(p, p.word(1), ("trainable",)) == "trainable"
    return ast.Pretrained(name, p.span, _spans(p, path=path_v), path=path_v.value, until=until,
                          trainable=trainable)


LAYERS: Mapping[str, LayerKind] = {
    "dense": LayerKind(dense, (), "dense UNITS [ACTIVATION]"),
    "conv": LayerKind(conv, ("size", "stride", "padding"), "conv FILTERS size=F ..."),
    "maxpool": LayerKind(pool("max"), ("size", "stride"), "maxpool size=F [stride=S]"),
    "avgpool": LayerKind(pool("avg"), ("size", "stride"), "avgpool size=F [stride=S]"),
    "flatten": LayerKind(bare(ast.Flatten), (), "flatten"),
    "dropout": LayerKind(dropout, ("keep_prob",), "dropout keep_prob=P"),
    "batchnorm": LayerKind(batchnorm, ("momentum", "eps"), "batchnorm [momentum=M] [eps=E]"),
    "embed": LayerKind(embed, (), "embed DIM"),
    "one_hot": LayerKind(bare(ast.OneHot), (), "one_hot"),
    "rnn": LayerKind(recurrent("rnn"), (), "rnn UNITS [tanh|relu] [last]"),
    "gru": LayerKind(recurrent("gru"), (), "gru UNITS [last]"),
    "lstm": LayerKind(recurrent("lstm"), (), "lstm UNITS [last]"),
    "last": LayerKind(bare(ast.Last), (), "last"),
    "pretrained": LayerKind(pretrained, ("until",), 'pretrained "FILE.onnx"'),
}


# ---------------------------------------------------------------- the block
def build_layers(block: Block, params: Params) -> tuple[ast.Layer, ...]:
    """The layers of `layers { ... }`, in order, each named; names must be unique."""
    layers: list[ast.Layer] = []
    names: dict[str, Span] = {}
    for index, stmt in enumerate(block.statements, start=1):
        layer = build_layer(stmt, index, params)
        name_span = stmt.label.span if stmt.label else stmt.span
        if layer.name in names:
            raise DlnError(f"duplicate layer name '{layer.name}' (first at line "
                           f"{names[layer.name].line}) — give this layer another name",
                           span=name_span)
        names[layer.name] = name_span
        layers.append(layer)
    if not layers:
        raise DlnError("layers is empty — write one layer per line, like dense 10 softmax",
                       span=block.span)
    return tuple(layers)


def build_layer(stmt: Statement, index: int, params: Params) -> ast.Layer:
    """One layer statement; `index` counts layers from 1."""
    if stmt.keyword is None:
        raise DlnError("a layer starts with its kind, like dense 64 relu", span=stmt.span)
    kind_name = stmt.keyword.name
    if kind_name not in LAYERS:
        hint = did_you_mean(kind_name, LAYERS) or f" — the layers are {', '.join(LAYERS)}"
        raise DlnError(f"unknown layer '{kind_name}'{hint}", span=stmt.keyword.span)
    if stmt.label and not stmt.label_first:
        raise DlnError(f"write the layer name first: {stmt.label.name}: {kind_name} ...",
                       span=stmt.label.span)
    no_block(stmt, kind_name)
    kind = LAYERS[kind_name]
    name = stmt.label.name if stmt.label else f"{kind_name}_{index}"
    return kind.build(parts(stmt, params, kind.options, kind.usage), name)
