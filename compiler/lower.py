"""Lowering: the layers of a typed AST program to forward IR, with shapes checked.

One lowering rule per layer kind. A rule takes the context and the incoming activation and
returns the layer's output, named after the layer, so `dense_3` is both the IR value and the
exported tensor. Parameters are created through the context: `dense_3.W` has the course's
shape (n[l], n[l−1]) (which is also ONNX Gemm's transB layout), `dense_3.b` is (n[l],).
Initialisation is seeded: He (variance 2/n[l−1]) for the relu family, Xavier (1/n[l−1])
otherwise, biases zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dsl import ast
from dsl.errors import DlnError, Span

from .ir import Builder, Value
from .shapes import ShapeError

RELU_FAMILY = frozenset({"relu", "leaky_relu"})


@dataclass(frozen=True)
class ParamSpec:
    """A learned tensor: `dense_1.W` etc., with its initial value."""

    name: str
    layer: str
    role: str                 # W | b | gamma | beta
    init: np.ndarray
    regularized: bool         # weights only: never biases, γ or β


@dataclass(frozen=True)
class BufferSpec:
    """Non-learned state that training updates (batchnorm's running statistics)."""

    name: str
    init: np.ndarray


@dataclass(frozen=True)
class LayerInfo:
    """One layer as `dlnc shapes` prints it (shapes batch-first, "N" for the batch)."""

    name: str
    kind: str
    params: tuple[tuple[str, tuple[int, ...]], ...]
    output: tuple
    flops: int                # per example, forward: 2 per multiply-add


@dataclass(frozen=True)
class Normalization:
    mean: np.ndarray
    std: np.ndarray


@dataclass
class LowerContext:
    """What a lowering pass collects while it walks the layers (one per pass)."""

    b: Builder
    program: ast.Program
    training: bool
    rng: np.random.Generator
    params: list[ParamSpec] = field(default_factory=list)
    param_values: dict[str, Value] = field(default_factory=dict)
    buffers: list[BufferSpec] = field(default_factory=list)
    buffer_values: dict[str, Value] = field(default_factory=dict)
    buffer_updates: dict[str, Value] = field(default_factory=dict)
    hyper: dict[str, Value] = field(default_factory=dict)
    hyper_defaults: dict[str, float] = field(default_factory=dict)
    noise: list[Value] = field(default_factory=list)
    infos: list[LayerInfo] = field(default_factory=list)
    pre_activation: dict[str, Value] = field(default_factory=dict)

    def param(self, layer: ast.Layer, role: str, init: np.ndarray, regularized: bool) -> Value:
        name = f"{layer.name}.{role}"
        init = init.astype(self.b.dtype)
        self.params.append(ParamSpec(name, layer.name, role, init, regularized))
        value = self.b.input(name, init.shape)
        self.param_values[name] = value
        return value

    def buffer(self, layer: ast.Layer, role: str, init: np.ndarray) -> Value:
        name = f"{layer.name}.{role}"
        self.buffers.append(BufferSpec(name, init.astype(self.b.dtype)))
        value = self.b.input(name, init.shape)
        self.buffer_values[name] = value
        return value

    def hyperparameter(self, name: str, default: float) -> Value:
        """A scalar graph input, so one compiled graph serves every value of it."""
        if name not in self.hyper:
            self.hyper[name] = self.b.input(name, ())
            self.hyper_defaults[name] = float(default)
        return self.hyper[name]


def error(message: str, span: Span | None, program: ast.Program) -> DlnError:
    return DlnError(message, span=span, path=program.path, source=program.source)


def describe(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


# ---------------------------------------------------------------- activations
ACTIVATIONS: dict[str, Callable[[Builder, Value, ast.Activation, str], Value]] = {
    "linear": lambda b, z, act, name: b.op("identity", z, name=name),
    "sigmoid": lambda b, z, act, name: b.op("sigmoid", z, name=name),
    "tanh": lambda b, z, act, name: b.op("tanh", z, name=name),
    "relu": lambda b, z, act, name: b.op("relu", z, name=name),
    "leaky_relu": lambda b, z, act, name: b.op("leaky_relu", z, alpha=float(act.alpha), name=name),
    "softmax": lambda b, z, act, name: b.op("softmax", z, axis=-1, name=name),
}


def init_weights(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, activation: str) -> np.ndarray:
    """He: N(0, 2/fan_in) for the relu family; Xavier: N(0, 1/fan_in) otherwise."""
    variance = (2.0 if activation in RELU_FAMILY else 1.0) / fan_in
    return rng.normal(0.0, np.sqrt(variance), size=shape)


# ---------------------------------------------------------------- layer rules
def lower_dense(ctx: LowerContext, layer: ast.Dense, a: Value) -> Value:
    b = ctx.b
    if a.rank != 2:
        raise error(f"{layer.name} (dense) takes (N, features) but its input is {describe(a.shape)}; "
                    f"write `flatten` before it", layer.span, ctx.program)
    units = layer.units
    if units == "vocab":
        raise error("`vocab` is defined by text data, which is not available yet; write the number of units",
                    layer.spans.get("units", layer.span), ctx.program)
    n_in = int(a.shape[1])
    w = ctx.param(layer, "W", init_weights(ctx.rng, (units, n_in), n_in, layer.activation.kind), True)
    bias = ctx.param(layer, "b", np.zeros(units), False)
    z = b.op("dense", a, w, bias, name=f"{layer.name}.Z")
    ctx.pre_activation[layer.name] = z
    ctx.infos.append(LayerInfo(layer.name, "dense", ((w.name, w.shape), (bias.name, bias.shape)),
                               ("N", units), 2 * n_in * units + units))
    return ACTIVATIONS[layer.activation.kind](b, z, layer.activation, layer.name)


def lower_flatten(ctx: LowerContext, layer: ast.Flatten, a: Value) -> Value:
    if a.rank < 2:
        raise error(f"{layer.name} (flatten) needs an input of rank ≥ 2, got {describe(a.shape)}",
                    layer.span, ctx.program)
    out = ctx.b.op("flatten", a, name=layer.name)
    ctx.infos.append(LayerInfo(layer.name, "flatten", (), out.shape, 0))
    return out


def lower_dropout(ctx: LowerContext, layer: ast.Dropout, a: Value) -> Value:
    """Inverted dropout: A · (u < keep) / keep with u ~ U(0, 1) fed per step; identity at inference."""
    b = ctx.b
    ctx.infos.append(LayerInfo(layer.name, "dropout", (), a.shape, 0))
    if not ctx.training:
        return b.op("identity", a, name=layer.name)
    keep = ctx.hyperparameter(f"{layer.name}.keep_prob", layer.keep_prob)
    noise = b.input(f"{layer.name}.noise", a.shape)
    ctx.noise.append(noise)
    mask = b.op("cast", b.op("greater", keep, noise), dtype=a.dtype)
    return b.op("mul", a, b.div(mask, keep), name=layer.name)


def lower_batchnorm(ctx: LowerContext, layer: ast.BatchNorm, a: Value) -> Value:
    """y = γ·(a − μ)/√(σ² + ε) + β, with batch μ, σ² in training and running ones at inference.

    Running statistics: r ← momentum·r + (1 − momentum)·batch, the variance unbiased (m/(m−1)),
    as torch.nn.BatchNorm1d with its momentum = 1 − ours.
    """
    b = ctx.b
    if a.rank != 2:
        raise error(f"{layer.name} (batchnorm) after a {describe(a.shape)} input is not available yet; "
                    f"it works after dense layers", layer.span, ctx.program)
    features = int(a.shape[1])
    gamma = ctx.param(layer, "gamma", np.ones(features), False)
    beta = ctx.param(layer, "beta", np.zeros(features), False)
    running_mean = ctx.buffer(layer, "running_mean", np.zeros(features))
    running_var = ctx.buffer(layer, "running_var", np.ones(features))
    eps = b.scalar(layer.eps)
    ctx.infos.append(LayerInfo(layer.name, "batchnorm", ((gamma.name, gamma.shape), (beta.name, beta.shape)),
                               a.shape, 4 * features))
    if ctx.training:
        mean = b.op("reduce_mean", a, axes=(0,), keepdims=False)
        centred = b.sub(a, mean)
        var = b.op("reduce_mean", b.mul(centred, centred), axes=(0,), keepdims=False)
        m = b.op("batch_count", a, dtype=a.dtype)
        unbiased = b.mul(var, b.div(m, b.op("maximum", b.sub(m, b.scalar(1.0)), b.scalar(1.0))))
        keep, fresh = b.scalar(layer.momentum), b.scalar(1.0 - layer.momentum)
        ctx.buffer_updates[running_mean.name] = b.add(b.mul(keep, running_mean), b.mul(fresh, mean))
        ctx.buffer_updates[running_var.name] = b.add(b.mul(keep, running_var), b.mul(fresh, unbiased))
    else:
        centred, var = b.sub(a, running_mean), running_var
    normalized = b.div(centred, b.op("sqrt", b.add(var, eps)))
    return b.add(b.mul(gamma, normalized), beta, name=layer.name)


NOT_YET = {
    ast.Conv: "convolutional layers",
    ast.Pool: "pooling layers",
    ast.Embed: "embeddings",
    ast.OneHot: "one_hot layers",
    ast.Recurrent: "recurrent layers",
    ast.Last: "`last` layers",
    ast.Pretrained: "pretrained layers (transfer learning)",
}

LOWER_RULES: dict[type, Callable[[LowerContext, ast.Layer, Value], Value]] = {
    ast.Dense: lower_dense,
    ast.Flatten: lower_flatten,
    ast.Dropout: lower_dropout,
    ast.BatchNorm: lower_batchnorm,
}


def unavailable_feature(program: ast.Program) -> tuple[str, Span | None] | None:
    """The first feature this version cannot compile ("convolutional layers"), and where it is."""
    if program.input.kind != "float":
        return f"`{program.input.kind}` inputs", program.input.span
    if program.output.kind not in ("binary", "class", "real"):
        return f"`{program.output.kind}` outputs", program.output.span
    for layer in program.layers:
        if type(layer) in NOT_YET:
            return NOT_YET[type(layer)], layer.span
    return None


def check_available(program: ast.Program) -> None:
    """A located 'not available yet' error for the first feature this version cannot compile."""
    missing = unavailable_feature(program)
    if missing is not None:
        what, span = missing
        raise error(f"{what} are not available yet in this version of dlnc; it compiles dense networks "
                    f"(dense, flatten, dropout, batchnorm) with float inputs", span, program)


def lower_layer(ctx: LowerContext, layer: ast.Layer, a: Value) -> Value:
    kind = type(layer)
    try:
        return LOWER_RULES[kind](ctx, layer, a)
    except ShapeError as exc:
        raise error(f"{layer.name}: {exc}", layer.span, ctx.program) from None


def check_output_layer(program: ast.Program, last: ast.Layer) -> None:
    """The last layer must agree with the output type; the message says what to write."""
    out = program.output
    units, activations = {"binary": (1, ("sigmoid",)), "class": (out.size, ("softmax",)),
                          "real": (out.size, ("linear", "relu", "leaky_relu", "tanh"))}[out.kind]
    ok = isinstance(last, ast.Dense) and last.units == units and last.activation.kind in activations
    if not ok:
        found = (f"dense {last.units} {last.activation.kind}" if isinstance(last, ast.Dense)
                 else type(last).__name__.lower())
        raise error(f"output {out.name}: {out.kind}{f'[{out.size}]' if out.kind != 'binary' else ''} needs the "
                    f"last layer to be `dense {units} {activations[0]}`, but it is `{found}`",
                    last.span, program)


def lower_input(ctx: LowerContext, x: Value, normalization: Normalization | None) -> Value:
    """Raw input to what the first layer sees: (x − μ)/σ when the data block says `normalize`."""
    if normalization is None:
        return x
    b = ctx.b
    mean = b.const(normalization.mean, name="normalize.mean")
    std = b.const(normalization.std, name="normalize.std")
    return b.div(b.sub(x, mean), std, name="normalize")


def lower_network(ctx: LowerContext, x: Value, normalization: Normalization | None) -> Value:
    """All layers in order; returns the last layer's activation."""
    program = ctx.program
    check_available(program)
    if not program.layers:
        raise error("the layers block is empty; write at least the output layer", program.span, program)
    check_output_layer(program, program.layers[-1])
    a = lower_input(ctx, x, normalization)
    for layer in program.layers:
        a = lower_layer(ctx, layer, a)
    return a
