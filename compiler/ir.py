"""The IR: values, nodes, graphs, and the builder that creates them.

Three fields carry everything (as in autodidax): a `Value` is a name with a dtype and a
shape; a `Node` is an op applied to input values, giving one output value, with attributes.
Shapes are tuples of ints, with the symbol "N" for the batch dimension.

Every op is listed once in `OPS`. Each concern has its own table, keyed by op name:
shape rules (`compiler.shapes`), VJP rules (`compiler.vjp`), ONNX emission
(`compiler.emit`) and, where worth it, constant folding (`compiler.simplify`).
`tests/test_ops.py` checks that no op misses an entry.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Dim = int | str
Shape = tuple[Dim, ...]

# op name -> what it computes. Broadcasting follows numpy; "m" is the batch size.
OPS: Mapping[str, str] = {
    "const": "a constant tensor (attr value)",
    "identity": "y = x",
    "add": "y = a + b",
    "sub": "y = a − b",
    "mul": "y = a · b",
    "div": "y = a / b",
    "pow": "y = a ^ b",
    "maximum": "y = max(a, b)",
    "minimum": "y = min(a, b)",
    "neg": "y = −x",
    "exp": "y = eˣ",
    "log": "y = ln x",
    "sqrt": "y = √x",
    "abs": "y = |x|",
    "sign": "y = sign(x)",
    "relu": "y = max(x, 0)",
    "leaky_relu": "y = x if x > 0 else α·x (attr alpha)",
    "sigmoid": "y = 1 / (1 + e⁻ˣ)",
    "tanh": "y = tanh x",
    "softmax": "y_i = e^{x_i} / Σ_j e^{x_j} along attr axis",
    "log_softmax": "y_i = x_i − log Σ_j e^{x_j} along attr axis",
    "greater": "y = a > b (bool)",
    "where": "y = a where c else b",
    "cast": "y = x as attr dtype",
    "dense": "y = x·Wᵀ + b, x (m, n_in), W (n_out, n_in), b (n_out,); attr x_t: x comes feature-major, as xᵀ "
             "(n_in, m); attr y_t: y goes out feature-major, as yᵀ (n_out, m)",
    "matmul": "y = op(a)·op(b), op transposes when attr trans_a / trans_b",
    "reduce_sum": "y = Σ x over attr axes (None: all), keepdims",
    "reduce_mean": "y = mean of x over attr axes (None: all), keepdims",
    "unsqueeze": "y = x with size-1 dims inserted at attr axes",
    "squeeze": "y = x without its size-1 dims at attr axes",
    "floor": "y = ⌊x⌋",
    "reshape_as": "y = x reshaped to the shape of `like`",
    "expand_as": "y = x broadcast to the shape of `like`",
    "flatten": "y = x reshaped to (m, everything else)",
    "as_row": "y = x reshaped to one row, (1, number of elements) (static shapes only)",
    # 2-D convolution and pooling, NCHW. attrs: strides (sh, sw), pads (top, left, bottom, right),
    # kernel (kh, kw); output size ⌊(n + p_begin + p_end − k) / s⌋ + 1
    "conv": "y[n, f] = Σ_c x[n, c] ⋆ w[f, c] + b[f] (cross-correlation), x (m, C, H, W), w (F, C, kh, kw), "
            "b (F,) optional; attrs strides, pads",
    "conv_transpose": "the adjoint of conv in x: y = (∂conv/∂x)ᵀ·x, x (m, F, Ho, Wo), w (F, C, kh, kw) → "
                      "(m, C, H, W); attrs strides, pads, output_padding (the rows/columns conv never read)",
    "conv_filter_grad": "the adjoint of conv in w (attr batch: the mini-batch size it is compiled for, or None): "
                        "y[f, c, i, j] = Σ_{n,p,q} g[n, f, p, q]·x_pad[n, c, p·sh + i, "
                        "q·sw + j], x (m, C, H, W), g (m, F, Ho, Wo) → (F, C, kh, kw); attrs strides, pads, kernel",
    "conv_filter_grad_pooled": "conv_filter_grad(x, maxpool_grad(g, r, y)) without unpooling g: x (m, C, H, W), "
                               "g and y = maxpool(r) (m, F, P, Q), r (m, F, Ho, Wo) → (F, C, kh, kw); the conv's "
                               "attrs strides, pads, kernel, batch, and the pool's tiling window attr pool (ph, pw)",
    "maxpool": "y = max of x over each kh×kw window, attrs kernel, strides (no padding)",
    "maxpool_argmax": "the flat index into x (over all of x, batch and channel included) of each window's first "
                      "maximum, int64, shaped like maxpool's y; attrs kernel, strides",
    "maxpool_grad": "max pooling's gradient when the windows tile x exactly (strides = kernel, sizes divisible): "
                    "each g[n, c, p, q] at the first maximum of window (p, q) of x, zeros elsewhere; inputs g, x "
                    "and y = maxpool(x); attrs kernel, strides",
    "avgpool": "y = mean of x over each kh×kw window, attrs kernel, strides (no padding)",
    "avgpool_transpose": "the adjoint of avgpool: every x[n, c, p, q]/(kh·kw) added over its window, "
                         "(m, C, Ho, Wo) → (m, C, H, W); attrs kernel, strides, input_size (H, W)",
    "take": "y = x.flat[indices], shaped like the int64 indices",
    "scatter_add": "y = zeros shaped like `like`, then y.flat[indices[i]] += x.flat[i] (repeats add up)",
    "one_hot": "y[i, k] = 1 if labels[i] == k else 0, k < attr depth (float)",
    "batch_count": "y = m, the size of x's first dimension, as a float scalar",
    "softmax_cross_entropy": "J = −(1/m) Σ_i log softmax(z_i)[y_i]; labels int64 (m,)",
    "sigmoid_bce": "J = (1/m) Σ max(z,0) − z·y + log(1 + e^{−|z|}), the logit form of BCE",
    "mse": "J = mean over all elements of (p − y)²",
    # sequences: batch-first (m, T, ...), T the time axis (a number in training, the symbol "T" in
    # exported models); "m*T" is the size of the batch and time axes merged
    "embedding": "y[..., :] = W[ids[...], :], W (V, D), int64 ids of any shape → (*ids.shape, D)",
    "embedding_grad": "the adjoint of embedding in W: y = zeros like W (V, D), then y[ids[...], :] += g[..., :] "
                      "(an id that occurs twice gets both rows)",
    "time_step": "y = x[:, t], x (m, T, ...) → (m, ...); attr t (< 0 counts from the end)",
    "stack_steps": "y[:, t] = x_t for the inputs x_0 … x_{T−1}, each (m, ...) → (m, T, ...)",
    "slice_axis": "y = x[start:end] along attr axis (the axis kept); attrs axis, start, end",
    "pad_axis": "y = x with attr before zeros in front and attr after zeros behind, along attr axis",
    "concat": "y = the inputs joined along attr axis",
    "fold_time": "y = x (m, T, ...) reshaped to (m·T, ...)",
    "unfold_time": "y = x (m·T, ...) reshaped to (m, T, ...), m and T those of `like` (m, T, ...)",
    "stop_gradient": "y = x, with no gradient to x",
    # a frozen pretrained trunk (compiler/pretrained.py): attr graph carries an ONNX subgraph that is
    # emitted as it is, its nodes and initializers copied under the layer's prefix
    "onnx_graph": "y = the ONNX subgraph attr graph applied to x, no gradient",
    # the ONNX recurrent ops, one direction, zero initial state, over x (m, T, F); y (m, T, H), or h_T (m, H)
    # with attr last. W (1, G·H, F), R (1, G·H, H), B (1, 2·G·H) hold the G gates in ONNX's order; attr hidden = H
    "rnn_seq": "h_t = act(x_t·Wᵀ + h_{t−1}·Rᵀ + Wb + Rb), attr activation tanh | relu (ONNX RNN, G = 1)",
    "gru_seq": "ONNX GRU, gates z, r, h (G = 3), linear_before_reset = 1: "
               "h̃_t = tanh(x_t·W_hᵀ + Wb_h + r_t ⊙ (h_{t−1}·R_hᵀ + Rb_h)), h_t = (1 − z_t) ⊙ h̃_t + z_t ⊙ h_{t−1}",
    "lstm_seq": "ONNX LSTM, gates i, o, f, c (G = 4), no peepholes: c_t = f_t ⊙ c_{t−1} + i_t ⊙ tanh(c̃_t), "
                "h_t = o_t ⊙ tanh(c_t)",
}

# ops whose output carries no gradient to their inputs (their VJP rule returns Nones)
NON_DIFFERENTIABLE = frozenset({"const", "sign", "floor", "greater", "cast", "one_hot", "batch_count",
                                "maxpool_argmax", "stop_gradient", "onnx_graph"})


@dataclass(frozen=True)
class Value:
    name: str
    dtype: str          # float32 | float64 | int64 | bool
    shape: Shape

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True, eq=False)
class Node:
    op: str
    inputs: tuple[Value, ...]
    output: Value
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


@dataclass(frozen=True)
class Graph:
    """A DAG in topological order. `inputs` are fed at run time; consts are `const` nodes."""

    name: str
    inputs: tuple[Value, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]

    def producers(self) -> dict[str, Node]:
        return {n.output.name: n for n in self.nodes}


def registrar(table: dict) -> Callable[..., Callable]:
    """A decorator factory that files a rule under each name it is given: `@rule("add", "sub")`."""
    def register_for(*names: str) -> Callable:
        def register(fn):
            for name in names:
                table[name] = fn
            return fn
        return register
    return register_for


ShapeRule = Callable[[tuple[Value, ...], Mapping[str, Any]], tuple[str, Shape]]


class Builder:
    """Creates values and nodes in topological order; checks each node with its shape rule.

    The only mutable object of the IR: lowering and autodiff append to one builder, then
    `graph()` freezes the result.
    """

    def __init__(self, dtype: str = "float32"):
        self.dtype = dtype
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._counter = itertools.count()
        self.scope: str | None = None       # the layer being lowered: unnamed values are `scope.op`
        self.batch: int | None = None       # the mini-batch size a training step is compiled for (None: unknown)

    def fresh(self, hint: str) -> str:
        name = hint
        while name in self._names:
            name = f"{hint}_{next(self._counter)}"
        self._names.add(name)
        return name

    def input(self, name: str, shape: Shape, dtype: str | None = None) -> Value:
        value = Value(self.fresh(name), dtype or self.dtype, tuple(shape))
        self.inputs.append(value)
        return value

    def const(self, value: Any, dtype: str | None = None, name: str | None = None) -> Value:
        array = np.asarray(value, dtype=dtype or self.dtype)
        return self.op("const", value=array, name=name)

    def op(self, op: str, *inputs: Value, name: str | None = None, **attrs: Any) -> Value:
        from .shapes import SHAPE_RULES
        if op not in OPS:
            raise KeyError(f"unknown IR op {op!r}")
        dtype, shape = SHAPE_RULES[op](tuple(inputs), attrs)
        out = Value(self.fresh(name or (f"{self.scope}.{op}" if self.scope else op)), dtype, tuple(shape))
        self.nodes.append(Node(op, tuple(inputs), out, dict(attrs)))
        return out

    def graph(self, name: str, outputs: Iterable[Value], inputs: Iterable[Value] | None = None) -> Graph:
        return Graph(name, tuple(self.inputs if inputs is None else inputs), tuple(self.nodes),
                     tuple(outputs))

    # the arithmetic used by VJP rules and the optimisers, spelled as the math reads
    def add(self, a: Value, b: Value, name: str | None = None) -> Value: return self.op("add", a, b, name=name)
    def sub(self, a: Value, b: Value, name: str | None = None) -> Value: return self.op("sub", a, b, name=name)
    def mul(self, a: Value, b: Value, name: str | None = None) -> Value: return self.op("mul", a, b, name=name)
    def div(self, a: Value, b: Value, name: str | None = None) -> Value: return self.op("div", a, b, name=name)
    def neg(self, a: Value, name: str | None = None) -> Value: return self.op("neg", a, name=name)
    def scalar(self, x: float) -> Value: return self.const(x)
