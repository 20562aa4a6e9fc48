"""VJP rules: one per IR op. Each builds IR (never numbers) for the gradient of every input.

A rule takes the builder `b`, the upstream gradient `g` (shaped like the node's output) and
the node, and returns one gradient per input, `None` where there is none. Broadcasting is
undone in one place, `unbroadcast`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .ir import Builder, Node, Value

VJP_RULES: dict[str, Callable[[Builder, Value, Node], tuple[Value | None, ...]]] = {}


def vjp(*ops: str):
    def register(fn):
        for op in ops:
            VJP_RULES[op] = fn
        return fn
    return register


def unbroadcast(b: Builder, g: Value, target: Value) -> Value:
    """Sum g over the axes that broadcasting added or stretched, back to target's shape."""
    if tuple(g.shape) == tuple(target.shape):
        return g
    lead = g.rank - target.rank
    padded = (1,) * lead + tuple(target.shape)
    axes = tuple(i for i, (gd, td) in enumerate(zip(g.shape, padded)) if i < lead or (td == 1 and gd != 1))
    summed = b.op("reduce_sum", g, axes=axes, keepdims=True) if axes else g
    return summed if tuple(summed.shape) == tuple(target.shape) else b.op("reshape_as", summed, target)


def _reduced_count(b: Builder, x: Value, axes: tuple[int, ...]) -> Value:
    """How many elements of x each reduced output averages, as a scalar value."""
    static = int(np.prod([d for i, d in enumerate(x.shape) if i in axes and isinstance(d, int)]))
    count = b.const(float(static))
    if any(isinstance(x.shape[i], str) for i in axes):
        count = b.mul(count, b.op("batch_count", x, dtype=x.dtype))
    return count


@vjp(*sorted({"const", "sign", "floor", "greater", "cast", "one_hot", "batch_count"}))
def vjp_none(b, g, node):
    return (None,) * len(node.inputs)


@vjp("identity")
def vjp_identity(b, g, node):
    return (g,)


@vjp("add")
def vjp_add(b, g, node):
    x, y = node.inputs
    return unbroadcast(b, g, x), unbroadcast(b, g, y)


@vjp("sub")
def vjp_sub(b, g, node):
    x, y = node.inputs
    return unbroadcast(b, g, x), unbroadcast(b, b.neg(g), y)


@vjp("mul")
def vjp_mul(b, g, node):
    x, y = node.inputs
    return unbroadcast(b, b.mul(g, y), x), unbroadcast(b, b.mul(g, x), y)


@vjp("div")
def vjp_div(b, g, node):
    # d(x/y) = dx / y − dy · (x/y) / y
    x, y = node.inputs
    gx = b.div(g, y)
    return unbroadcast(b, gx, x), unbroadcast(b, b.neg(b.mul(gx, node.output)), y)


@vjp("pow")
def vjp_pow(b, g, node):
    # d(xʸ) = y·x^(y−1) dx + xʸ·ln x dy
    x, y = node.inputs
    gx = b.mul(g, b.mul(y, b.op("pow", x, b.sub(y, b.scalar(1.0)))))
    gy = b.mul(g, b.mul(node.output, b.op("log", x)))
    return unbroadcast(b, gx, x), unbroadcast(b, gy, y)


@vjp("maximum", "minimum")
def vjp_extremum(b, g, node):
    # the gradient goes to the input that was picked; ties go to the first
    x, y = node.inputs
    other_wins = b.op("greater", y, x) if node.op == "maximum" else b.op("greater", x, y)
    zero = b.scalar(0.0)
    return (unbroadcast(b, b.op("where", other_wins, zero, g), x),
            unbroadcast(b, b.op("where", other_wins, g, zero), y))


@vjp("neg")
def vjp_neg(b, g, node):
    return (b.neg(g),)


@vjp("exp")
def vjp_exp(b, g, node):
    return (b.mul(g, node.output),)            # d eˣ = eˣ


@vjp("log")
def vjp_log(b, g, node):
    return (b.div(g, node.inputs[0]),)         # d ln x = 1/x


@vjp("sqrt")
def vjp_sqrt(b, g, node):
    return (b.div(g, b.mul(b.scalar(2.0), node.output)),)   # d √x = 1/(2√x)


@vjp("abs")
def vjp_abs(b, g, node):
    return (b.mul(g, b.op("sign", node.inputs[0])),)        # d |x| = sign x


@vjp("relu")
def vjp_relu(b, g, node):
    return (b.mul(g, b.op("sign", node.output)),)           # d relu = 1 where y > 0 (sign y ∈ {0, 1})


@vjp("leaky_relu")
def vjp_leaky_relu(b, g, node):
    positive = b.op("greater", node.inputs[0], b.scalar(0.0))
    return (b.op("where", positive, g, b.mul(g, b.scalar(node.attr("alpha")))),)


