"""ONNX emission: one rule per IR op, and the graph-to-ModelProto conversion.

Only standard `ai.onnx` ops are emitted. Rules that depend on the opset (ReduceMean's axes
became an input in opset 18) ask `ctx.opset`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ir import Graph, Node, Value

ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
               "int64": TensorProto.INT64, "bool": TensorProto.BOOL}
DEFAULT_OPSET = 17
DEFAULT_IR_VERSION = 8


@dataclass
class EmitContext:
    """Collects the ONNX nodes and constant initializers of one graph as rules emit them."""

    opset: int
    nodes: list = field(default_factory=list)
    initializers: dict = field(default_factory=dict)

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

    def axes(self, axes, hint: str) -> str:
        return self.const(np.asarray(axes, dtype=np.int64), f"const.{hint}.axes")


EMIT_RULES: dict[str, Callable[[EmitContext, Node], None]] = {}


def emit(*ops: str):
    def register(fn):
        for op in ops:
            EMIT_RULES[op] = fn
        return fn
    return register


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
    # Gemm: Y = X·Wᵀ + b
    ctx.node("Gemm", _names(node), node.output.name, transB=1)


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
    op_type = "ReduceSum" if node.op == "reduce_sum" else "ReduceMean"
    _reduce(ctx, op_type, node.inputs[0].name, node.attr("axes"), node.attr("keepdims", False), node.output.name)


@emit("unsqueeze")
def emit_unsqueeze(ctx, node):
    ctx.node("Unsqueeze", [node.inputs[0].name, ctx.axes(node.attr("axes"), node.output.name)], node.output.name)


@emit("squeeze")
def emit_squeeze(ctx, node):
    ctx.node("Squeeze", [node.inputs[0].name, ctx.axes(node.attr("axes"), node.output.name)], node.output.name)


def _shape_of(ctx: EmitContext, value: Value, out: str) -> str:
    """A static shape as a constant; a shape with the batch symbol read at run time."""
    if all(isinstance(d, int) for d in value.shape):
        return ctx.const(np.asarray(value.shape, dtype=np.int64), f"const.{out}.shape")
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
    shape = ctx.node("Shape", [node.inputs[0].name], f"{out}.shape")
    first = ctx.node("Gather", [shape, ctx.const(np.asarray(0, dtype=np.int64), "const.zero_index")], f"{out}.m")
    ctx.node("Cast", [first], out, to=ONNX_DTYPES[node.attr("dtype")])


@emit("softmax_cross_entropy")
def emit_softmax_cross_entropy(ctx, node):
    ctx.node("SoftmaxCrossEntropyLoss", _names(node), node.output.name, reduction="mean")


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


def value_info(value: Value) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, str) else int(d) for d in value.shape]
    return helper.make_tensor_value_info(value.name, ONNX_DTYPES[value.dtype], dims)


def to_onnx(graph: Graph, *, initializers: Mapping[str, np.ndarray] | None = None,
            opset: int = DEFAULT_OPSET, ir_version: int = DEFAULT_IR_VERSION,
            metadata: Mapping[str, str] | None = None, doc: str = "") -> onnx.ModelProto:
    """The ModelProto of `graph`; inputs named in `initializers` become initializers instead."""
    initializers = dict(initializers or {})
    ctx = EmitContext(opset)
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
                              producer_name="dlnc", ir_version=ir_version)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=str(value))
    return model
