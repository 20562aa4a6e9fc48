"""Shape rules: one per IR op, each mapping (inputs, attrs) to (dtype, shape).

A shape is a tuple of ints with the symbol "N" for the batch size. A rule raises
`ShapeError` when its inputs do not fit; lowering turns that into a located DlnError.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from .ir import Shape, Value

SHAPE_RULES: dict[str, Callable[[tuple[Value, ...], Mapping[str, Any]], tuple[str, Shape]]] = {}


class ShapeError(ValueError):
    """Inputs whose shapes an op cannot take."""


def rule(*ops: str):
    def register(fn):
        for op in ops:
            SHAPE_RULES[op] = fn
        return fn
    return register


def broadcast(a: Shape, b: Shape) -> Shape:
    """numpy broadcasting of two shapes; the symbol "N" only matches itself or 1."""
    out = []
    for x, y in zip(((1,) * (len(b) - len(a)) + tuple(a)), ((1,) * (len(a) - len(b)) + tuple(b))):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise ShapeError(f"shapes {a} and {b} do not broadcast")
    return tuple(out)


def _axes(attrs: Mapping[str, Any], rank: int) -> tuple[int, ...]:
    axes = attrs.get("axes")
    return tuple(range(rank)) if axes is None else tuple(a % rank for a in axes)


@rule("const")
def shape_const(inputs, attrs):
    value = attrs["value"]
    return str(value.dtype), tuple(value.shape)


@rule("identity", "floor", "neg", "exp", "log", "sqrt", "abs", "sign", "relu", "leaky_relu", "sigmoid",
      "tanh", "softmax", "log_softmax")
def shape_unary(inputs, attrs):
    (x,) = inputs
    return x.dtype, x.shape


@rule("add", "sub", "mul", "div", "pow", "maximum", "minimum")
def shape_binary(inputs, attrs):
    a, b = inputs
    if a.dtype != b.dtype:
        raise ShapeError(f"dtypes {a.dtype} and {b.dtype} differ")
    return a.dtype, broadcast(a.shape, b.shape)


@rule("greater")
def shape_greater(inputs, attrs):
    a, b = inputs
    return "bool", broadcast(a.shape, b.shape)


@rule("where")
def shape_where(inputs, attrs):
    c, a, b = inputs
    return a.dtype, broadcast(c.shape, broadcast(a.shape, b.shape))


@rule("cast")
def shape_cast(inputs, attrs):
    (x,) = inputs
    return attrs["dtype"], x.shape


@rule("dense")
def shape_dense(inputs, attrs):
    x, w, b = inputs
    if x.rank != 2 or w.rank != 2 or b.shape != (w.shape[0],):
        raise ShapeError(f"dense needs x (m, n), W (k, n), b (k,); got {x.shape}, {w.shape}, {b.shape}")
    if x.shape[1] != w.shape[1]:
        raise ShapeError(f"dense input has {x.shape[1]} features but W expects {w.shape[1]}")
    return x.dtype, (x.shape[0], w.shape[0])


@rule("matmul")
def shape_matmul(inputs, attrs):
    a, b = inputs
    if a.rank != 2 or b.rank != 2:
        raise ShapeError(f"matmul needs 2-D operands; got {a.shape} and {b.shape}")
    (m, k) = a.shape[::-1] if attrs.get("trans_a") else a.shape
    (k2, n) = b.shape[::-1] if attrs.get("trans_b") else b.shape
    if k != k2:
        raise ShapeError(f"matmul inner sizes {k} and {k2} differ")
    return a.dtype, (m, n)


@rule("reduce_sum", "reduce_mean")
def shape_reduce(inputs, attrs):
    (x,) = inputs
    axes = _axes(attrs, x.rank)
    if attrs.get("keepdims", False):
        return x.dtype, tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    return x.dtype, tuple(d for i, d in enumerate(x.shape) if i not in axes)


@rule("unsqueeze")
def shape_unsqueeze(inputs, attrs):
    (x,) = inputs
    shape = list(x.shape)
    rank = x.rank + len(attrs["axes"])
    for axis in sorted(a % rank for a in attrs["axes"]):
        shape.insert(axis, 1)
    return x.dtype, tuple(shape)


@rule("squeeze")
def shape_squeeze(inputs, attrs):
    (x,) = inputs
    axes = {a % x.rank for a in attrs["axes"]}
    if any(x.shape[a] != 1 for a in axes):
        raise ShapeError(f"cannot squeeze axes {sorted(axes)} of {x.shape}")
    return x.dtype, tuple(d for i, d in enumerate(x.shape) if i not in axes)


@rule("reshape_as")
def shape_reshape_as(inputs, attrs):
    x, like = inputs
    return x.dtype, like.shape


@rule("expand_as")
def shape_expand_as(inputs, attrs):
    x, like = inputs
    if broadcast(x.shape, like.shape) != tuple(like.shape):
        raise ShapeError(f"cannot expand {x.shape} to {like.shape}")
    return x.dtype, like.shape


@rule("flatten")
def shape_flatten(inputs, attrs):
    (x,) = inputs
    rest = x.shape[1:]
    if any(isinstance(d, str) for d in rest):
        raise ShapeError(f"flatten needs static inner dimensions; got {x.shape}")
    return x.dtype, (x.shape[0], int(np.prod(rest, dtype=np.int64)))


@rule("one_hot")
def shape_one_hot(inputs, attrs):
    (labels,) = inputs
    return attrs["dtype"], (*labels.shape, attrs["depth"])


@rule("batch_count")
def shape_batch_count(inputs, attrs):
    return attrs["dtype"], ()


@rule("softmax_cross_entropy")
def shape_softmax_cross_entropy(inputs, attrs):
    z, y = inputs
    if z.rank != 2 or y.shape != (z.shape[0],) or y.dtype != "int64":
        raise ShapeError(f"softmax_cross_entropy needs logits (m, C) and int64 labels (m,); got {z.shape}, {y.shape} {y.dtype}")
    return z.dtype, ()


@rule("sigmoid_bce", "mse")
def shape_elementwise_loss(inputs, attrs):
    z, y = inputs
    if tuple(z.shape) != tuple(y.shape):
        raise ShapeError(f"loss needs predictions and targets of one shape; got {z.shape} and {y.shape}")
    return z.dtype, ()
