"""ONNX emission: one rule per IR op, and the graph-to-ModelProto conversion.

Only standard `ai.onnx` ops are emitted, at any opset from 13 (`MIN_OPSET`) to the newest the
installed onnx knows. Rules that depend on the opset ask `ctx.opset`, inside that op's one rule.
What changed across those opsets for the ops emitted here:
- ReduceSum takes its axes as an input from 13; ReduceMean, ReduceMax, ... from 18 (`_reduce`).
- Squeeze and Unsqueeze take their axes as an input from 13 on (no switch needed from 13).
- Softmax and LogSoftmax work on one axis from 13 on (the older ones flattened the trailing axes).
- Later versions (Identity 21, Squeeze 23, Flatten 21, Reshape 21, ...) only widen the types.
The IR version defaults to 8 or the oldest that can carry the opset, whichever is newer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dsl.errors import DlnError

from . import __version__
from .ir import Graph, Node, Value, registrar

ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
               "int64": TensorProto.INT64, "bool": TensorProto.BOOL}
DEFAULT_OPSET = 17
DEFAULT_IR_VERSION = 8
MIN_OPSET = 13            # Softmax on one axis; Squeeze, Unsqueeze and ReduceSum axes as inputs


def newest_opset() -> int:
    """The newest `ai.onnx` opset the installed onnx package knows."""
    return onnx.defs.onnx_opset_version()


def min_ir_version(opset: int) -> int:
    """The oldest ONNX IR version that can carry `opset`."""
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=True)


def resolve_target(opset: int, ir_version: int | None = None) -> tuple[int, int]:
    """(opset, IR version) checked; a missing IR version is 8 or the oldest for `opset`."""
    newest = newest_opset()
    if not MIN_OPSET <= opset <= newest:
        raise DlnError(f"--opset {opset} is not available: dlnc emits ONNX opsets {MIN_OPSET} to {newest} "
                       f"(the newest the installed onnx {onnx.__version__} knows)")
    oldest = min_ir_version(opset)
    if ir_version is None:
        return opset, max(DEFAULT_IR_VERSION, oldest)
    if ir_version > onnx.IR_VERSION:
        raise DlnError(f"--ir-version {ir_version} is newer than the installed onnx {onnx.__version__} "
                       f"writes (IR version {onnx.IR_VERSION} at most)")
    if ir_version < oldest:
        raise DlnError(f"--ir-version {ir_version} cannot carry opset {opset}: write --ir-version {oldest} "
                       f"or later, or leave it out")
    return opset, ir_version


@dataclass
class EmitContext:
    """Collects the ONNX nodes and constant initializers of one graph as rules emit them."""

    opset: int
    nodes: list = field(default_factory=list)
    initializers: dict = field(default_factory=dict)
    producers: Mapping[str, Node] = field(default_factory=dict)   # IR value name -> the node making it

    def node(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def const(self, array: np.ndarray, name: str) -> str:
        """A constant tensor as an initializer; equal constants share one name."""
        array = np.asarray(array)
        for existing, tensor in self.initializers.items():
            if existing.startswith("const.") and tensor.dtype == array.dtype and tensor.shape == array.shape \
                    and np.array_equal(tensor, array):
                return existing
        name = name if name not in self.initializers else f"{name}_{len(self.initializers)}"
        self.initializers[name] = array
        return name

    def made(self, name: str) -> bool:
        """Whether a node emitted so far outputs `name` (a value shared by several rules)."""
        return any(name in node.output for node in self.nodes)

    def ints(self, value, hint: str) -> str:
        """An int64 constant (a shape, axes, indices) named after `hint`."""
        return self.const(np.asarray(value, dtype=np.int64), f"const.{hint}")

    def axes(self, axes, hint: str) -> str:
        return self.ints(axes, f"{hint}.axes")


EMIT_RULES: dict[str, Callable[[EmitContext, Node], None]] = {}


emit = registrar(EMIT_RULES)


def _names(node: Node) -> list[str]:
    return [v.name for v in node.inputs]


@emit("const")
def emit_const(ctx, node):
    ctx.initializers[node.output.name] = np.asarray(node.attr("value"))


_ONE_TO_ONE = {"identity": "Identity", "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div",
               "pow": "Pow", "maximum": "Max", "minimum": "Min", "neg": "Neg", "exp": "Exp",
               "log": "Log", "sqrt": "Sqrt", "floor": "Floor", "abs": "Abs", "sign": "Sign", "relu": "Relu",
               "sigmoid": "Sigmoid", "tanh": "Tanh", "greater": "Greater", "where": "Where"}


@emit(*_ONE_TO_ONE)
def emit_one_to_one(ctx, node):
    ctx.node(_ONE_TO_ONE[node.op], _names(node), node.output.name)


@emit("leaky_relu")
def emit_leaky_relu(ctx, node):
    ctx.node("LeakyRelu", _names(node), node.output.name, alpha=float(node.attr("alpha")))


@emit("softmax", "log_softmax")
def emit_softmax(ctx, node):
    op_type = "Softmax" if node.op == "softmax" else "LogSoftmax"
    ctx.node(op_type, _names(node), node.output.name, axis=int(node.attr("axis", -1)))


@emit("cast")
def emit_cast(ctx, node):
    ctx.node("Cast", _names(node), node.output.name, to=ONNX_DTYPES[node.attr("dtype")])


@emit("dense")
def emit_dense(ctx, node):
    # batch-first out, Gemm: Y = X·Wᵀ + b, with X = xᵀ (transA) where x comes feature-major;
    # feature-major out, Gemm: Yᵀ = W·Xᵀ + b, the bias a column (n_out, 1) broadcast over the batch
    x, w, bias = _names(node)
    out, x_t = node.output.name, int(node.attr("x_t", 0))
    if node.attr("y_t", 0):
        column = ctx.node("Unsqueeze", [bias, ctx.axes((1,), out)], f"{out}.bias_column")
        ctx.node("Gemm", [w, x, column], out, transB=1 - x_t)
    else:
        ctx.node("Gemm", [x, w, bias], out, transA=x_t, transB=1)


@emit("matmul")
def emit_matmul(ctx, node):
    ctx.node("Gemm", _names(node), node.output.name,
             transA=int(node.attr("trans_a", 0)), transB=int(node.attr("trans_b", 0)))


def _reduce(ctx: EmitContext, op_type: str, x: str, axes, keepdims: bool, out: str) -> str:
    """ReduceSum takes axes as an input from opset 13, the other reductions from opset 18."""
    keep = int(bool(keepdims))
    if axes is None:
        return ctx.node(op_type, [x], out, keepdims=keep)
    if op_type == "ReduceSum" or ctx.opset >= 18:
        return ctx.node(op_type, [x, ctx.axes(axes, out)], out, keepdims=keep)
    return ctx.node(op_type, [x], out, axes=list(axes), keepdims=keep)


@emit("reduce_sum", "reduce_mean")
def emit_reduce(ctx, node):
    (x,) = node.inputs
    axes = tuple(a % x.rank for a in node.attr("axes") or ())
    if node.op == "reduce_sum" and x.rank == 2 and len(axes) == 1 and not node.attr("keepdims", False):
        return _sum_by_gemv(ctx, x, axes[0], node.output.name)
    op_type = "ReduceSum" if node.op == "reduce_sum" else "ReduceMean"
    _reduce(ctx, op_type, node.inputs[0].name, node.attr("axes"), node.attr("keepdims", False), node.output.name)


def _sum_by_gemv(ctx: EmitContext, x: Value, axis: int, out: str) -> str:
    """Σᵢ x[i, :] as the vector-matrix product 1ᵀ·x (axis 0), Σⱼ x[:, j] as x·1 (axis 1), with 1 a
    vector of ones: a bias gradient, batch-first or feature-major. ONNX Runtime runs that MatMul as
    one GEMV; its ReduceSum over axis 0 of a (512, 256) gradient took 54 µs on 2 threads against the
    GEMV's 5 (bench/NOTES.md, section 11). All sums over the same batch share one vector of ones.
    x·1 multiplies by a column (N, 1) and squeezes: ONNX Runtime's MatMul with a 1-D right operand
    does not run as a GEMV (two of them cost the MLP's step 10 %, bench/NOTES.md section 21)."""
    size = x.shape[axis]
    if isinstance(size, int):
        ones = ctx.const(np.ones(size, dtype=np.dtype(x.dtype)), f"const.{out}.ones")
    else:
        ones = f"ones.{size}.{x.dtype}"
        if not ctx.made(ones):
            count = ctx.node("Slice", [ctx.node("Shape", [x.name], f"{ones}.shape"), ctx.ints([axis], f"index_{axis}"),
                                       ctx.ints([axis + 1], f"index_{axis + 1}")], f"{ones}.count")
            ctx.node("ConstantOfShape", [count], ones, value=helper.make_tensor("one", ONNX_DTYPES[x.dtype], [1], [1.0]))
    if axis == 0:
        return ctx.node("MatMul", [ones, x.name], out)
    column = f"{ones}.column"
    if not ctx.made(column):
        ctx.node("Unsqueeze", [ones, ctx.axes((1,), column)], column)
    product = ctx.node("MatMul", [x.name, column], f"{out}.column")
    return ctx.node("Squeeze", [product, ctx.axes((1,), out)], out)


@emit("unsqueeze")
def emit_unsqueeze(ctx, node):
    ctx.node("Unsqueeze", [node.inputs[0].name, ctx.axes(node.attr("axes"), node.output.name)], node.output.name)


@emit("squeeze")
def emit_squeeze(ctx, node):
    ctx.node("Squeeze", [node.inputs[0].name, ctx.axes(node.attr("axes"), node.output.name)], node.output.name)


def _shape_of(ctx: EmitContext, value: Value, out: str) -> str:
    """A static shape as a constant; a shape with the batch symbol read at run time."""
    if all(isinstance(d, int) for d in value.shape):
        return ctx.ints(value.shape, f"{out}.shape")
    return ctx.node("Shape", [value.name], f"{out}.shape")


@emit("reshape_as")
def emit_reshape_as(ctx, node):
    x, like = node.inputs
    ctx.node("Reshape", [x.name, _shape_of(ctx, like, node.output.name)], node.output.name)


@emit("expand_as")
def emit_expand_as(ctx, node):
    x, like = node.inputs
    ctx.node("Expand", [x.name, _shape_of(ctx, like, node.output.name)], node.output.name)


@emit("flatten")
def emit_flatten(ctx, node):
    ctx.node("Flatten", _names(node), node.output.name, axis=1)


@emit("as_row")
def emit_as_row(ctx, node):
    # Flatten at axis 0, not Reshape to [-1]: onnx's shape inference with data propagation
    # treats a 1-D tensor as a possible shape and walks its elements (0.3 s for a 200 000-element
    # vector), a (1, n) one it does not
    ctx.node("Flatten", _names(node), node.output.name, axis=0)


@emit("one_hot")
def emit_one_hot(ctx, node):
    # onehot[i, k] = (labels[i] == k): Equal against 0..depth−1, then Cast
    out = node.output.name
    labels = ctx.node("Unsqueeze", [node.inputs[0].name, ctx.axes([-1], out)], f"{out}.labels")
    classes = ctx.const(np.arange(node.attr("depth"), dtype=np.int64), f"const.{out}.classes")
    hits = ctx.node("Equal", [labels, classes], f"{out}.hits")
    ctx.node("Cast", [hits], out, to=ONNX_DTYPES[node.attr("dtype")])


@emit("batch_count")
def emit_batch_count(ctx, node):
    out = node.output.name
    ctx.node("Cast", [_batch_size(ctx, node.inputs[0], out)], out, to=ONNX_DTYPES[node.attr("dtype")])


def _batch_size(ctx: EmitContext, value: Value, out: str) -> str:
    """The length of value's first axis, read at run time: an int64 scalar named `out.n`."""
    shape = ctx.node("Shape", [value.name], f"{out}.shape")
    return ctx.node("Gather", [shape, ctx.ints(0, "zero_index")], f"{out}.n")


@emit("softmax_cross_entropy")
def emit_softmax_cross_entropy(ctx, node):
    # J = −(1/m) Σᵢ log softmax(zᵢ)[yᵢ]: LogSoftmax, each row's label entry picked by GatherElements,
    # the mean, negated. 5 nodes where ONNX Runtime expands SoftmaxCrossEntropyLoss into 10
    # (reshapes and an ignore_index path): about 1 % of an MLP step at batch 32 (bench/NOTES.md section 21)
    (z, y), out = _names(node), node.output.name
    log_p = ctx.node("LogSoftmax", [z], f"{out}.log_softmax", axis=1)
    labels = ctx.node("Unsqueeze", [y, ctx.axes((1,), out)], f"{out}.labels")
    picked = ctx.node("GatherElements", [log_p, labels], f"{out}.picked", axis=1)
    ctx.node("Neg", [_reduce(ctx, "ReduceMean", picked, None, False, f"{out}.mean")], out)


@emit("sigmoid_bce")
def emit_sigmoid_bce(ctx, node):
    # ℓ = max(z, 0) − z·y + log(1 + e^{−|z|}), averaged
    (z, y), out = _names(node), node.output.name
    positive = ctx.node("Relu", [z], f"{out}.relu")
    zy = ctx.node("Mul", [z, y], f"{out}.zy")
    neg_abs = ctx.node("Neg", [ctx.node("Abs", [z], f"{out}.abs")], f"{out}.neg_abs")
    one = ctx.const(np.asarray(1.0, dtype=np.dtype(node.output.dtype)), f"const.one.{node.output.dtype}")
    shifted = ctx.node("Add", [ctx.node("Exp", [neg_abs], f"{out}.exp"), one], f"{out}.one_plus_exp")
    softplus = ctx.node("Log", [shifted], f"{out}.softplus")
    terms = ctx.node("Add", [ctx.node("Sub", [positive, zy], f"{out}.diff"), softplus], f"{out}.terms")
    _reduce(ctx, "ReduceMean", terms, None, False, out)


@emit("mse")
def emit_mse(ctx, node):
    (p, y), out = _names(node), node.output.name
    diff = ctx.node("Sub", [p, y], f"{out}.diff")
    _reduce(ctx, "ReduceMean", ctx.node("Mul", [diff, diff], f"{out}.square"), None, False, out)


# ---------------------------------------------------------------- convolution and pooling
def _window_attrs(node: Node) -> dict:
    return {"kernel_shape": list(node.attr("kernel")), "strides": list(node.attr("strides"))}


@emit("conv")
def emit_conv(ctx, node):
    w = node.inputs[1]
    ctx.node("Conv", _names(node), node.output.name, kernel_shape=list(w.shape[2:]),
             strides=list(node.attr("strides")), pads=list(node.attr("pads")))


@emit("conv_transpose")
def emit_conv_transpose(ctx, node):
    w = node.inputs[1]
    ctx.node("ConvTranspose", _names(node), node.output.name, kernel_shape=list(w.shape[2:]),
             strides=list(node.attr("strides")), pads=list(node.attr("pads")),
             output_padding=list(node.attr("output_padding", (0, 0))))


@emit("conv_filter_grad")
def emit_conv_filter_grad(ctx, node):
    _emit_filter_grad(ctx, node, node.inputs[1], node.attr("strides"), node.output)


def _emit_filter_grad(ctx: EmitContext, node: Node, g: Value, dilations, result: Value) -> None:
    """result[f, c, i, j] = Σ_{n,p,q} g[n, f, p, q]·x_pad[n, c, p·dh + i, q·dw + j] with x = node's first input,
    padded by node's pads: a convolution of xᵀ (C, N, H, W), the images as channels, with g's maps as filters
    dilated by (dh, dw) (`_filter_grad_conv`); conv_filter_grad's g at the conv's strides, or the pooled
    gradients of conv_filter_grad_pooled. Where x has one channel, grouped by image when the mini-batch has
    the size the step is compiled for (node attr batch), else one sum over the images; an If on the batch size
    where that size is only known at run time (the last mini-batch of an epoch may be smaller). With several
    channels always the sum: it is as fast or faster on 2 threads (bench/NOTES.md section 18). The rows after
    the conv's last window (r = (H + p − kh) mod s) are left out: first from the end padding, then cropped
    from x."""
    x = node.inputs[0]
    out, batch, rows = result.name, node.attr("batch"), x.shape[0]
    (sh, sw), (top, left, bottom, right) = node.attr("strides"), node.attr("pads")
    (kh, kw), (h, w) = node.attr("kernel"), (int(x.shape[2]), int(x.shape[3]))
    extra_h, extra_w = (h + top + bottom - kh) % sh, (w + left + right - kw) % sw
    crop_h, crop_w = max(extra_h - bottom, 0), max(extra_w - right, 0)
    source = x.name
    if crop_h or crop_w:
        source = ctx.node("Slice", [x.name, ctx.ints([0, 0], f"{out}.starts"),
                                    ctx.ints([h - crop_h, w - crop_w], f"{out}.ends"),
                                    ctx.axes([2, 3], f"{out}.crop")], f"{out}.cropped")
    if x.shape[1] == 1:                     # (N, 1, H, W) → (1, N, H, W) moves no data
        xt = ctx.node("Reshape", [source, ctx.ints([1, -1, h - crop_h, w - crop_w], f"{out}.xT")], f"{out}.xT")
    else:
        xt = ctx.node("Transpose", [source], f"{out}.xT", perm=[1, 0, 2, 3])
    conv = {"kernel_shape": [int(d) for d in g.shape[2:]], "dilations": [int(d) for d in dilations],
            "strides": [1, 1], "pads": [top, left, bottom - (extra_h - crop_h), right - (extra_w - crop_w)]}
    size = tuple(int(d) for d in result.shape[2:])
    if batch is None or x.shape[1] != 1 or (isinstance(rows, int) and rows != batch):
        _filter_grad_conv(ctx, xt, g, size, conv, out, None)
    elif rows == batch:
        _filter_grad_conv(ctx, xt, g, size, conv, out, batch)
    else:                                   # a symbolic batch
        compiled = ctx.node("Equal", [_batch_size(ctx, g, out), ctx.ints(batch, f"{out}.batch")],
                            f"{out}.is_compiled_batch")
        branches = {}
        for branch, group in (("then_branch", batch), ("else_branch", None)):
            inner = EmitContext(ctx.opset, initializers=ctx.initializers, producers=ctx.producers)
            name = _filter_grad_conv(inner, xt, g, size, conv, f"{out}.{'by_image' if group else 'summed'}", group)
            branches[branch] = helper.make_graph(inner.nodes, f"{out}.{branch}", [], [value_info(replace(result, name=name))])
        ctx.nodes.append(helper.make_node("If", [compiled], [out], name=out, **branches))


def _filter_grad_conv(ctx: EmitContext, xt: str, g: Value, size: tuple[int, int], conv: dict, out: str,
                      batch: int | None) -> str:
    """The Conv of xᵀ (C, N, H, W) with g's maps as filters, into (F, C, *size) named `out`. Either
      batch None: the filters gᵀ (F, N, Ho, Wo), so the Conv sums over the images: (C, F, *size), transposed back;
      batch = N:  one group per image, the filters g as (N·F, 1, Ho, Wo): (C, N·F, *size), summed over the images
                  after. ONNX Runtime spreads the groups over its threads, where the summing Conv of a
                  one-channel input is a single image on one: LeNet-5's step +7 % on 2 threads, unchanged on 1
                  (bench/NOTES.md section 17). With C > 1 the summing Conv has C images to spread."""
    filters = int(g.shape[1])
    if batch is None:
        gt = ctx.node("Transpose", [g.name], f"{out}.gT", perm=[1, 0, 2, 3])
        grad_t = ctx.node("Conv", [xt, gt], f"{out}.T", **conv)
    else:
        per_image = ctx.node("Reshape", [g.name, ctx.ints([batch * filters, 1, *g.shape[2:]], f"{out}.filters")], f"{out}.filters")
        grouped = ctx.node("Conv", [xt, per_image], f"{out}.per_image", group=batch, **conv)
        split = ctx.node("Reshape", [grouped, ctx.ints([-1, batch, filters, *size], f"{out}.split")], f"{out}.split")
        grad_t = ctx.node("ReduceSum", [split, ctx.axes([1], f"{out}.images")], f"{out}.T", keepdims=0)
    return ctx.node("Transpose", [grad_t], out, perm=[1, 0, 2, 3])


@emit("conv_filter_grad_pooled")
def emit_conv_filter_grad_pooled(ctx, node):
    """dw = conv_filter_grad(x, maxpool_grad(g, r, y)) without unpooling g. With (a, b) a place in the pool's
    ph×pw window and g_ab = g·[the window's first maximum is at (a, b)] (pooled, `_first_maxima`):
        dw[f, c, i, j] = Σ_ab Σ_{n,p,q} g_ab[n, f, p, q]·x_pad[n, c, (p·ph + a)·sh + i, (q·pw + b)·sw + j]
    For each (a, b) that is the filter gradient of g_ab with the filters dilated by (ph·sh, pw·sw), read at
    the offset (a·sh, b·sw). One filter-gradient Conv over the ph·pw·F maps g_ab gives all the offsets, an
    (F', C, eh, ew) extent with eh = (ph − 1)·sh + kh, and a MatMul with a 0/1 matrix adds up the ph·pw
    shifted kh × kw windows. Against unpooling first: no up(g) and no mask at full size, and kernels
    ph·pw times smaller for the Conv to unroll (LeNet-5's first layer: bench/NOTES.md section 18)."""
    x, g, r, y = node.inputs
    out, dtype = node.output.name, np.dtype(g.dtype)
    (ph, pw), (sh, sw), (kh, kw) = node.attr("pool"), node.attr("strides"), node.attr("kernel")
    filters, channels, places = int(g.shape[1]), int(x.shape[1]), ph * pw
    _, best = _first_maxima(ctx, r, y, (ph, pw), out)
    keys = ctx.const(_window_keys(ph, pw).astype(dtype).reshape(1, places, 1, 1, 1), f"const.{out}.keys")
    unsqueeze = lambda value, hint: ctx.node("Unsqueeze", [value, ctx.axes([1], f"{out}.places")], f"{out}.{hint}")
    chosen = ctx.node("Cast", [ctx.node("Equal", [unsqueeze(best, "best5"), keys], f"{out}.is_place")],
                      f"{out}.place", to=ONNX_DTYPES[g.dtype])
    spread = ctx.node("Mul", [chosen, unsqueeze(g.name, "g5")], f"{out}.g_by_place")
    by_place = Value(ctx.node("Reshape", [spread, ctx.ints([0, places * filters, *g.shape[2:]], f"{out}.maps")], f"{out}.maps"),
                     g.dtype, (g.shape[0], places * filters, *g.shape[2:]))
    eh, ew = (ph - 1) * sh + kh, (pw - 1) * sw + kw
    shifted = Value(f"{out}.shifted", g.dtype, (places * filters, channels, eh, ew))
    _emit_filter_grad(ctx, node, by_place, (ph * sh, pw * sw), shifted)
    # (ph·pw·F, C, eh, ew) → (F·C, ph·pw·eh·ew), then · S with S[(a, b, a·sh + i, b·sw + j), (i, j)] = 1
    fold = np.zeros((ph, pw, eh, ew, kh, kw), dtype)
    for a, b, i, j in np.ndindex(ph, pw, kh, kw):
        fold[a, b, a * sh + i, b * sw + j, i, j] = 1
    by_offset = ctx.node("Reshape", [shifted.name, ctx.ints([places, filters * channels, eh * ew], f"{out}.by_offset")],
                         f"{out}.by_offset")
    per_filter = ctx.node("Transpose", [by_offset], f"{out}.per_filter", perm=[1, 0, 2])
    flat = ctx.node("Reshape", [per_filter, ctx.ints([filters * channels, places * eh * ew], f"{out}.flat")], f"{out}.flat")
    summed = ctx.node("MatMul", [flat, ctx.const(fold.reshape(places * eh * ew, kh * kw), f"const.{out}.fold")],
                      f"{out}.summed")
    ctx.node("Reshape", [summed, ctx.ints([filters, channels, kh, kw], f"{out}.shape")], out)


@emit("maxpool")
def emit_maxpool(ctx, node):
    ctx.node("MaxPool", _names(node), node.output.name, **_window_attrs(node))


@emit("maxpool_argmax")
def emit_maxpool_argmax(ctx, node):
    # MaxPool's second output: indices into x flattened whole ((n·C + c)·H + h)·W + w. At unit stride
    # onnx.reference computes those indices wrongly (onnx 1.23 _op_common_pool), so stride (1, 1)
    # takes the windows apart with Gather and ArgMax instead.
    out = node.output.name
    if tuple(node.attr("strides")) == (1, 1):
        _argmax_by_windows(ctx, node)
    else:
        ctx.nodes.append(helper.make_node("MaxPool", _names(node), [f"{out}.values", out], name=out,
                                          **_window_attrs(node)))


def _argmax_by_windows(ctx: EmitContext, node: Node) -> str:
    """argmax = (n·C + c)·H·W + base[p, q] + ⌊o / kw⌋·W + o mod kw, with o the first maximum's offset
    in the window at (p, q), found by ArgMax over the windows gathered as (N, C, Ho·Wo, kh·kw)."""
    (x,), out = node.inputs, node.output.name
    (kh, kw), (sh, sw) = node.attr("kernel"), node.attr("strides")
    _, channels, h, w = x.shape
    ho, wo = node.output.shape[2:]
    base = ((np.arange(ho) * sh * w)[:, None] + np.arange(wo) * sw).reshape(-1)          # (Ho·Wo,)
    offsets = ((np.arange(kh) * w)[:, None] + np.arange(kw)).reshape(-1)                 # (kh·kw,)
    table = (base[:, None] + offsets).astype(np.int64)
    pixels = ctx.node("Reshape", [x.name, ctx.ints([0, 0, -1], f"{out}.pixels_shape")], f"{out}.pixels")
    windows = ctx.node("Gather", [pixels, ctx.ints(table, f"{out}.windows")], f"{out}.windows", axis=2)
    o = ctx.node("ArgMax", [windows], f"{out}.offset", axis=3, keepdims=0, select_last_index=0)
    row = ctx.node("Mul", [ctx.node("Div", [o, ctx.ints(kw, f"{out}.kw")], f"{out}.i"), ctx.ints(w, f"{out}.width")], f"{out}.row")
    spatial = ctx.node("Add", [ctx.node("Add", [row, ctx.node("Mod", [o, ctx.ints(kw, f"{out}.kw")], f"{out}.j")],
                                        f"{out}.in_window"), ctx.ints(base, f"{out}.base")], f"{out}.spatial")
    # (n·C + c)·H·W for every image and channel: Range over N·C, with N read at run time
    batch = _batch_size(ctx, x, out)
    planes = ctx.node("Range", [ctx.ints(0, f"{out}.zero"), ctx.node("Mul", [batch, ctx.ints(channels, f"{out}.channels")],
                                                          f"{out}.planes_count"), ctx.ints(1, f"{out}.one")], f"{out}.planes")
    plane_start = ctx.node("Mul", [ctx.node("Reshape", [planes, ctx.ints([-1, channels, 1], f"{out}.planes_shape")],
                                            f"{out}.planes_nc"), ctx.ints(h * w, f"{out}.plane_size")], f"{out}.plane_start")
    flat = ctx.node("Add", [spatial, plane_start], f"{out}.flat")
    return ctx.node("Reshape", [flat, ctx.ints([-1, channels, ho, wo], f"{out}.shape")], out)


@emit("maxpool_grad")
def emit_maxpool_grad(ctx, node):
    """Windows that tile x, by whole-tensor ops only (MaxPool's Indices output and ScatterElements
    each run on one thread, and took a third of a LeNet-5 step):
        first = [keyed = up(best)]     the first maximum of each window (`_first_maxima`)
        dx    = first · up(g)"""
    g, x, y = node.inputs
    out, kernel = node.output.name, node.attr("kernel")
    keyed, best = _first_maxima(ctx, x, y, kernel, out)
    first = ctx.node("Cast", [ctx.node("Equal", [keyed, _upsample(ctx, best, x, kernel, f"{out}.best_up")], f"{out}.is_first")],
                     f"{out}.first", to=ONNX_DTYPES[x.dtype])
    ctx.node("Mul", [first, _upsample(ctx, g.name, x, kernel, f"{out}.g_up")], out)


def _window_keys(kh: int, kw: int) -> np.ndarray:
    """key[a, b] = kh·kw − a·kw − b: larger for earlier places (a, b) of a kh×kw window, row-major."""
    rows, cols = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    return kh * kw - rows * kw - cols


def _first_maxima(ctx: EmitContext, x: Value, y: Value, kernel, out: str) -> tuple[str, str]:
    """(keyed, best) for y = maxpool(x) over windows that tile x:
        hits  = [x = up(y)]           every maximum of its window (ties included)
        keyed = hits · key            key tiled over x (`_window_keys`)
        best  = MaxPool(keyed)        per window, the key of its first maximum in row-major order"""
    (kh, kw), (_, _, h, w) = kernel, x.shape
    key = ctx.const(np.tile(_window_keys(kh, kw), (h // kh, w // kw)).astype(np.dtype(x.dtype)).reshape(1, 1, h, w),
                    f"const.{out}.key")
    hits = ctx.node("Cast", [ctx.node("Equal", [x.name, _upsample(ctx, y.name, x, kernel, f"{out}.y_up")], f"{out}.is_max")],
                    f"{out}.hits", to=ONNX_DTYPES[x.dtype])
    keyed = ctx.node("Mul", [hits, key], f"{out}.keyed")
    return keyed, ctx.node("MaxPool", [keyed], f"{out}.best", kernel_shape=list(kernel), strides=list(kernel))


def _upsample(ctx: EmitContext, value: str, like: Value, kernel, out: str) -> str:
    """Nearest-neighbour upsampling by the window, to like's (N, C, H, W): Resize for float32, and for float64
    (which ONNX Runtime's Resize lacks) an Expand of the (N, C, Ho, 1, Wo, 1) view, 8× slower."""
    (kh, kw), (_, channels, h, w) = kernel, like.shape
    if np.dtype(like.dtype) == np.float32:
        return ctx.node("Resize", [value, "", ctx.const(np.array([1, 1, kh, kw], np.float32), f"const.{out}.scales")],
                        out, mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    view = ctx.node("Reshape", [value, ctx.ints([-1, channels, h // kh, 1, w // kw, 1], f"{out}.view")], f"{out}_view")
    spread = ctx.node("Expand", [view, ctx.ints([1, 1, 1, kh, 1, kw], f"{out}.spread")], f"{out}_spread")
    return ctx.node("Reshape", [spread, ctx.ints([-1, channels, h, w], f"{out}.shape")], out)


@emit("avgpool")
def emit_avgpool(ctx, node):
    ctx.node("AveragePool", _names(node), node.output.name, **_window_attrs(node))


@emit("avgpool_transpose")
def emit_avgpool_transpose(ctx, node):
    # a ConvTranspose per channel (group = C) with every filter weight 1/(kh·kw)
    (g,) = node.inputs
    out = node.output.name
    (kh, kw), (sh, sw), (h, w) = node.attr("kernel"), node.attr("strides"), node.attr("input_size")
    channels = int(g.shape[1])
    weights = ctx.const(np.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=np.dtype(g.dtype)),
                        f"const.{out}.weights")
    ctx.node("ConvTranspose", [g.name, weights], out, group=channels, **_window_attrs(node),
             output_padding=[(h - kh) % sh, (w - kw) % sw])


_FLAT = np.asarray([-1], dtype=np.int64)


@emit("take")
def emit_take(ctx, node):
    x, indices = node.inputs
    out = node.output.name
    flat = ctx.node("Reshape", [x.name, ctx.const(_FLAT, "const.flat")], f"{out}.flat")
    ctx.node("Gather", [flat, indices.name], out, axis=0)


@emit("scatter_add")
def emit_scatter_add(ctx, node):
    # zeros of like's size, flat; ScatterElements with reduction=add (opset ≥ 16); reshaped like `like`
    if ctx.opset < 16:
        argmax = ctx.producers.get(node.inputs[1].name)
        if argmax is not None and argmax.op == "maxpool_argmax":
            return _scatter_to_windows(ctx, node, argmax)
        raise DlnError(f"--opset {ctx.opset} cannot carry scatter_add, which needs ScatterElements with "
                       f"reduction=add (opset 16 or later); write --opset 16 or later")
    x, indices, like = node.inputs
    out = node.output.name
    flat_shape = ctx.const(_FLAT, "const.flat")
    shape = _shape_of(ctx, like, out)
    zero = helper.make_tensor("zero", ONNX_DTYPES[x.dtype], [1], [0.0])
    zeros = ctx.node("Reshape", [ctx.node("ConstantOfShape", [shape], f"{out}.zeros", value=zero), flat_shape],
                     f"{out}.zeros_flat")
    flat_indices = ctx.node("Reshape", [indices.name, flat_shape], f"{out}.indices_flat")
    flat_x = ctx.node("Reshape", [x.name, flat_shape], f"{out}.updates_flat")
    summed = ctx.node("ScatterElements", [zeros, flat_indices, flat_x], f"{out}.flat", axis=0, reduction="add")
    ctx.node("Reshape", [summed, shape], out)


def _scatter_to_windows(ctx: EmitContext, node: Node, argmax: Node) -> str:
    """scatter_add of max pooling's gradient before opset 16, by window offsets.

    The index i of each window's maximum is an offset k = (row − p·sh)·kw + (col − q·sw) inside
    its window (p, q); g is spread over kh·kw channels by one_hot(k), and a ConvTranspose whose
    kernel k is 1 at offset k alone puts each value back at its pixel, adding where windows
    overlap: dx = Σ_k ConvTranspose(g · [k == offset], e_k), with each (example, channel) pair as
    one image (no `group`, which onnx.reference gets wrong when a group has several inputs).
    """
    g, indices, like = node.inputs
    out, dtype = node.output.name, ONNX_DTYPES[g.dtype]
    (kh, kw), (sh, sw) = argmax.attr("kernel"), argmax.attr("strides")
    channels, height, width = (int(d) for d in like.shape[1:])
    rows_out, cols_out = (int(d) for d in g.shape[2:])
    windows = kh * kw
    flat = indices.name
    row = ctx.node("Mod", [ctx.node("Div", [flat, ctx.ints(width, f"{out}.width")], f"{out}.flat_row"), ctx.ints(height, f"{out}.height")],
                   f"{out}.row")
    col = ctx.node("Mod", [flat, ctx.ints(width, f"{out}.width")], f"{out}.col")
    top = ctx.ints((np.arange(rows_out) * sh).reshape(1, 1, rows_out, 1), f"{out}.window_top")
    left = ctx.ints((np.arange(cols_out) * sw).reshape(1, 1, 1, cols_out), f"{out}.window_left")
    offset = ctx.node("Add", [ctx.node("Mul", [ctx.node("Sub", [row, top], f"{out}.dy"), ctx.ints(kw, f"{out}.kw")],
                                       f"{out}.dy_kw"),
                              ctx.node("Sub", [col, left], f"{out}.dx")], f"{out}.offset")
    offsets = ctx.ints(np.arange(windows).reshape(1, 1, windows, 1, 1), f"{out}.offsets")
    hits = ctx.node("Equal", [ctx.node("Unsqueeze", [offset, ctx.axes([2], f"{out}.offset")], f"{out}.offset5"),
                              offsets], f"{out}.hits")
    mask = ctx.node("Cast", [hits], f"{out}.mask", to=dtype)
    spread = ctx.node("Mul", [mask, ctx.node("Unsqueeze", [g.name, ctx.axes([2], f"{out}.g")], f"{out}.g5")],
                      f"{out}.spread")
    stacked = ctx.node("Reshape", [spread, ctx.ints([-1, windows, rows_out, cols_out], f"{out}.stacked")], f"{out}.stacked")
    kernels = np.eye(windows).reshape(windows, 1, kh, kw).astype(np.dtype(g.dtype))
    placed = ctx.node("ConvTranspose", [stacked, ctx.const(kernels, f"const.{out}.kernels")], f"{out}.placed",
                      kernel_shape=[kh, kw], strides=[sh, sw],
                      output_padding=[(height - kh) % sh, (width - kw) % sw])
    return ctx.node("Reshape", [placed, ctx.ints([-1, channels, height, width], f"{out}.shape")], out)


# ---------------------------------------------------------------- sequences
@emit("embedding")
def emit_embedding(ctx, node):
    ctx.node("Gather", _names(node), node.output.name, axis=0)


@emit("embedding_grad")
def emit_embedding_grad(ctx, node):
    # dW = onehot(ids)ᵀ · g over every id: (K, V)ᵀ · (K, D), K the number of ids
    g, ids, like = node.inputs
    out = node.output.name
    vocab, dim = (int(d) for d in like.shape)
    flat_ids = ctx.node("Reshape", [ids.name, ctx.ints([-1, 1], "column")], f"{out}.ids")
    hits = ctx.node("Equal", [flat_ids, ctx.ints(np.arange(vocab), f"{out}.vocab")], f"{out}.hits")
    onehot = ctx.node("Cast", [hits], f"{out}.onehot", to=ONNX_DTYPES[g.dtype])
    rows = ctx.node("Reshape", [g.name, ctx.ints([-1, dim], f"{out}.rows")], f"{out}.g")
    ctx.node("Gemm", [onehot, rows], out, transA=1)


@emit("time_step")
def emit_time_step(ctx, node):
    ctx.node("Gather", [node.inputs[0].name, ctx.ints(node.attr("t"), f"step{node.attr('t')}")],
             node.output.name, axis=1)


@emit("stack_steps")
def emit_stack_steps(ctx, node):
    # y[:, t] = x_t: the T steps (m, d, …) joined on axis 1, (m, T·d, …), then that axis read as
    # (T, d), since in row-major order (i, t·d + j) is (i, t, j). One Concat and one Reshape, not
    # SequenceConstruct + ConcatFromSequence: ONNX Runtime's CUDA provider took 4 ms a step for
    # that pair in the GRU benchmark on an H100 (bench/NOTES.md section 23).
    out, step = node.output.name, node.inputs[0]
    joined = ctx.node("Concat", _names(node), f"{out}.joined", axis=1)
    shape = [0, len(node.inputs), *(int(d) for d in step.shape[1:])]      # 0: m, as it is
    ctx.node("Reshape", [joined, ctx.ints(shape, f"{out}.shape")], out)


@emit("slice_axis")
def emit_slice_axis(ctx, node):
    (x,), out = node.inputs, node.output.name
    ctx.node("Slice", [x.name, ctx.ints([node.attr("start")], f"{out}.start"),
                       ctx.ints([node.attr("end")], f"{out}.end"),
                       ctx.ints([node.attr("axis") % x.rank], f"{out}.axis")], out)


@emit("pad_axis")
def emit_pad_axis(ctx, node):
    (x,), out = node.inputs, node.output.name
    pads = np.zeros(2 * x.rank, dtype=np.int64)
    axis = node.attr("axis") % x.rank
    pads[axis], pads[x.rank + axis] = node.attr("before"), node.attr("after")
    ctx.node("Pad", [x.name, ctx.ints(pads, f"{out}.pads")], out)


@emit("concat")
def emit_concat(ctx, node):
    ctx.node("Concat", _names(node), node.output.name, axis=node.attr("axis") % node.output.rank)


@emit("fold_time")
def emit_fold_time(ctx, node):
    (x,), out = node.inputs, node.output.name
    ctx.node("Reshape", [x.name, ctx.ints([-1, *(int(d) for d in x.shape[2:])], f"{out}.shape")], out)


@emit("unfold_time")
def emit_unfold_time(ctx, node):
    # (m·T, ...) → (m, T, ...): T from the shape rule where it is a number, else from `like` at run time
    (y, like), out = node.inputs, node.output.name
    rest = [int(d) for d in y.shape[1:]]
    if isinstance(like.shape[1], int):
        ctx.node("Reshape", [y.name, ctx.ints([-1, like.shape[1], *rest], f"{out}.shape")], out)
        return
    batch_time = ctx.node("Slice", [ctx.node("Shape", [like.name], f"{out}.like_shape"), ctx.ints([0], "zero1"),
                                    ctx.ints([2], "two1"), ctx.ints([0], "zero1")], f"{out}.batch_time")
    shape = ctx.node("Concat", [batch_time, ctx.ints(rest, f"{out}.rest")], f"{out}.shape", axis=0)
    ctx.node("Reshape", [y.name, shape], out)


@emit("stop_gradient")
def emit_stop_gradient(ctx, node):
    ctx.node("Identity", _names(node), node.output.name)


@emit("onnx_graph")
def emit_onnx_graph(ctx, node):
    # a frozen pretrained trunk: its own nodes and initializers, renamed under `<layer>/`
    nodes, initializers = node.attr("graph").inlined(node.inputs[0].name, node.output.name, ctx.opset)
    ctx.nodes.extend(nodes)
    ctx.initializers.update(initializers)


_RECURRENT_OPS = {"rnn_seq": "RNN", "gru_seq": "GRU", "lstm_seq": "LSTM"}


@emit("rnn_seq", "gru_seq", "lstm_seq")
def emit_recurrent(ctx, node):
    # ONNX's recurrent ops are time-first: (T, m, F) in, Y (T, 1, m, H) and Y_h (1, m, H) out
    x, w, r, bias = node.inputs
    out = node.output.name
    attrs = {"hidden_size": int(node.attr("hidden"))}
    if node.op == "gru_seq":
        attrs["linear_before_reset"] = 1                  # r ⊙ (h·R_hᵀ + Rb_h), as PyTorch
    if node.op == "rnn_seq":
        attrs["activations"] = [{"tanh": "Tanh", "relu": "Relu"}[node.attr("activation", "tanh")]]
    time_first = ctx.node("Transpose", [x.name], f"{out}.time_first", perm=[1, 0, 2])
    # the zero initial state (1, m, H), spelled out: some runtimes (tract) cannot size it for a symbolic m
    batch = ctx.node("Gather", [ctx.node("Shape", [x.name], f"{out}.x_shape"), ctx.ints([0], "zero1")],
                     f"{out}.batch", axis=0)
    state_shape = ctx.node("Concat", [ctx.ints([1], "one1"), batch, ctx.ints([attrs["hidden_size"]], f"{out}.units")],
                           f"{out}.state_shape", axis=0)
    zero = helper.make_tensor("zero", ONNX_DTYPES[x.dtype], [1], [0.0])
    initial = ctx.node("ConstantOfShape", [state_shape], f"{out}.initial_state", value=zero)
    inputs = [time_first, w.name, r.name, bias.name, "", initial] + ([initial] if node.op == "lstm_seq" else [])
    if node.attr("last"):
        ctx.nodes.append(helper.make_node(_RECURRENT_OPS[node.op], inputs, [f"{out}.y", f"{out}.h"], name=f"{out}.y",
                                          **attrs))
        ctx.node("Squeeze", [f"{out}.h", ctx.ints([0], "zero1")], out)
        return
    ctx.nodes.append(helper.make_node(_RECURRENT_OPS[node.op], inputs, [f"{out}.y"], name=f"{out}.y", **attrs))
    steps = ctx.node("Squeeze", [f"{out}.y", ctx.ints([1], "one1")], f"{out}.steps")
    ctx.node("Transpose", [steps], out, perm=[1, 0, 2])


def value_info(value: Value) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, str) else int(d) for d in value.shape]
    return helper.make_tensor_value_info(value.name, ONNX_DTYPES[value.dtype], dims)


def to_onnx(graph: Graph, *, initializers: Mapping[str, np.ndarray] | None = None,
            opset: int = DEFAULT_OPSET, ir_version: int | None = None,
            metadata: Mapping[str, str] | None = None, doc: str = "") -> onnx.ModelProto:
    """The ModelProto of `graph`; inputs named in `initializers` become initializers instead.

    `ir_version` None is the default for `opset` (`resolve_target`)."""
    opset, ir_version = resolve_target(opset, ir_version)
    initializers = dict(initializers or {})
    ctx = EmitContext(opset, producers=graph.producers())
    for node in graph.nodes:
        EMIT_RULES[node.op](ctx, node)
    tensors = {**initializers, **ctx.initializers}
    onnx_graph = helper.make_graph(
        ctx.nodes, graph.name,
        inputs=[value_info(v) for v in graph.inputs if v.name not in initializers],
        outputs=[value_info(v) for v in graph.outputs],
        initializer=[numpy_helper.from_array(np.asarray(a), name) for name, a in tensors.items()],
        doc_string=doc)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="dlnc", producer_version=__version__, ir_version=ir_version)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=str(value))
    return model
