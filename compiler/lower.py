"""Lowering: the layers of a typed AST program to forward IR, with shapes checked.

One lowering rule per layer kind. A rule takes the context and the incoming activation and
returns the layer's output, named after the layer, so `dense_3` is both the IR value and the
exported tensor. Parameters are created through the context: `dense_3.W` has the course's
shape (n[l], n[l−1]) (which is also ONNX Gemm's transB layout), `dense_3.b` is (n[l],).
Initialisation is seeded: He (variance 2/n[l−1]) for the relu family, Xavier (1/n[l−1])
otherwise, biases zero.

Convolutions are batch-first NCHW: `conv_1.W` is (F, C, k, k) with fan-in C·k·k, `conv_1.b` is
(F,). Output size ⌊(n + p_begin + p_end − k)/s⌋ + 1. `padding=same` gives ⌈n/s⌉ (n at stride 1)
with the total padding split as TensorFlow and PyTorch do: the smaller half on top and left, so an
even k pads one more row at the bottom and one more column at the right.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from dsl import ast
from dsl.errors import DlnError, Span

from .ir import Builder, Value
from .shapes import ShapeError, same_padding, window_count

RELU_FAMILY = frozenset({"relu", "leaky_relu"})
MAX_TENSOR_ELEMENTS = 2 ** 29     # 2 GiB of float32: the most one ONNX file (a protobuf) can hold


@dataclass(frozen=True)
class ParamSpec:
    """A learned tensor: `dense_1.W` etc., with its initial value."""

    name: str
    layer: str
    role: str                 # W | b | gamma | beta
    init: np.ndarray
    regularized: bool         # weights only: never biases, γ or β


@dataclass(frozen=True)
class StateSpec:
    """A tensor the training step updates that is not learned by gradient: batchnorm's running
    statistics (made by lowering), optimiser slots and the step count (made by the training step)."""

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
    buffers: list[StateSpec] = field(default_factory=list)
    buffer_values: dict[str, Value] = field(default_factory=dict)
    buffer_updates: dict[str, Value] = field(default_factory=dict)
    hyper: dict[str, Value] = field(default_factory=dict)
    hyper_defaults: dict[str, float] = field(default_factory=dict)
    noise: list[Value] = field(default_factory=list)
    infos: list[LayerInfo] = field(default_factory=list)
    pre_activation: dict[str, Value] = field(default_factory=dict)
    vocab: int = 0                    # token programs: the vocabulary size the data defines (`vocab`)
    steps: int | None = None          # token programs: the training window T
    recurrent: str = "op"             # the exported model's recurrent layers: one ONNX op, or "unrolled" over T
    kept_feature_major: frozenset[str] = frozenset()     # dense layers whose output stays (features, N)
    transposed: set[str] = field(default_factory=set)    # the values held feature-major

    def param(self, layer: ast.Layer, role: str, init: np.ndarray, regularized: bool) -> Value:
        name = f"{layer.name}.{role}"
        init = init.astype(self.b.dtype)
        self.params.append(ParamSpec(name, layer.name, role, init, regularized))
        value = self.b.input(name, init.shape)
        self.param_values[name] = value
        return value

    def buffer(self, layer: ast.Layer, role: str, init: np.ndarray) -> Value:
        name = f"{layer.name}.{role}"
        self.buffers.append(StateSpec(name, init.astype(self.b.dtype)))
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


def check_size(shape: tuple, what: str, per_example: bool = False) -> None:
    """A tensor too large for an ONNX file (weights), or for one example, is a ShapeError,
    checked before anything is allocated or multiplied in fixed-width integers."""
    count = int(np.prod([int(d) for d in shape if isinstance(d, int)], dtype=object))
    if count > MAX_TENSOR_ELEMENTS:
        limit = ("dlnc handles at most" if per_example else "an ONNX file holds at most 2 GiB, about")
        raise ShapeError(f"{what} {describe(shape)} would hold {count:,} numbers{' per example' * per_example}; "
                         f"{limit} {MAX_TENSOR_ELEMENTS:,} float32 numbers")


def init_weights(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, activation: str) -> np.ndarray:
    """He: N(0, 2/fan_in) for the relu family; Xavier: N(0, 1/fan_in) otherwise."""
    check_size(shape, "its weights")
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
        raise error("`vocab` is the vocabulary of text data, and this program reads none; write the number of units",
                    layer.spans.get("units", layer.span), ctx.program)
    x_t, y_t = a.name in ctx.transposed, layer.name in ctx.kept_feature_major
    n_in = int(a.shape[0 if x_t else 1])
    w = ctx.param(layer, "W", init_weights(ctx.rng, (units, n_in), n_in, layer.activation.kind), True)
    bias = ctx.param(layer, "b", np.zeros(units), False)
    layout = {attr: 1 for attr, on in (("x_t", x_t), ("y_t", y_t)) if on}
    z = b.op("dense", a, w, bias, name=f"{layer.name}.Z", **layout)
    ctx.pre_activation[layer.name] = z                  # (units, N) where y_t; only the last layer's is read
    ctx.infos.append(LayerInfo(layer.name, "dense", ((w.name, w.shape), (bias.name, bias.shape)),
                               ("N", units), 2 * n_in * units + units))
    out = ACTIVATIONS[layer.activation.kind](b, z, layer.activation, layer.name)
    if y_t:
        ctx.transposed.add(out.name)
    return out


def feature_major_layers(layers: Sequence[ast.Layer]) -> frozenset[str]:
    """The dense layers whose output goes straight into another dense layer, through an elementwise
    activation. The training step keeps their activations feature-major, (features, N): every Gemm
    of the chain, forward and backward, then runs with its operands as stored or with W transposed,
    never with the batch on the transposed side, which ONNX Runtime's Gemm runs slower (up to 19 %
    for the first layer's weight gradient at batch 512, 32 % for its forward pass at batch 32;
    bench/NOTES.md section 21). The exported model stays batch-first throughout."""
    return frozenset(layer.name for layer, after in itertools.pairwise(layers)
                     if isinstance(layer, ast.Dense) and isinstance(after, ast.Dense)
                     and layer.activation.kind != "softmax")


def _image_input(ctx: LowerContext, layer: ast.Layer, kind: str, a: Value) -> tuple[int, int, int]:
    """(C, H, W) of an (N, C, H, W) input; a located error for any other rank."""
    if a.rank != 4:
        hint = ("declare the input as an image, like `input x: float[1, 8, 8]`" if a.rank == 2
                else "it needs (N, C, H, W)")
        raise error(f"{layer.name} ({kind}) takes images (N, C, H, W) but its input is {describe(a.shape)}; {hint}",
                    layer.span, ctx.program)
    return int(a.shape[1]), int(a.shape[2]), int(a.shape[3])


def _window_output(ctx: LowerContext, layer: ast.Layer, kind: str, a: Value, channels: int, size: int,
                   stride: int, pads: tuple[int, int, int, int]) -> tuple[int, int]:
    """(Ho, Wo) = ⌊(n + p − k)/s⌋ + 1 per side; a located error showing both shapes if it is empty."""
    (_, h, w), (top, left, bottom, right) = a.shape[1:], pads
    out = (window_count(h, size, stride, top, bottom), window_count(w, size, stride, left, right))
    if min(out) < 1:
        padded = f" padded by {pads[0]} (top), {pads[1]} (left), {pads[2]} (bottom), {pads[3]} (right)" \
            if any(pads) else ""
        raise error(f"{layer.name} ({kind}): a {size}×{size} window at stride {stride} over the input "
                    f"{describe(a.shape)}{padded} gives an empty output {describe(('N', channels, *out))}",
                    layer.span, ctx.program)
    return out


def conv_pads(padding: int | str, size: int, stride: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) for `padding=P` (P on every side) or `padding=same`."""
    if padding == "same":
        (top, bottom), (left, right) = same_padding(h, size, stride), same_padding(w, size, stride)
        return top, left, bottom, right
    return (int(padding),) * 4


