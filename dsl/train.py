"""The `train { ... }` and `search KIND { ... }` blocks, to `dsl.ast.Train` and `dsl.ast.Search`.

Every train statement may appear once; what is left out keeps the default of `dsl.ast`
(adam lr=0.001, batch_size 32, epochs 10, seed 0, loss from the output type).
"""
from __future__ import annotations

from typing import Callable, Mapping

from . import ast
from .errors import DlnError, Span, did_you_mean
from .params import Params, scalar_of
from .read import (Parts, at_most, choice, each_once, integer, needed, no_label, parts, real,
                   show, single)
from .syntax import Block, Call, List, Number, Option, Statement, Word

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
METRICS = ("dev_loss", "dev_error")

# optimizer -> the options it takes (each a hyperparameter of `ast.Optimizer`)
OPTIMIZERS: Mapping[str, tuple[str, ...]] = {
    "sgd": ("lr",),
    "momentum": ("lr", "beta"),
    "rmsprop": ("lr", "beta2", "eps"),
    "adam": ("lr", "beta1", "beta2", "eps"),
}
DECAYS: Mapping[str, tuple[str, ...]] = {
    "inverse": ("rate",), "exponential": ("rate",), "step": ("every", "factor"),
}


# ---------------------------------------------------------------- train statements
def _kind(p: Parts, table: Mapping[str, tuple[str, ...]], what: str, usage: str) -> str:
    """The kind word of `optimizer adam ...`, `lr_decay step ...`; its options must fit it."""
    at_most(p, 1, usage)
    kind = choice(needed(p, p.word(0), f"a kind of {what}", usage), what, table)
    for key, option in p.options.items():
        if key not in table[kind]:
            takes = ", ".join(f"{k}=" for k in table[kind])
            hint = did_you_mean(key, table[kind]) or f" — {kind} takes {takes}"
            raise DlnError(f"{what} {kind} has no option '{key}'{hint}", span=option.key_span)
    return kind


def optimizer(p: Parts) -> ast.Optimizer:
    """`optimizer sgd|momentum|rmsprop|adam lr= beta= beta1= beta2= eps=`."""
    kind = _kind(p, OPTIMIZERS, "optimizer", "optimizer adam lr=0.001")
    ranges = {"lr": dict(low=0.0, open_low=True), "eps": dict(low=0.0, open_low=True),
              "beta": dict(low=0.0, high=1.0, open_high=True),
              "beta1": dict(low=0.0, high=1.0, open_high=True),
              "beta2": dict(low=0.0, high=1.0, open_high=True)}
    values = {key: real(option.value, key, p.params, **ranges[key])
              for key, option in p.options.items()}
    spans = {key: option.value.span for key, option in p.options.items()}
    return ast.Optimizer(kind, **values, span=p.span, spans={"kind": p.words[0].span} | spans)


def lr_decay(p: Parts) -> ast.LrDecay:
    """`lr_decay inverse rate=R | exponential rate=R | step every=E factor=F`."""
    kind = _kind(p, DECAYS, "lr_decay", "lr_decay inverse rate=1.0")
    rate = 1.0
    if "rate" in p.options:
        rate = real(p.value("rate"), "rate", p.params, low=0.0, high=1.0, open_low=True) \
            if kind == "exponential" else real(p.value("rate"), "rate", p.params, low=0.0)
    every = integer(p.value("every"), "every", p.params) if "every" in p.options else 1
    factor = real(p.value("factor"), "factor", p.params, 0.0, 1.0, open_low=True) \
        if "factor" in p.options else 0.5
    return ast.LrDecay(kind, rate, every, factor, span=p.span)


def regularize(p: Parts) -> ast.Regularize:
    """`regularize l2|l1 lambda=X` (λ ≥ 0)."""
    usage = "regularize l2 lambda=0.01"
    at_most(p, 1, usage)
    kind = choice(needed(p, p.word(0), "l2 or l1", usage), "regularization", ("l2", "l1"))
    lam = real(p.value("lambda"), "lambda", p.params, low=0.0) if "lambda" in p.options else 0.01
    return ast.Regularize(kind, lam, span=p.span)


