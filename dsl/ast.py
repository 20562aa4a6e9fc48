"""The typed AST of a .dln program: frozen dataclasses, params already substituted.

`dsl.load` builds a `Program` from text. Every node keeps the `Span` of its statement, and
`spans` maps a field name (an option such as `lr`, or a word position such as `units`) to the
span of the text that gave it, so later stages can point errors at the exact word.
Defaults documented in docs/language.md are filled in here, so consumers never guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Union

from .errors import Span

NO_SPANS: Mapping[str, Span] = MappingProxyType({})


def _spans() -> Mapping[str, Span]:
    return field(default_factory=lambda: NO_SPANS, compare=False, repr=False)


# ---------------------------------------------------------------- values and params
Scalar = Union[int, float, str, bool]


@dataclass(frozen=True)
class Param:
    """`param NAME = VALUE`; `value` is after any --set override."""

    name: str
    value: Scalar
    span: Span = field(compare=False)


# ---------------------------------------------------------------- data
@dataclass(frozen=True)
class Source:
    """Where examples come from. kind: builtin | npz | csv | images | text."""

    kind: str
    path: str                      # built-in name, or the path as written (relative to the .dln)
    label: str | None = None       # csv: the label column
    level: str | None = None       # text: char | word
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Split:
    """Fractions of the (primary) source; they add up to 1."""

    train: float = 0.8
    dev: float = 0.1
    test: float = 0.1
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Augment:
    flip: str | None = None        # horizontal | vertical
    crop: int = 0
    translate: int = 0
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Data:
    source: Source
    split: Split = Split()
    train_dev: float = 0.0
    dev_source: Source | None = None
    test_source: Source | None = None
    normalize: bool = False
    augment: Augment | None = None
    human_error: float | None = None
    sequence_length: int | None = None
    vocab_size: int | None = None
    span: Span | None = field(default=None, compare=False)
    spans: Mapping[str, Span] = _spans()


# ---------------------------------------------------------------- input and output
@dataclass(frozen=True)
class InputDecl:
    """`input x: float[64]` (kind float, shape (64,)), `float[1, 8, 8]`, or `tokens` (shape ())."""

    name: str
    kind: str                      # float | tokens
    shape: tuple[int, ...]
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class OutputDecl:
    """`output y: binary | class[C] | real[K] | tokens per_step`."""

    name: str
    kind: str                      # binary | class | real | tokens
    size: int                      # binary 1, class C, real K, tokens 0 (the vocabulary's)
    per_step: bool = False
    labels: tuple[str, ...] = ()   # class names, when the program gives them (class[cat, dog])
    span: Span | None = field(default=None, compare=False)


# ---------------------------------------------------------------- layers
@dataclass(frozen=True)
class Activation:
    """linear | sigmoid | tanh | relu | leaky_relu | softmax; `alpha` for leaky_relu."""

    kind: str = "linear"
    alpha: float = 0.01
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Layer:
    """Common fields: `name` (given as `name: ...` or `<kind>_<index>`), the statement span."""

    name: str
    span: Span = field(compare=False)
    spans: Mapping[str, Span] = _spans()


@dataclass(frozen=True)
class Dense(Layer):
    units: int | str = 1           # an int, or "vocab"
    activation: Activation = Activation()


@dataclass(frozen=True)
class Conv(Layer):
    filters: int = 1
    size: int = 1
    stride: int = 1
    padding: int | str = 0         # an int, or "same"
    activation: Activation = Activation()


@dataclass(frozen=True)
class Pool(Layer):
    kind: str = "max"              # max | avg
    size: int = 2
    stride: int = 2


@dataclass(frozen=True)
class Flatten(Layer):
    pass


@dataclass(frozen=True)
class Dropout(Layer):
    keep_prob: float = 1.0


@dataclass(frozen=True)
class BatchNorm(Layer):
    momentum: float = 0.9          # running = momentum · running + (1 − momentum) · batch
    eps: float = 1e-5


@dataclass(frozen=True)
class Embed(Layer):
    dim: int = 1


@dataclass(frozen=True)
class OneHot(Layer):
    pass


@dataclass(frozen=True)
class Recurrent(Layer):
    cell: str = "rnn"              # rnn | gru | lstm
    units: int = 1
    activation: str = "tanh"       # rnn only: tanh | relu
    last: bool = False             # return only the last step


@dataclass(frozen=True)
class Last(Layer):
    """`last`: keep only the last time step of a sequence."""


@dataclass(frozen=True)
class Pretrained(Layer):
    path: str = ""
    until: str | None = None
    trainable: bool = False


# ---------------------------------------------------------------- train
@dataclass(frozen=True)
class Optimizer:
    """sgd | momentum | rmsprop | adam, with the notes' hyperparameters."""

    kind: str = "adam"
    lr: float = 0.001
    beta: float = 0.9              # momentum
    beta1: float = 0.9             # adam
    beta2: float = 0.999           # rmsprop, adam
    eps: float = 1e-8              # rmsprop, adam
    span: Span | None = field(default=None, compare=False)
    spans: Mapping[str, Span] = _spans()


@dataclass(frozen=True)
class LrDecay:
    """inverse: α0/(1 + rate·epoch); exponential: α0·rate^epoch; step: α0·factor^floor(epoch/every)."""

    kind: str
    rate: float = 1.0
    every: int = 1
    factor: float = 0.5
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Regularize:
    """l2: λ/(2m)·Σ‖W‖²; l1: λ/m·Σ|W| (m: the mini-batch size)."""

    kind: str                      # l2 | l1
    lam: float = 0.01
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class EarlyStopping:
    patience: int = 5
    metric: str = "dev_loss"       # dev_loss | dev_error
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Train:
    loss: str | None = None        # None: the output type's default
    optimizer: Optimizer = Optimizer()
    lr_decay: LrDecay | None = None
    batch_size: int | str = 32     # an int, or "full"
    epochs: int = 10
    regularize: Regularize | None = None
    early_stopping: EarlyStopping | None = None
    clip_norm: float | None = None
    freeze: tuple[str, ...] = ()
    seed: int = 0
    span: Span | None = field(default=None, compare=False)
    spans: Mapping[str, Span] = _spans()


# ---------------------------------------------------------------- search
@dataclass(frozen=True)
class SearchDim:
    """One searched param: dist is uniform | log_uniform | int_uniform | choice | grid."""

    name: str
    dist: str
    args: tuple[Scalar, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Search:
    kind: str                      # random | grid
    trials: int = 10
    rounds: int = 1
    metric: str = "dev_error"
    dims: tuple[SearchDim, ...] = ()
    span: Span | None = field(default=None, compare=False)


# ---------------------------------------------------------------- program
@dataclass(frozen=True)
class Program:
    name: str
    params: tuple[Param, ...]
    data: Data | None
    input: InputDecl
    output: OutputDecl
    layers: tuple[Layer, ...]
    train: Train
    search: Search | None = None
    path: str | None = field(default=None, compare=False)      # the .dln file, for messages
    source: str | None = field(default=None, compare=False)    # its text, for carets
    span: Span | None = field(default=None, compare=False)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)
