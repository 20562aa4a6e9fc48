"""VJP rules: one per IR op. Each builds IR (never numbers) for the gradient of every input.

A rule takes the builder `b`, the upstream gradient `g` (shaped like the node's output) and
the node, and returns one gradient per input, `None` where there is none. Broadcasting is
undone in one place, `unbroadcast`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .ir import NON_DIFFERENTIABLE, Builder, Node, Value, registrar
from .shapes import unread, windows_tile

VJP_RULES: dict[str, Callable[[Builder, Value, Node], tuple[Value | None, ...]]] = {}


vjp = registrar(VJP_RULES)


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


@vjp(*sorted(NON_DIFFERENTIABLE))
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
    # d relu = 1 where y > 0; the mask as a cast comparison (ONNX Runtime's Sign is ~2.5× slower)
    return (b.mul(g, b.op("cast", b.op("greater", node.output, b.scalar(0.0)), dtype=g.dtype)),)


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
    # Y = X Wᵀ + b with X = x or xᵀ (x_t), Y = y or yᵀ (y_t), G the gradient of Y:
    #   dX = G W,  dW = Gᵀ X,  db = Σ_m G;  each gradient comes in its value's layout
    #   (x_t: dxᵀ = Wᵀ Gᵀ), and Gᵀ is g itself when y is feature-major
    x, w, _ = node.inputs
    x_t, y_t = int(node.attr("x_t", 0)), int(node.attr("y_t", 0))
    dx = b.op("matmul", w, g, trans_a=1, trans_b=1 - y_t) if x_t else b.op("matmul", g, w, trans_a=y_t, trans_b=0)
    return (dx, b.op("matmul", g, x, trans_a=1 - y_t, trans_b=x_t),
            b.op("reduce_sum", g, axes=(y_t,), keepdims=False))


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


@vjp("unsqueeze", "reshape_as", "flatten", "as_row")
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


# ---------------------------------------------------------------- convolution and pooling
# conv is bilinear in (x, w): ⟨conv(x, w), g⟩ = ⟨x, conv_transpose(g, w)⟩ = ⟨w, conv_filter_grad(x, g)⟩.
# The three ops are each other's adjoints, so their VJPs close over the same three ops.
def _conv_attrs(node: Node) -> dict:
    return {"strides": node.attr("strides"), "pads": node.attr("pads")}


def _output_padding(x: Value, kernel, strides, pads) -> tuple[int, int]:
    """The rows and columns of x after conv's last window, which conv_transpose must give back."""
    top, left, bottom, right = pads
    return (unread(int(x.shape[2]), kernel[0], strides[0], top, bottom),
            unread(int(x.shape[3]), kernel[1], strides[1], left, right))


@vjp("conv")
def vjp_conv(b, g, node):
    # dx = conv_transpose(g, w),  dw = conv_filter_grad(x, g),  db[f] = Σ_{n,p,q} g[n, f, p, q]
    x, w, *bias = node.inputs
    attrs, kernel = _conv_attrs(node), tuple(w.shape[2:])
    dx = b.op("conv_transpose", g, w, **attrs,
              output_padding=_output_padding(x, kernel, attrs["strides"], attrs["pads"]))
    dw = b.op("conv_filter_grad", x, g, **attrs, kernel=kernel, batch=b.batch)
    db = [b.op("reduce_sum", g, axes=(0, 2, 3), keepdims=False)] if bias else []
    return (dx, dw, *db)


@vjp("conv_transpose")
def vjp_conv_transpose(b, g, node):
    # y = conv_transpose(x, w) = (∂conv/∂x)ᵀ x:  dx = conv(g, w),  dw = conv_filter_grad(g, x)
    x, w = node.inputs
    attrs = _conv_attrs(node)
    return (b.op("conv", g, w, **attrs),
            b.op("conv_filter_grad", g, x, **attrs, kernel=tuple(w.shape[2:])))


@vjp("conv_filter_grad")
def vjp_conv_filter_grad(b, g, node):
    x, h = node.inputs
    return _filter_grad_adjoints(b, g, node, x, h)


def _filter_grad_adjoints(b, g, node, x, h):
    # ⟨conv_filter_grad(x, h), g⟩ = ⟨conv(x, g), h⟩:  dx = conv_transpose(h, g),  dh = conv(x, g)
    attrs, kernel = _conv_attrs(node), node.attr("kernel")
    dx = b.op("conv_transpose", h, g, **attrs,
              output_padding=_output_padding(x, kernel, attrs["strides"], attrs["pads"]))
    return dx, b.op("conv", x, g, **attrs)


@vjp("maxpool")
def vjp_maxpool(b, g, node):
    # each g goes to the (first) maximum of its window; overlapping windows add up
    (x,) = node.inputs
    window = {"kernel": node.attr("kernel"), "strides": node.attr("strides")}
    if windows_tile(x.shape, **window):
        return (b.op("maxpool_grad", g, x, node.output, **window),)
    argmax = b.op("maxpool_argmax", x, **window)
    return (b.op("scatter_add", g, argmax, x),)


@vjp("maxpool_grad")
def vjp_maxpool_grad(b, h, node):
    # linear in g: dx = M(x)·g routes g to the first maxima, so dg = M(x)ᵀ·h = h at each first maximum
    g, x, y = node.inputs
    argmax = b.op("maxpool_argmax", x, kernel=node.attr("kernel"), strides=node.attr("strides"))
    return b.op("take", h, argmax), None, None