def lower_conv(ctx: LowerContext, layer: ast.Conv, a: Value) -> Value:
    """Z = W ⋆ A + b (cross-correlation, as ONNX Conv and torch), then the activation."""
    b = ctx.b
    channels, h, w = _image_input(ctx, layer, "conv", a)
    if layer.activation.kind == "softmax":
        raise error(f"{layer.name} (conv): softmax belongs to the output layer (`dense C softmax`); "
                    f"use relu, leaky_relu, tanh, sigmoid or linear here",
                    layer.spans.get("activation", layer.span), ctx.program)
    k, stride, filters = layer.size, layer.stride, layer.filters
    pads = conv_pads(layer.padding, k, stride, h, w)
    ho, wo = _window_output(ctx, layer, "conv", a, filters, k, stride, pads)
    fan_in = channels * k * k
    weights = ctx.param(layer, "W", init_weights(ctx.rng, (filters, channels, k, k), fan_in, layer.activation.kind),
                        True)
    bias = ctx.param(layer, "b", np.zeros(filters), False)
    z = b.op("conv", a, weights, bias, strides=(stride, stride), pads=pads, name=f"{layer.name}.Z")
    ctx.pre_activation[layer.name] = z
    # 2 per multiply-add: k·k·C of them per output, F·Ho·Wo outputs, plus the bias
    flops = 2 * k * k * channels * filters * ho * wo + filters * ho * wo
    ctx.infos.append(LayerInfo(layer.name, "conv", ((weights.name, weights.shape), (bias.name, bias.shape)),
                               z.shape, flops))
    return ACTIVATIONS[layer.activation.kind](b, z, layer.activation, layer.name)