def early_stopping(p: Parts) -> ast.EarlyStopping:
    """`early_stopping patience=N metric=dev_loss|dev_error`."""
    at_most(p, 0, "early_stopping patience=5 metric=dev_loss")
    patience = integer(p.value("patience"), "patience", p.params) if "patience" in p.options else 5
    metric = choice(p.value("metric"), "metric", METRICS) if "metric" in p.options else "dev_loss"
    return ast.EarlyStopping(patience, metric, span=p.span)


def batch_size(p: Parts, value) -> int | str:
    """A whole number ≥ 1, or `full` (the whole training set)."""
    if isinstance(value, Word) and value.name == "full":
        return "full"
    if isinstance(value, Word) and did_you_mean(value.name, ("full",)):
        raise DlnError(f"unknown batch_size '{value.name}' — did you mean 'full'?", span=value.span)
    return integer(value, "batch_size", p.params)


# keyword -> (Train field, option keys, builder); freeze is read apart (its words are names).
TRAIN_STATEMENTS: Mapping[str, tuple[str, tuple[str, ...], Callable[[Parts], object]]] = {
    "loss": ("loss", (), single(lambda p, v: choice(v, "loss", LOSSES), "loss cross_entropy")),
    "optimizer": ("optimizer", ("lr", "beta", "beta1", "beta2", "eps"), optimizer),
    "lr_decay": ("lr_decay", ("rate", "every", "factor"), lr_decay),
    "batch_size": ("batch_size", (), single(batch_size, "batch_size 64 (or full)")),
    "epochs": ("epochs", (), single(lambda p, v: integer(v, "epochs", p.params), "epochs 30")),
    "regularize": ("regularize", ("lambda",), regularize),
    "early_stopping": ("early_stopping", ("patience", "metric"), early_stopping),
    "clip_norm": ("clip_norm", (), single(lambda p, v: real(v, "clip_norm", p.params, low=0.0,
                                                          open_low=True), "clip_norm 5.0")),
    "freeze": ("freeze", (), None),
    "seed": ("seed", (), single(lambda p, v: integer(v, "seed", p.params, low=0), "seed 0")),
}


def freeze(stmt: Statement, layer_names: tuple[str, ...]) -> tuple[str, ...]:
    """`freeze trunk, dense_2`: layer names, each one of the program's layers."""
    p = parts(stmt, {}, (), substitute_words=False)
    if not p.words:
        raise DlnError("freeze needs layer names: freeze trunk, dense_2", span=stmt.span)
    names = []
    for word in p.words:
        if not isinstance(word, Word):
            raise DlnError(f"freeze takes layer names, not {show(word)}", span=word.span)
        if word.name not in layer_names:
            hint = did_you_mean(word.name, layer_names) or \
                f" — the layers are {', '.join(layer_names)}"
            raise DlnError(f"unknown layer '{word.name}' in freeze{hint}", span=word.span)
        names.append(word.name)
    return tuple(dict.fromkeys(names))


def build_train(block: Block, params: Params, layer_names: tuple[str, ...],
                span: Span) -> ast.Train:
    """`train { ... }`: each statement at most once."""
    def build(keyword: str, stmt: Statement):
        if keyword == "freeze":
            return freeze(stmt, layer_names)
        _, options, make = TRAIN_STATEMENTS[keyword]
        return make(parts(stmt, params, options))
    fields, spans = each_once(block, TRAIN_STATEMENTS, "train", build)
    return ast.Train(**fields, span=span, spans=spans)


# ---------------------------------------------------------------- search
SEARCH_OPTIONS = {"random": ("trials", "rounds", "metric"), "grid": ("rounds", "metric")}
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")