@vjp("conv_filter_grad_pooled")
def vjp_conv_filter_grad_pooled(b, h, node):
    # conv_filter_grad(x, u) with u = maxpool_grad(g, r, y): dx and du as conv_filter_grad's, and
    # dg = du at each window's first maximum (maxpool_grad's VJP)
    x, g, r, y = node.inputs
    window = {"kernel": node.attr("pool"), "strides": node.attr("pool")}
    dx, du = _filter_grad_adjoints(b, h, node, x, b.op("maxpool_grad", g, r, y, **window))
    return dx, b.op("take", du, b.op("maxpool_argmax", r, **window)), None, None


@vjp("avgpool")
def vjp_avgpool(b, g, node):
    # dx[p] = Σ over the windows w ∋ p of g[w] / (kh·kw)
    (x,) = node.inputs
    return (b.op("avgpool_transpose", g, kernel=node.attr("kernel"), strides=node.attr("strides"),
                 input_size=tuple(int(d) for d in x.shape[2:])),)


@vjp("avgpool_transpose")
def vjp_avgpool_transpose(b, g, node):
    return (b.op("avgpool", g, kernel=node.attr("kernel"), strides=node.attr("strides")),)


@vjp("take")
def vjp_take(b, g, node):
    # y = x.flat[i]:  dx = scatter_add(g, i) (an index taken twice gets both gradients)
    x, indices = node.inputs
    return b.op("scatter_add", g, indices, x), None


@vjp("scatter_add")
def vjp_scatter_add(b, g, node):
    # y.flat[i] += x:  dx = g.flat[i]
    _, indices, _ = node.inputs
    return b.op("take", g, indices), None, None


# ---------------------------------------------------------------- sequences
# The slicing ops and their adjoints come in pairs: time_step ↔ pad_axis of one step,
# slice_axis ↔ pad_axis, concat/stack_steps ↔ slices, fold_time ↔ unfold_time, embedding ↔
# embedding_grad. Pads of the pieces of one tensor, summed, become one concat again in the
# simplifier (`join_padded_pieces`).
def _static_steps(x: Value, what: str) -> int:
    steps = x.shape[1]
    if not isinstance(steps, int):
        raise ValueError(f"the gradient of {what} needs a static number of steps; got {x.shape}")
    return steps


@vjp("embedding")
def vjp_embedding(b, g, node):
    # y = W[ids]:  dW = Σ of g's rows into the rows the ids picked
    w, ids = node.inputs
    return b.op("embedding_grad", g, ids, w), None


@vjp("embedding_grad")
def vjp_embedding_grad(b, g, node):
    # y[ids] += g:  dg = g[ids]
    _, ids, _ = node.inputs
    return b.op("embedding", g, ids), None, None


@vjp("time_step")
def vjp_time_step(b, g, node):
    # y = x[:, t]:  dx = g at step t, zeros at the other steps
    (x,) = node.inputs
    steps = _static_steps(x, "time_step")
    t = node.attr("t") % steps
    return (b.op("pad_axis", b.op("unsqueeze", g, axes=(1,)), axis=1, before=t, after=steps - 1 - t),)


@vjp("stack_steps")
def vjp_stack_steps(b, g, node):
    # y[:, t] = x_t:  dx_t = g[:, t]
    return tuple(b.op("time_step", g, t=t) for t in range(len(node.inputs)))


@vjp("slice_axis")
def vjp_slice_axis(b, g, node):
    # y = x[start:end]:  dx = g padded back with zeros to x's size
    (x,) = node.inputs
    axis = node.attr("axis") % x.rank
    start, end = node.attr("start"), node.attr("end")
    return (b.op("pad_axis", g, axis=axis, before=start, after=int(x.shape[axis]) - end),)


@vjp("pad_axis")
def vjp_pad_axis(b, g, node):
    # y = [0, x, 0]:  dx = g[before:before + n]
    (x,) = node.inputs
    axis = node.attr("axis") % x.rank
    before = node.attr("before")
    return (b.op("slice_axis", g, axis=axis, start=before, end=before + int(x.shape[axis])),)


@vjp("concat")
def vjp_concat(b, g, node):
    # y = [x_0, x_1, ...]:  dx_i = g over x_i's range
    axis = node.attr("axis") % node.output.rank
    grads, start = [], 0
    for x in node.inputs:
        end = start + int(x.shape[axis])
        grads.append(b.op("slice_axis", g, axis=axis, start=start, end=end))
        start = end
    return tuple(grads)


@vjp("fold_time")
def vjp_fold_time(b, g, node):
    return (b.op("unfold_time", g, node.inputs[0]),)


@vjp("unfold_time")
def vjp_unfold_time(b, g, node):
    return b.op("fold_time", g), None


@vjp("rnn_seq", "gru_seq", "lstm_seq")
def vjp_recurrent(b, g, node):
    # the ONNX recurrent ops have no adjoint op: unroll the cell over the (static) window with
    # compiler.cells, then reverse-mode differentiate ⟨y, g⟩ with g held constant
    from .autodiff import grad
    from .cells import unroll
    _static_steps(node.inputs[0], node.op)
    y = unroll(b, node.op.removesuffix("_seq"), *node.inputs, activation=node.attr("activation", "tanh"),
               last=bool(node.attr("last", False)))
    inner = b.op("reduce_sum", b.mul(y, b.op("stop_gradient", g)), axes=None, keepdims=False)
    grads = grad(b, inner, node.inputs)
    return tuple(grads[v.name] for v in node.inputs)
