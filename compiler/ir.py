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
    "dense": "y = x·Wᵀ + b, x (m, n_in), W (n_out, n_in), b (n_out,)",
    "matmul": "y = op(a)·op(b), op transposes when attr trans_a / trans_b",
    "reduce_sum": "y = Σ x over attr axes (None: all), keepdims",
    "reduce_mean": "y = mean of x over attr axes (None: all), keepdims",
    "unsqueeze": "y = x with size-1 dims inserted at attr axes",
    "squeeze": "y = x without its size-1 dims at attr axes",
    "floor": "y = ⌊x⌋",
    "reshape_as": "y = x reshaped to the shape of `like`",
    "expand_as": "y = x broadcast to the shape of `like`",
    "flatten": "y = x reshaped to (m, everything else)",
    "one_hot": "y[i, k] = 1 if labels[i] == k else 0, k < attr depth (float)",
    "batch_count": "y = m, the size of x's first dimension, as a float scalar",
    "softmax_cross_entropy": "J = −(1/m) Σ_i log softmax(z_i)[y_i]; labels int64 (m,)",
    "sigmoid_bce": "J = (1/m) Σ max(z,0) − z·y + log(1 + e^{−|z|}), the logit form of BCE",
    "mse": "J = mean over all elements of (p − y)²",
}

# ops whose output carries no gradient to their inputs (their VJP rule returns Nones)
NON_DIFFERENTIABLE = frozenset({"const", "sign", "floor", "greater", "cast", "one_hot", "batch_count"})


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
        out = Value(self.fresh(name or op), dtype, tuple(shape))
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
