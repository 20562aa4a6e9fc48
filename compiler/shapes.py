"""Shape rules: one per IR op, each mapping (inputs, attrs) to (dtype, shape).

A shape is a tuple of ints with the symbol "N" for the batch size. A rule raises
`ShapeError` when its inputs do not fit; lowering turns that into a located DlnError.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from .ir import Shape, Value, registrar

SHAPE_RULES: dict[str, Callable[[tuple[Value, ...], Mapping[str, Any]], tuple[str, Shape]]] = {}


class ShapeError(ValueError):
    """Inputs whose shapes an op cannot take."""


rule = registrar(SHAPE_RULES)


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
    (n, m) = x.shape if attrs.get("x_t") else x.shape[::-1]
    if n != w.shape[1]:
        raise ShapeError(f"dense input has {n} features but W expects {w.shape[1]}")
    return x.dtype, (w.shape[0], m) if attrs.get("y_t") else (m, w.shape[0])


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


@rule("as_row")
def shape_as_row(inputs, attrs):
    (x,) = inputs
    if any(isinstance(d, str) for d in x.shape):
        raise ShapeError(f"as_row needs a static shape; got {x.shape}")
    return x.dtype, (1, int(np.prod(x.shape, dtype=np.int64)))


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


# ---------------------------------------------------------------- convolution and pooling
def window_count(n: int, k: int, s: int, begin: int = 0, end: int = 0) -> int:
    """Windows of size k at stride s over n padded by (begin, end): ⌊(n + begin + end − k)/s⌋ + 1."""
    return (n + begin + end - k) // s + 1


def same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """`padding=same` (as TensorFlow and PyTorch): the output is ⌈n/s⌉, so n itself at stride 1.

    The total t = max((⌈n/s⌉ − 1)·s + k − n, 0) is split (⌊t/2⌋, t − ⌊t/2⌋): for an even k the
    extra row goes to the bottom and the extra column to the right.
    """
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def unread(n: int, k: int, s: int, begin: int = 0, end: int = 0) -> int:
    """Rows of the padded input after the last window, which the windows never read: (n + p − k) mod s.

    It is the output_padding a transposed convolution needs to give back n rows."""
    return (n + begin + end - k) % s


def _image(x: Value, what: str) -> tuple[int, int]:
    if x.rank != 4 or any(isinstance(d, str) for d in x.shape[1:]):
        raise ShapeError(f"{what} needs an input (N, C, H, W); got {tuple(x.shape)}")
    return int(x.shape[2]), int(x.shape[3])


def _windows(x: Value, kernel, strides, pads, what: str) -> tuple[int, int]:
    (h, w), (kh, kw), (sh, sw) = _image(x, what), kernel, strides
    top, left, bottom, right = pads
    out = (window_count(h, kh, sh, top, bottom), window_count(w, kw, sw, left, right))
    if min(out) < 1:
        padded = f" padded by {tuple(pads)}" if any(pads) else ""
        raise ShapeError(f"{what} with a {kh}×{kw} window at stride {sh} over {tuple(x.shape)}{padded} "
                         f"gives an empty output {(*x.shape[:2], *out)}")
    return out


@rule("conv")
def shape_conv(inputs, attrs):
    x, w, *bias = inputs
    if w.rank != 4:
        raise ShapeError(f"conv filters must be (F, C, kh, kw); got {w.shape}")
    _image(x, "conv")
    if x.shape[1] != w.shape[1]:
        raise ShapeError(f"conv input has {x.shape[1]} channels but its filters {w.shape} expect {w.shape[1]}")
    if bias and tuple(bias[0].shape) != (w.shape[0],):
        raise ShapeError(f"conv bias must be ({w.shape[0]},); got {bias[0].shape}")
    return x.dtype, (x.shape[0], w.shape[0], *_windows(x, w.shape[2:], attrs["strides"], attrs["pads"], "conv"))


@rule("conv_transpose")
def shape_conv_transpose(inputs, attrs):
    # H = (Ho − 1)·s + kh − top − bottom + output_padding
    x, w = inputs
    (ho, wo), (sh, sw) = _image(x, "conv_transpose"), attrs["strides"]
    if w.rank != 4 or x.shape[1] != w.shape[0]:
        raise ShapeError(f"conv_transpose of {x.shape} needs filters ({x.shape[1]}, C, kh, kw); got {w.shape}")
    top, left, bottom, right = attrs["pads"]
    extra_h, extra_w = attrs.get("output_padding", (0, 0))
    if not (0 <= extra_h < sh and 0 <= extra_w < sw):
        raise ShapeError(f"conv_transpose output_padding {(extra_h, extra_w)} must lie below the strides {(sh, sw)}")
    h = (ho - 1) * sh + w.shape[2] - top - bottom + extra_h
    width = (wo - 1) * sw + w.shape[3] - left - right + extra_w
    return x.dtype, (x.shape[0], w.shape[1], h, width)


@rule("conv_filter_grad")
def shape_conv_filter_grad(inputs, attrs):
    x, g = inputs
    expected = _windows(x, attrs["kernel"], attrs["strides"], attrs["pads"], "conv_filter_grad")
    if g.rank != 4 or tuple(g.shape[2:]) != expected:
        raise ShapeError(f"conv_filter_grad of x {x.shape} needs g (N, F, {expected[0]}, {expected[1]}); got {g.shape}")
    return x.dtype, (g.shape[1], x.shape[1], *attrs["kernel"])


@rule("conv_filter_grad_pooled")
def shape_conv_filter_grad_pooled(inputs, attrs):
    x, g, r, y = inputs
    _, unpooled = shape_maxpool_grad((g, r, y), {"kernel": attrs["pool"], "strides": attrs["pool"]})
    return shape_conv_filter_grad((x, Value(g.name, g.dtype, unpooled)), attrs)


@rule("maxpool", "avgpool")
def shape_pool(inputs, attrs):
    (x,) = inputs
    return x.dtype, (*x.shape[:2], *_windows(x, attrs["kernel"], attrs["strides"], (0, 0, 0, 0), "pooling"))


@rule("maxpool_argmax")
def shape_maxpool_argmax(inputs, attrs):
    return "int64", shape_pool(inputs, attrs)[1]


def windows_tile(shape, kernel, strides) -> bool:
    """Whether kh×kw windows at strides (kh, kw) cover an (…, H, W) tensor exactly once."""
    h, w = shape[-2:]
    return (tuple(strides) == tuple(kernel) and isinstance(h, int) and isinstance(w, int)
            and h % kernel[0] == 0 and w % kernel[1] == 0)


@rule("maxpool_grad")
def shape_maxpool_grad(inputs, attrs):
    g, x, y = inputs
    if not windows_tile(x.shape, attrs["kernel"], attrs["strides"]):
        raise ShapeError(f"maxpool_grad needs windows that tile x {x.shape}: strides = kernel {attrs['kernel']} "
                         f"and sizes divisible by it; got strides {attrs['strides']}")
    pooled = shape_pool((x,), attrs)[1]
    if tuple(g.shape) != tuple(pooled) or tuple(y.shape) != tuple(pooled):
        raise ShapeError(f"maxpool_grad of x {x.shape} needs g and y shaped {pooled}; got {g.shape}, {y.shape}")
    return g.dtype, x.shape


@rule("avgpool_transpose")
def shape_avgpool_transpose(inputs, attrs):
    (g,) = inputs
    h, w = attrs["input_size"]
    expected = (window_count(h, attrs["kernel"][0], attrs["strides"][0]),
                window_count(w, attrs["kernel"][1], attrs["strides"][1]))
    if tuple(g.shape[2:]) != expected:
        raise ShapeError(f"avgpool_transpose to {h}×{w} needs g (N, C, {expected[0]}, {expected[1]}); got {g.shape}")
    return g.dtype, (*g.shape[:2], h, w)


@rule("take")
def shape_take(inputs, attrs):
    x, indices = inputs
    if indices.dtype != "int64":
        raise ShapeError(f"take needs int64 indices; got {indices.dtype}")
    return x.dtype, indices.shape


@rule("scatter_add")
def shape_scatter_add(inputs, attrs):
    x, indices, like = inputs
    if indices.dtype != "int64" or tuple(indices.shape) != tuple(x.shape):
        raise ShapeError(f"scatter_add needs int64 indices shaped like x {x.shape}; got {indices.dtype} {indices.shape}")
    return x.dtype, like.shape


# ---------------------------------------------------------------- sequences
RECURRENT_GATES = {"rnn_seq": 1, "gru_seq": 3, "lstm_seq": 4}


def folded(n, t):
    """The size of a batch axis n and a time axis t merged into one: their product, or the symbol "n*t"."""
    return n * t if isinstance(n, int) and isinstance(t, int) else f"{n}*{t}"


def _sequence(x: Value, what: str):
    """T of a sequence x (m, T, ...)."""
    if x.rank < 2:
        raise ShapeError(f"{what} needs a sequence (N, T, ...); got {tuple(x.shape)}")
    return x.shape[1]


def _static_rest(x: Value, what: str) -> None:
    if any(not isinstance(d, int) for d in x.shape[2:]):
        raise ShapeError(f"{what} needs static sizes after the batch and time axes; got {tuple(x.shape)}")


def _axis_of(x: Value, attrs) -> int:
    axis = attrs["axis"]
    if not -x.rank <= axis < x.rank:
        raise ShapeError(f"axis {axis} is outside a tensor of rank {x.rank}")
    return axis % x.rank


@rule("embedding")
def shape_embedding(inputs, attrs):
    w, ids = inputs
    if w.rank != 2 or ids.dtype != "int64":
        raise ShapeError(f"embedding needs a table W (V, D) and int64 ids; got W {w.shape}, ids {ids.dtype}")
    return w.dtype, (*ids.shape, w.shape[1])


@rule("embedding_grad")
def shape_embedding_grad(inputs, attrs):
    g, ids, like = inputs
    if like.rank != 2 or ids.dtype != "int64" or tuple(g.shape) != (*ids.shape, like.shape[1]):
        raise ShapeError(f"embedding_grad needs g (*ids.shape, D), int64 ids and a table (V, D); got g {g.shape}, "
                         f"ids {ids.dtype} {ids.shape}, table {like.shape}")
    return g.dtype, like.shape


@rule("time_step")
def shape_time_step(inputs, attrs):
    (x,) = inputs
    steps, t = _sequence(x, "time_step"), attrs["t"]
    if isinstance(steps, int) and not -steps <= t < steps:
        raise ShapeError(f"step {t} is outside a sequence of {steps} steps")
    return x.dtype, (x.shape[0], *x.shape[2:])


@rule("stack_steps")
def shape_stack_steps(inputs, attrs):
    first = inputs[0]
    if any(tuple(v.shape) != tuple(first.shape) or v.dtype != first.dtype for v in inputs):
        raise ShapeError(f"stack_steps needs steps of one shape and dtype; got {[tuple(v.shape) for v in inputs]}")
    return first.dtype, (first.shape[0], len(inputs), *first.shape[1:])


@rule("slice_axis")
def shape_slice_axis(inputs, attrs):
    (x,) = inputs
    axis = _axis_of(x, attrs)
    size, start, end = x.shape[axis], attrs["start"], attrs["end"]
    if not isinstance(size, int) or not 0 <= start < end <= size:
        raise ShapeError(f"slice [{start}:{end}] of axis {axis} does not fit {tuple(x.shape)}")
    return x.dtype, (*x.shape[:axis], end - start, *x.shape[axis + 1:])


@rule("pad_axis")
def shape_pad_axis(inputs, attrs):
    (x,) = inputs
    axis = _axis_of(x, attrs)
    size, before, after = x.shape[axis], attrs["before"], attrs["after"]
    if not isinstance(size, int) or before < 0 or after < 0:
        raise ShapeError(f"pad_axis needs a static axis {axis} and sizes ≥ 0; got {tuple(x.shape)}, {before}, {after}")
    return x.dtype, (*x.shape[:axis], before + size + after, *x.shape[axis + 1:])


@rule("concat")
def shape_concat(inputs, attrs):
    first = inputs[0]
    axis = _axis_of(first, attrs)
    sizes = [v.shape[axis] for v in inputs]
    rest = [tuple(v.shape[:axis]) + tuple(v.shape[axis + 1:]) for v in inputs]
    if any(r != rest[0] for r in rest) or any(not isinstance(s, int) for s in sizes) \
            or any(v.dtype != first.dtype for v in inputs):
        raise ShapeError(f"concat along axis {axis} needs static sizes there and equal shapes elsewhere; "
                         f"got {[tuple(v.shape) for v in inputs]}")
    return first.dtype, (*first.shape[:axis], sum(sizes), *first.shape[axis + 1:])


@rule("fold_time")
def shape_fold_time(inputs, attrs):
    (x,) = inputs
    steps = _sequence(x, "fold_time")
    _static_rest(x, "fold_time")
    return x.dtype, (folded(x.shape[0], steps), *x.shape[2:])


@rule("unfold_time")
def shape_unfold_time(inputs, attrs):
    y, like = inputs
    n, steps = like.shape[0], _sequence(like, "unfold_time")
    if y.rank < 1 or y.shape[0] != folded(n, steps) or any(not isinstance(d, int) for d in y.shape[1:]):
        raise ShapeError(f"unfold_time of {tuple(y.shape)} needs ({folded(n, steps)}, static sizes...) "
                         f"to match {tuple(like.shape)}")
    return y.dtype, (n, steps, *y.shape[1:])


@rule("stop_gradient")
def shape_stop_gradient(inputs, attrs):
    (x,) = inputs
    return x.dtype, x.shape


@rule("onnx_graph")
def shape_onnx_graph(inputs, attrs):
    # the shape ONNX shape inference gave the trunk's output, batch symbolic
    return attrs["graph"].dtype, attrs["graph"].shape


def _shape_recurrent(gates: int, inputs, attrs):
    x, w, r, bias = inputs
    hidden = attrs["hidden"]
    if x.rank != 3 or not isinstance(x.shape[2], int):
        raise ShapeError(f"a recurrent layer needs a sequence (N, T, features); got {tuple(x.shape)}")
    expected = ((1, gates * hidden, x.shape[2]), (1, gates * hidden, hidden), (1, 2 * gates * hidden))
    if (tuple(w.shape), tuple(r.shape), tuple(bias.shape)) != expected:
        raise ShapeError(f"a recurrent layer of {hidden} units over {x.shape[2]} features needs W, R, B of shapes "
                         f"{expected}; got {tuple(w.shape)}, {tuple(r.shape)}, {tuple(bias.shape)}")
    return x.dtype, ((x.shape[0], hidden) if attrs.get("last") else (x.shape[0], x.shape[1], hidden))


@rule("rnn_seq")
def shape_rnn_seq(inputs, attrs):
    return _shape_recurrent(RECURRENT_GATES["rnn_seq"], inputs, attrs)


@rule("gru_seq")
def shape_gru_seq(inputs, attrs):
    return _shape_recurrent(RECURRENT_GATES["gru_seq"], inputs, attrs)


@rule("lstm_seq")
def shape_lstm_seq(inputs, attrs):
    return _shape_recurrent(RECURRENT_GATES["lstm_seq"], inputs, attrs)