def build_search(stmt: Statement, params: Params) -> ast.Search:
    """`search random trials=N rounds=R metric=M { dims }` or `search grid { dims }`."""
    usage = "search random trials=20 { lr = log_uniform(1e-4, 1e-1) }"
    no_label(stmt, "search")
    p = parts(stmt, params, ("trials", "rounds", "metric"), usage)
    kind = _kind(p, SEARCH_OPTIONS, "search", usage)
    if stmt.block is None:
        raise DlnError(f"search needs a block of params to search: {usage}", span=stmt.span)
    trials = integer(p.value("trials"), "trials", p.params) if "trials" in p.options else 10
    rounds = integer(p.value("rounds"), "rounds", p.params) if "rounds" in p.options else 1
    metric = choice(p.value("metric"), "metric", METRICS) if "metric" in p.options else "dev_error"
    dims = _dims(stmt.block, kind, params)
    return ast.Search(kind, trials, rounds, metric, dims, span=stmt.span)


def _dims(block: Block, kind: str, params: Params) -> tuple[ast.SearchDim, ...]:
    dims: dict[str, ast.SearchDim] = {}
    for stmt in block.statements:
        dim = search_dim(stmt, kind, params)
        if dim.name in dims:
            raise DlnError(f"param '{dim.name}' is searched twice (first at line "
                           f"{dims[dim.name].span.line})", span=stmt.span)
        dims[dim.name] = dim
    if not dims:
        raise DlnError("search needs at least one param, like lr = log_uniform(1e-4, 1e-1)",
                       span=block.span)
    return tuple(dims.values())


def search_dim(stmt: Statement, kind: str, params: Params) -> ast.SearchDim:
    """`NAME = uniform(a, b)` (random) or `NAME = [v, ...]` (grid); NAME a declared param."""
    example = "lr = log_uniform(1e-4, 1e-1)" if kind == "random" else "lr = [0.1, 0.01]"
    if stmt.keyword or stmt.label or stmt.block or len(stmt.items) != 1 \
            or not isinstance(stmt.items[0], Option):
        raise DlnError(f"write each searched param as {example}", span=stmt.span)
    option = stmt.items[0]
    if option.key not in params:
        hint = did_you_mean(option.key, params) or \
            f" — declare it first: param {option.key} = VALUE"
        raise DlnError(f"unknown param '{option.key}' in search{hint}", span=option.key_span)
    value = option.value
    if kind == "grid":
        if not isinstance(value, List) or not value.args:
            raise DlnError(f"a grid search lists the values to try: {example}", span=value.span)
        args = _scalars(value.args, params[option.key].value)
        return ast.SearchDim(option.key, "grid", args, span=stmt.span)
    if not isinstance(value, Call):
        raise DlnError(f"a random search draws from a distribution — "
                       f"{', '.join(DISTRIBUTIONS)} — like {example}", span=value.span)
    dist = choice(Word(value.name, value.name_span), "distribution", DISTRIBUTIONS)
    args = _scalars(value.args, params[option.key].value)
    _check_distribution(dist, args, value)
    return ast.SearchDim(option.key, dist, args, span=stmt.span)


def _scalars(args: tuple, declared) -> tuple[ast.Scalar, ...]:
    """The values of a distribution or list; a numeric param takes numbers only."""
    for a in args:
        if isinstance(declared, Number) and not isinstance(a, Number):
            raise DlnError(f"this param is a number; {show(a)} is not", span=a.span)
    return tuple(scalar_of(a) for a in args)


def _check_distribution(dist: str, args: tuple, at: Call) -> None:
    """uniform(a, b) with a < b; log_uniform with 0 < a < b; int_uniform whole a ≤ b; choice(...)."""
    if dist == "choice":
        if not args:
            raise DlnError("choice needs values, like choice(32, 64, 128)", span=at.span)
        return
    numeric = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                      for a in args)
    if not numeric:
        raise DlnError(f"{dist} takes two numbers: {dist}(low, high)", span=at.span)
    low, high = args
    if dist == "int_uniform" and (float(low) != int(low) or float(high) != int(high) or low > high):
        raise DlnError("int_uniform takes whole numbers low ≤ high", span=at.span)
    if dist != "int_uniform" and not low < high:
        raise DlnError(f"{dist} needs low < high", span=at.span)
    if dist == "log_uniform" and low <= 0:
        raise DlnError("log_uniform needs 0 < low < high", span=at.span)