@vjp("sigmoid")
def vjp_sigmoid(b, g, node):
    y = node.output                                         # d σ = σ(1 − σ)
    return (b.mul(g, b.mul(y, b.sub(b.scalar(1.0), y))),)


@vjp("tanh")
def vjp_tanh(b, g, node):
    y = node.output                                         # d tanh = 1 − y²
    return (b.mul(g, b.sub(b.scalar(1.0), b.mul(y, y))),)


@vjp("softmax")
def vjp_softmax(b, g, node):
    # dx = y ⊙ (g − Σ_j g_j y_j)
    y, axis = node.output, node.attr("axis", -1)
    dot = b.op("reduce_sum", b.mul(g, y), axes=(axis,), keepdims=True)
    return (b.mul(y, b.sub(g, dot)),)


@vjp("log_softmax")
def vjp_log_softmax(b, g, node):
    # dx = g − softmax(x) · Σ_j g_j
    axis = node.attr("axis", -1)
    total = b.op("reduce_sum", g, axes=(axis,), keepdims=True)
    return (b.sub(g, b.mul(b.op("exp", node.output), total)),)


@vjp("where")
def vjp_where(b, g, node):
    c, x, y = node.inputs
    zero = b.scalar(0.0)
    return None, unbroadcast(b, b.op("where", c, g, zero), x), unbroadcast(b, b.op("where", c, zero, g), y)


@vjp("dense")
def vjp_dense(b, g, node):
    # y = x Wᵀ + b:  dx = g W,  dW = gᵀ x,  db = Σ_rows g
    x, w, _ = node.inputs
    return (b.op("matmul", g, w), b.op("matmul", g, x, trans_a=1),
            b.op("reduce_sum", g, axes=(0,), keepdims=False))


@vjp("matmul")
def vjp_matmul(b, g, node):
    # C = op(A)·op(B):  d op(A) = g·op(B)ᵀ,  d op(B) = op(A)ᵀ·g, transposed back where op transposes
    a, m = node.inputs
    ta, tb = int(node.attr("trans_a", 0)), int(node.attr("trans_b", 0))
    ga = b.op("matmul", m, g, trans_a=tb, trans_b=1) if ta else b.op("matmul", g, m, trans_a=0, trans_b=1 - tb)
    gb = b.op("matmul", g, a, trans_a=1, trans_b=ta) if tb else b.op("matmul", a, g, trans_a=1 - ta, trans_b=0)
    return ga, gb


def _expand_back(b: Builder, g: Value, x: Value, node: Node) -> Value:
    """g of a reduction's output, put back on x's shape (Σ's VJP copies g to every term)."""
    axes = tuple(range(x.rank)) if node.attr("axes") is None else tuple(a % x.rank for a in node.attr("axes"))
    if not node.attr("keepdims", False) and axes:
        g = b.op("unsqueeze", g, axes=axes)
    return b.op("expand_as", g, x)


@vjp("reduce_sum")
def vjp_reduce_sum(b, g, node):
    return (_expand_back(b, g, node.inputs[0], node),)


@vjp("reduce_mean")
def vjp_reduce_mean(b, g, node):
    x = node.inputs[0]
    axes = tuple(range(x.rank)) if node.attr("axes") is None else tuple(a % x.rank for a in node.attr("axes"))
    return (b.div(_expand_back(b, g, x, node), _reduced_count(b, x, axes)),)


@vjp("unsqueeze", "reshape_as", "flatten")
def vjp_reshape(b, g, node):
    x = node.inputs[0]
    return (b.op("reshape_as", g, x),) + (None,) * (len(node.inputs) - 1)


@vjp("squeeze")
def vjp_squeeze(b, g, node):
    return (b.op("reshape_as", g, node.inputs[0]),)


@vjp("expand_as")
def vjp_expand_as(b, g, node):
    x, _ = node.inputs
    return unbroadcast(b, g, x), None


@vjp("softmax_cross_entropy")
def vjp_softmax_cross_entropy(b, g, node):
    # dz = g · (softmax(z) − onehot(y)) / m
    z, y = node.inputs
    residual = b.sub(b.op("softmax", z, axis=-1), b.op("one_hot", y, depth=z.shape[-1], dtype=z.dtype))
    return b.mul(b.div(g, b.op("batch_count", z, dtype=z.dtype)), residual), None


@vjp("sigmoid_bce")
def vjp_sigmoid_bce(b, g, node):
    # dz = g · (σ(z) − y) / m
    z, y = node.inputs
    count = _reduced_count(b, z, tuple(range(z.rank)))
    return b.mul(b.div(g, count), b.sub(b.op("sigmoid", z), y)), None


@vjp("mse")
def vjp_mse(b, g, node):
    # J = mean (p − y)²:  dp = 2 (p − y) g / count,  dy = −dp
    p, y = node.inputs
    count = _reduced_count(b, p, tuple(range(p.rank)))
    gp = b.mul(b.div(b.mul(g, b.scalar(2.0)), count), b.sub(p, y))
    return gp, b.neg(gp)