def lower_pool(ctx: LowerContext, layer: ast.Pool, a: Value) -> Value:
    """Max or average over size×size windows at the stride (which defaults to the size), no padding."""
    kind = f"{layer.kind}pool"
    channels, _, _ = _image_input(ctx, layer, kind, a)
    ho, wo = _window_output(ctx, layer, kind, a, channels, layer.size, layer.stride, (0, 0, 0, 0))
    out = ctx.b.op(kind, a, kernel=(layer.size, layer.size), strides=(layer.stride, layer.stride), name=layer.name)
    # one comparison (max) or addition (avg) per window element: k·k per output, C·Ho·Wo outputs
    ctx.infos.append(LayerInfo(layer.name, kind, (), out.shape, layer.size * layer.size * channels * ho * wo))
    return out


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

    After dense layers the statistics are per feature, over the batch; after conv layers per
    channel, over the batch and every position (N, H, W), with γ, β, μ, σ² of shape (C,) broadcast
    as (C, 1, 1). Running statistics: r ← momentum·r + (1 − momentum)·batch, the variance unbiased
    (count/(count − 1), count = m or m·H·W), as torch.nn.BatchNorm1d/2d with its momentum = 1 − ours.
    """
    b = ctx.b
    if a.rank not in (2, 4):
        raise error(f"{layer.name} (batchnorm) takes (N, features) or (N, C, H, W) but its input is "
                    f"{describe(a.shape)}", layer.span, ctx.program)
    features = int(a.shape[1])
    axes = (0,) if a.rank == 2 else (0, 2, 3)
    positions = int(np.prod(a.shape[2:], dtype=np.int64))     # H·W after conv, 1 after dense

    def per_feature(v: Value) -> Value:
        """(C,) broadcast against a: as it is for (N, C), as (C, 1, 1) for (N, C, H, W)."""
        return v if a.rank == 2 else b.op("unsqueeze", v, axes=(1, 2))

    gamma = ctx.param(layer, "gamma", np.ones(features), False)
    beta = ctx.param(layer, "beta", np.zeros(features), False)
    running_mean = ctx.buffer(layer, "running_mean", np.zeros(features))
    running_var = ctx.buffer(layer, "running_var", np.ones(features))
    eps = b.scalar(layer.eps)
    ctx.infos.append(LayerInfo(layer.name, "batchnorm", ((gamma.name, gamma.shape), (beta.name, beta.shape)),
                               a.shape, 4 * features * positions))
    if ctx.training:
        mean = b.op("reduce_mean", a, axes=axes, keepdims=False)
        centred = b.sub(a, per_feature(mean))
        var = b.op("reduce_mean", b.mul(centred, centred), axes=axes, keepdims=False)
        m = b.op("batch_count", a, dtype=a.dtype)
        if positions != 1:
            m = b.mul(m, b.scalar(float(positions)))
        unbiased = b.mul(var, b.div(m, b.op("maximum", b.sub(m, b.scalar(1.0)), b.scalar(1.0))))
        keep, fresh = b.scalar(layer.momentum), b.scalar(1.0 - layer.momentum)
        ctx.buffer_updates[running_mean.name] = b.add(b.mul(keep, running_mean), b.mul(fresh, mean))
        ctx.buffer_updates[running_var.name] = b.add(b.mul(keep, running_var), b.mul(fresh, unbiased))
    else:
        centred, var = b.sub(a, per_feature(running_mean)), running_var
    normalized = b.div(centred, per_feature(b.op("sqrt", b.add(var, eps))))
    return b.add(b.mul(per_feature(gamma), normalized), per_feature(beta), name=layer.name)


LOWER_RULES: dict[type, Callable[[LowerContext, ast.Layer, Value], Value]] = {
    ast.Dense: lower_dense,
    ast.Conv: lower_conv,
    ast.Pool: lower_pool,
    ast.Flatten: lower_flatten,
    ast.Dropout: lower_dropout,
    ast.BatchNorm: lower_batchnorm,
}


def lower_layer(ctx: LowerContext, layer: ast.Layer, a: Value) -> Value:
    kind = type(layer)
    ctx.b.scope = layer.name                # the layer's inner nodes read `batchnorm_2.sub` in Netron
    try:
        out = LOWER_RULES[kind](ctx, layer, a)
        check_size(out.shape, "its output", per_example=True)
        return out
    except ShapeError as exc:
        raise error(f"{layer.name}: {exc}", layer.span, ctx.program) from None
    finally:
        ctx.b.scope = None


def check_output_layer(program: ast.Program, last: ast.Layer) -> None:
    """The last layer must agree with the output type; the message says what to write."""
    out = program.output
    units, activations = {"binary": (1, ("sigmoid",)), "class": (out.size, ("softmax",)),
                          "real": (out.size, ("linear", "relu", "leaky_relu", "tanh")),
                          "tokens": ("vocab", ("softmax",))}[out.kind]
    ok = isinstance(last, ast.Dense) and last.units == units and last.activation.kind in activations
    if not ok:
        found = (f"dense {last.units} {last.activation.kind}" if isinstance(last, ast.Dense)
                 else type(last).__name__.lower())
        declared = {"binary": "binary", "tokens": "tokens per_step"}.get(out.kind, f"{out.kind}[{out.size}]")
        raise error(f"output {out.name}: {declared} needs the "
                    f"last layer to be `dense {units} {activations[0]}`, but it is `{found}`",
                    last.span, program)


def lower_input(ctx: LowerContext, x: Value, normalization: Normalization | None) -> Value:
    """Raw input to what the first layer sees: (x − μ)/σ when the data block says `normalize`."""
    if normalization is None:
        return x
    b = ctx.b
    mean = b.const(normalization.mean, name="normalize.mean")
    std = b.const(normalization.std, name="normalize.std")
    return b.div(b.sub(x, mean, name="normalize.centred"), std, name="normalize")


def lower_network(ctx: LowerContext, x: Value, normalization: Normalization | None) -> Value:
    """All layers in order; returns the last layer's activation."""
    program = ctx.program
    if not program.layers:
        raise error("the layers block is empty; write at least the output layer", program.span, program)
    check_output_layer(program, program.layers[-1])
    try:
        check_size(program.input.shape, "its examples", per_example=True)
    except ShapeError as exc:
        raise error(f"input {program.input.name}: {exc}", program.input.span, program) from None
    a = lower_input(ctx, x, normalization)
    for layer in program.layers:
        a = lower_layer(ctx, layer, a)
    return a


from . import lower_sequence  # noqa: E402,F401  (registers token inputs and sequence layers into LOWER_RULES)
from . import pretrained  # noqa: E402,F401  (registers the pretrained layer: transfer learning)
