"""Transfer learning: `pretrained "FILE.onnx" [until="TENSOR"] [trainable]` as the first layers.

The file is any ONNX model (one exported by `dlnc run`, by torch.onnx.export, ...). It is read
safely (`load_pretrained`): a file that is not ONNX is a clear error, external data must sit in
the model's folder (no absolute location, no `..`, no symbolic link on the way), and the model
must pass `onnx.checker`. `until` cuts it at a tensor (a dlnc model names each layer's output
after the layer, so `until="flatten_5"` keeps the layers up to flatten_5); without `until` the
whole graph up to its first output is used. The cut must depend on exactly one graph input,
which takes this layer's input.

Two ways in:
- frozen (the default): the cut is one IR node, `onnx_graph`, that carries it as it is. At
  emission its nodes and initializers are copied into the emitted graphs under the prefix
  `<layer>/`, converted to the target opset where the file's differs. Any ONNX op is allowed
  (it needs no gradient), and the weights are copied bit for bit: the exported model holds the
  very bytes of the file's tensors.
- `trainable`: the cut is imported into the IR, op by op (`IMPORT_RULES`), its float
  initializers in weight positions (Conv and Gemm weights and biases, MatMul operands, the
  bias of an Add, BatchNormalization's scale and bias; for dlnc's own files every `.W`, `.b`,
  `.gamma`, `.beta`) becoming parameters `<layer>.<name>` that the optimiser updates (unless
  `freeze <layer>`). Weights (rank ≥ 2) are regularised, biases are not. An op without an
  import rule is an error naming the op and the node.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dsl import ast
from dsl.errors import DlnError

from .ir import Value, registrar
from .lower import LOWER_RULES, LayerInfo, LowerContext, describe, error
from .onnx_graph import producers, reads
from .shapes import ShapeError, same_padding

FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}
IR_DTYPES = {np.dtype("float32"): "float32", np.dtype("float64"): "float64", np.dtype("int64"): "int64",
             np.dtype("bool"): "bool"}
DLNC_PARAM_ROLES = ("W", "b", "gamma", "beta", "E", "R", "B")


# ---------------------------------------------------------------- reading a file safely
def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors
    return [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def check_external_location(folder: Path, location: str, tensor: str) -> Path:
    """The file an external-data `location` names, inside `folder`; DlnError otherwise.

    Refused: an empty or absolute location, any `..` part, a symbolic link anywhere on the way
    (the file itself or a folder), a path that resolves outside the folder, a missing file."""
    def refuse(why: str) -> DlnError:
        return DlnError(f"tensor '{tensor}' keeps its data in '{location}', {why}; dlnc only reads external "
                        f"data stored in the model's own folder")
    if not location or "\x00" in location:
        raise refuse("which is not a file name")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise refuse("an absolute path")
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        raise refuse("which climbs out of the model's folder with '..'")
    current = folder
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise refuse(f"which goes through the symbolic link {current}")
    resolved = current.resolve()
    if folder.resolve() not in resolved.parents:
        raise refuse("which resolves outside the model's folder")
    if not resolved.is_file():
        raise refuse("a file that does not exist")
    return resolved


def load_pretrained(path: Path) -> onnx.ModelProto:
    """The ONNX model in `path`, checked; DlnError (without a span) for anything wrong with it."""
    if not path.exists():
        raise DlnError(f"no such ONNX file: {path}")
    if not path.is_file():
        raise DlnError(f"{path} is a folder, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:                    # protobuf's DecodeError and friends
        raise DlnError(f"{path} is not an ONNX model (it does not parse as one: {type(exc).__name__})") from None
    if not model.graph.node or not model.graph.output:
        raise DlnError(f"{path} is not an ONNX model: it holds no graph (another kind of file, or truncated)")
    folder = path.resolve().parent
    external = _external_tensors(model)
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        try:
            check_external_location(folder, location, tensor.name)
        except DlnError as exc:
            raise DlnError(f"{path}: {exc.message}") from None
    if external:
        from onnx.external_data_helper import load_external_data_for_model
        try:
            load_external_data_for_model(model, str(folder))
        except Exception as exc:
            raise DlnError(f"{path}: cannot read its external data: {exc}") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DlnError(f"{path} fails the ONNX checker: {first}") from None
    return model


_LOADED: dict[tuple, tuple[onnx.ModelProto, str]] = {}


def _load_cached(path: Path) -> tuple[onnx.ModelProto, str]:
    """(model, sha256 of the file), read once per file version (a search compiles many times)."""
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None
    if key is not None and key in _LOADED:
        return _LOADED[key]
    model = load_pretrained(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if key is not None:
        if len(_LOADED) >= 8:
            _LOADED.clear()
        _LOADED[key] = (model, digest)
    return model, digest


def resolve_path(program: ast.Program, layer: ast.Pretrained) -> Path:
    """Relative paths are read from the folder of the .dln file (the working folder without one)."""
    path = Path(layer.path)
    if not path.is_absolute() and program.path:
        path = Path(program.path).parent / path
    return path


# ---------------------------------------------------------------- the cut
@dataclass(frozen=True)
class Cut:
    """The part of a model that computes one tensor from one graph input."""

    nodes: tuple[onnx.NodeProto, ...]
    initializers: tuple[onnx.TensorProto, ...]
    input: onnx.ValueInfoProto
    output: str
    opset: int


def cut(model: onnx.ModelProto, until: str | None, path: Path) -> Cut:
    graph = model.graph
    target = until if until is not None else graph.output[0].name
    producer = producers(graph)
    initializers = {t.name: t for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    if target in inputs:
        raise DlnError(f"until=\"{target}\" names the input of {path.name}; cut at a tensor that a node computes")
    if target not in producer:
        names = [o for n in graph.node for o in n.output if o]
        from dsl.errors import did_you_mean
        hint = did_you_mean(target, names) or f" — its tensors include {', '.join(names[:8])}" + \
            (", ..." if len(names) > 8 else "")
        raise DlnError(f"until=\"{target}\": {path.name} has no tensor of that name{hint}")
    needed, order, used_inputs, used_inits = [target], [], [], set()
    seen: set[str] = set()
    while needed:
        name = needed.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in inputs:
            used_inputs.append(name)
        elif name in initializers:
            used_inits.add(name)
        elif name in producer:
            node = producer[name]
            if id(node) not in {id(n) for n in order}:
                order.append(node)
            needed.extend(reads(node))
    if len(used_inputs) != 1:
        what = "no graph input" if not used_inputs else f"several graph inputs ({', '.join(used_inputs)})"
        raise DlnError(f"the cut of {path.name} at '{target}' depends on {what}; a pretrained trunk takes exactly "
                       f"one input, this layer's input")
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            used = any(n.domain == o.domain for n in order)
            if used:
                raise DlnError(f"{path.name} uses ops of the '{o.domain}' domain; dlnc emits standard ai.onnx "
                               f"ops only (the training graph must run on plain onnxruntime)")
    position = {id(n): i for i, n in enumerate(graph.node)}
    nodes = tuple(sorted(order, key=lambda n: position[id(n)]))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return Cut(nodes, tuple(initializers[n] for n in sorted(used_inits)), inputs[used_inputs[0]], target, opset)


def _dims(value: onnx.ValueInfoProto) -> tuple:
    shape = value.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim)


def check_input(cut_: Cut, a: Value, path: Path) -> None:
    """The file's input must take this layer's input: same rank, same fixed sizes past the batch."""
    elem = cut_.input.type.tensor_type.elem_type
    if elem not in FLOAT_TYPES:
        raise DlnError(f"{path.name} takes '{cut_.input.name}' of type "
                       f"{helper.tensor_dtype_to_np_dtype(elem)}, but this layer's input is float")
    dims = _dims(cut_.input)
    ours = tuple(a.shape)
    if len(dims) != len(ours) or any(isinstance(d, int) and d > 0 and d != o for d, o in zip(dims[1:], ours[1:])):
        shown = "(" + ", ".join(str(d) if d else "?" for d in dims) + ")"
        raise DlnError(f"{path.name} takes '{cut_.input.name}' {shown} but this layer's input is {describe(ours)}")


def cut_shape(model: onnx.ModelProto, cut_: Cut, path: Path) -> tuple[str, tuple]:
    """(dtype, shape) of the cut's output with a symbolic batch, from ONNX shape inference."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for value in probe.graph.input:
        if value.name == cut_.input.name and value.type.tensor_type.shape.dim:
            first = value.type.tensor_type.shape.dim[0]
            first.Clear()
            first.dim_param = "N"
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as exc:
        raise DlnError(f"ONNX shape inference fails on {path.name}: {str(exc).splitlines()[0]}") from None
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    info = infos.get(cut_.output)
    dims = _dims(info) if info is not None else ()
    elem = info.type.tensor_type.elem_type if info is not None else 0
    if info is None or not dims or any(d is None for d in dims) or any(isinstance(d, str) for d in dims[1:]):
        raise DlnError(f"the shape of '{cut_.output}' in {path.name} cannot be inferred "
                       f"({'unknown' if info is None else dims}); cut at another tensor with until=")
    if isinstance(dims[0], int):
        raise DlnError(f"'{cut_.output}' in {path.name} has a fixed batch size of {dims[0]}; export the model with "
                       f"a dynamic batch axis (torch.onnx.export(..., dynamic_axes={{'x': {{0: 'N'}}}}))")
    if elem not in FLOAT_TYPES:
        raise DlnError(f"'{cut_.output}' in {path.name} is not a float tensor; cut at a float tensor with until=")
    return FLOAT_TYPES[elem], ("N", *(int(d) for d in dims[1:]))


# ---------------------------------------------------------------- frozen: one IR node, inlined at emission
@dataclass(frozen=True, eq=False)
class Trunk:
    """A frozen cut, carried by the `onnx_graph` IR node (attr `graph`) as it is."""

    layer: str
    sha256: str
    cut: Cut
    dtype: str
    shape: tuple
    _converted: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:                  # the simplifier's common-subexpression key
        return f"Trunk({self.layer}, {self.sha256[:16]}, {self.cut.output})"

    def inlined(self, x: str, out: str, opset: int) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
        """The cut's nodes and initializers, renamed: its input reads `x`, its output is `out`,
        everything else is prefixed `<layer>/`; converted to `opset` where the file's differs."""
        nodes, initializers = self._at_opset(opset)
        prefix = f"{self.layer}/"
        names = {self.cut.input.name: x, self.cut.output: out}

        def rename(name: str) -> str:
            return names.get(name, prefix + name) if name else name
        result = []
        for node in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + (node.name or (node.output[0] if node.output else node.op_type))
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [rename(n) for n in node.output]
            _rename_outer(copy, rename)
            result.append(copy)
        return result, {rename(t.name): numpy_helper.to_array(t) for t in initializers}

    def _at_opset(self, opset: int) -> tuple[tuple[onnx.NodeProto, ...], tuple[onnx.TensorProto, ...]]:
        if self.cut.opset == opset:
            return self.cut.nodes, self.cut.initializers
        if opset not in self._converted:
            graph = helper.make_graph(list(self.cut.nodes), "trunk", [self.cut.input],
                                      [helper.make_tensor_value_info(self.cut.output, 0, None)],
                                      initializer=list(self.cut.initializers))
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.cut.opset)])
            try:
                from onnx import version_converter
                converted = version_converter.convert_version(model, opset)
            except Exception as exc:
                raise DlnError(f"pretrained layer {self.layer}: its model uses ONNX opset {self.cut.opset} and "
                               f"onnx cannot convert it to opset {opset} ({str(exc).splitlines()[0]}); compile with "
                               f"--opset {self.cut.opset}", path="dlnc") from None
            self._converted[opset] = (tuple(converted.graph.node), tuple(converted.graph.initializer))
        return self._converted[opset]


def _rename_outer(node: onnx.NodeProto, rename: Callable[[str], str]) -> None:
    """Inside subgraph attributes, rename the names that come from the enclosing graph."""
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else \
            list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
        for graph in graphs:
            local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            local.update(o for n in graph.node for o in n.output)
            for sub in graph.node:
                sub.input[:] = [n if (not n or n in local) else rename(n) for n in sub.input]
                _rename_outer(sub, lambda n, local=local: n if n in local else rename(n))
            for output in graph.output:
                if output.name not in local:
                    output.name = rename(output.name)


def lower_frozen(ctx: LowerContext, layer: ast.Pretrained, a: Value, model: onnx.ModelProto, digest: str,
                 cut_: Cut, path: Path) -> Value:
    dtype, shape = cut_shape(model, cut_, path)
    trunk = Trunk(layer.name, digest, cut_, dtype, shape)
    out = ctx.b.op("onnx_graph", a, graph=trunk, name=layer.name)
    weights = sum(int(np.prod(t.dims)) for t in cut_.initializers)
    ctx.infos.append(LayerInfo(layer.name, f"pretrained, frozen: {weights:,} weights", (), out.shape, 0))
    return out


# ---------------------------------------------------------------- trainable: imported into the IR
class NotImportable(DlnError):
    """An ONNX node that cannot be imported into the IR; the caller adds the layer's span."""


@dataclass
class Importer:
    """Walks a cut in order, mapping each ONNX tensor name to an IR value (or a constant array)."""

    ctx: LowerContext
    layer: ast.Pretrained
    path: Path
    dlnc_file: bool
    values: dict[str, Value] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)      # initializers and Constant outputs
    params: dict[str, Value] = field(default_factory=dict)
    flops: int = 0

    def fail(self, node: onnx.NodeProto, why: str) -> NotImportable:
        return NotImportable(f"pretrained layer {self.layer.name} ({self.path.name}): ONNX op {node.op_type} "
                            f"(node '{node.name or node.output[0]}') {why}")

    def array(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)

    def value(self, name: str, weight: bool = False, node: onnx.NodeProto | None = None) -> Value:
        """The IR value of a tensor; an initializer becomes a parameter where `weight`, else a constant."""
        if name in self.values:
            return self.values[name]
        if name in self.params:
            return self.params[name]
        array = self.arrays.get(name)
        if array is None:
            raise self.fail(node, f"reads '{name}', which nothing computes")
        if array.dtype.kind == "f" and (weight or self._dlnc_param(name)):
            role = re.sub(r"[^A-Za-z0-9_.]", "_", name)      # a safe key in checkpoints and file names
            while f"{self.layer.name}.{role}" in self.ctx.param_values:
                role += "_"
            param = self.ctx.param(self.layer, role, array, regularized=array.ndim >= 2)
            self.params[name] = param
            return param
        dtype = IR_DTYPES.get(array.dtype)
        if dtype is None:
            raise self.fail(node, f"reads '{name}' of type {array.dtype}, which dlnc does not handle")
        if array.dtype.kind == "f":
            dtype = self.ctx.b.dtype
        return self.ctx.b.const(array, dtype=dtype, name=f"{self.layer.name}.{name}")

    def _dlnc_param(self, name: str) -> bool:
        return self.dlnc_file and name.rsplit(".", 1)[-1] in DLNC_PARAM_ROLES and "." in name


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


ImportRule = Callable[[Importer, onnx.NodeProto, dict], Value]
IMPORT_RULES: dict[str, ImportRule] = {}


imports = registrar(IMPORT_RULES)


_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
          "Neg": "neg", "Abs": "abs", "Identity": "identity", "Dropout": "identity"}
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


@imports(*_UNARY)
def import_unary(im, node, attrs):
    return im.ctx.b.op(_UNARY[node.op_type], im.value(node.input[0], node=node))


@imports("LeakyRelu")
def import_leaky_relu(im, node, attrs):
    return im.ctx.b.op("leaky_relu", im.value(node.input[0], node=node), alpha=float(attrs.get("alpha", 0.01)))


@imports("Softmax", "LogSoftmax")
def import_softmax(im, node, attrs):
    x = im.value(node.input[0], node=node)
    axis = int(attrs.get("axis", -1))
    if axis % x.rank != x.rank - 1:
        raise im.fail(node, f"works along axis {axis}; dlnc imports softmax along the last axis only")
    return im.ctx.b.op("softmax" if node.op_type == "Softmax" else "log_softmax", x, axis=-1)


@imports(*_BINARY)
def import_binary(im, node, attrs):
    # an initializer added to a computed tensor is a bias: a parameter
    a_name, b_name = node.input[:2]
    bias = node.op_type == "Add"
    a = im.value(a_name, weight=bias and b_name not in im.arrays, node=node)
    b = im.value(b_name, weight=bias and a_name not in im.arrays, node=node)
    return im.ctx.b.op(_BINARY[node.op_type], a, b)


@imports("Gemm")
def import_gemm(im, node, attrs):
    # Y = α·op(A)·op(B) + β·C
    b = im.ctx.b
    if attrs.get("transA", 0):
        raise im.fail(node, "has transA=1, which dlnc does not import")
    x = im.value(node.input[0], node=node)
    w = im.value(node.input[1], weight=True, node=node)
    trans_b = int(attrs.get("transB", 0))
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    bias = im.value(node.input[2], weight=True, node=node) if len(node.input) > 2 and node.input[2] else None
    n_out = int(w.shape[0] if trans_b else w.shape[1])
    im.flops += 2 * int(w.shape[0]) * int(w.shape[1])
    if trans_b and alpha == 1.0 and beta == 1.0 and bias is not None and tuple(bias.shape) == (n_out,):
        return b.op("dense", x, w, bias)
    y = b.op("matmul", x, w, trans_b=trans_b)
    if alpha != 1.0:
        y = b.mul(y, b.scalar(alpha))
    if bias is not None:
        y = b.add(y, bias if beta == 1.0 else b.mul(bias, b.scalar(beta)))
    return y


@imports("MatMul")
def import_matmul(im, node, attrs):
    a = im.value(node.input[0], weight=node.input[0] in im.arrays, node=node)
    w = im.value(node.input[1], weight=node.input[1] in im.arrays, node=node)
    if a.rank != 2 or w.rank != 2:
        raise im.fail(node, f"multiplies {describe(a.shape)} by {describe(w.shape)}; dlnc imports 2-D MatMul only")
    im.flops += 2 * int(w.shape[0]) * int(w.shape[1])
    return im.ctx.b.op("matmul", a, w)


def _pads(im, node, attrs, x: Value, kernel: tuple[int, int], strides: tuple[int, int]) -> tuple[int, int, int, int]:
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        (top, bottom), (left, right) = (same_padding(int(x.shape[2]), kernel[0], strides[0]),
                                        same_padding(int(x.shape[3]), kernel[1], strides[1]))
        if auto == "SAME_LOWER":
            top, bottom, left, right = bottom, top, right, left
        return top, left, bottom, right
    if auto == "VALID":
        return 0, 0, 0, 0
    pads = tuple(int(p) for p in attrs.get("pads", (0, 0, 0, 0)))
    if len(pads) != 4:
        raise im.fail(node, f"has pads {list(pads)}; dlnc imports 2-D windows only")
    return pads[0], pads[1], pads[2], pads[3]


@imports("Conv")
def import_conv(im, node, attrs):
    x = im.value(node.input[0], node=node)
    w = im.value(node.input[1], weight=True, node=node)
    if x.rank != 4 or w.rank != 4:
        raise im.fail(node, f"is a {x.rank - 2}-D convolution; dlnc imports 2-D convolutions only")
    if int(attrs.get("group", 1)) != 1:
        raise im.fail(node, f"is a grouped convolution (group={attrs['group']}), which dlnc cannot differentiate")
    if any(int(d) != 1 for d in attrs.get("dilations", (1, 1))):
        raise im.fail(node, f"is dilated (dilations={list(attrs['dilations'])}), which dlnc cannot differentiate")
    strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    kernel = (int(w.shape[2]), int(w.shape[3]))
    pads = _pads(im, node, attrs, x, kernel, strides)
    inputs = [x, w]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(im.value(node.input[2], weight=True, node=node))
    out = im.ctx.b.op("conv", *inputs, strides=strides, pads=pads)
    im.flops += 2 * kernel[0] * kernel[1] * int(w.shape[1]) * int(np.prod(out.shape[1:]))
    return out


@imports("MaxPool", "AveragePool")
def import_pool(im, node, attrs):
    x = im.value(node.input[0], node=node)
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", ()))
    strides = tuple(int(s) for s in attrs.get("strides", (1,) * len(kernel)))
    if x.rank != 4 or len(kernel) != 2:
        raise im.fail(node, "pools other than 2-D windows are not imported")
    if any(_pads(im, node, attrs, x, kernel, strides)) or int(attrs.get("ceil_mode", 0)) \
            or any(int(d) != 1 for d in attrs.get("dilations", (1, 1))):
        raise im.fail(node, "pads, dilates or rounds up its windows; dlnc differentiates unpadded pooling only")
    if len(node.output) > 1 and node.output[1]:
        raise im.fail(node, "returns its indices, which dlnc does not import")
    return im.ctx.b.op("maxpool" if node.op_type == "MaxPool" else "avgpool", x, kernel=kernel, strides=strides)


@imports("GlobalAveragePool")
def import_global_average_pool(im, node, attrs):
    x = im.value(node.input[0], node=node)
    return im.ctx.b.op("reduce_mean", x, axes=tuple(range(2, x.rank)), keepdims=True)


@imports("Flatten")
def import_flatten(im, node, attrs):
    x = im.value(node.input[0], node=node)
    if int(attrs.get("axis", 1)) % max(x.rank, 1) != 1 and x.rank > 1:
        raise im.fail(node, f"flattens from axis {attrs.get('axis')}; dlnc imports Flatten(axis=1) only")
    return x if x.rank == 2 else im.ctx.b.op("flatten", x)


@imports("Reshape")
def import_reshape(im, node, attrs):
    # only the reshape that keeps the batch and flattens the rest: (N, ...) → (N, prod)
    x = im.value(node.input[0], node=node)
    shape = im.array(node.input[1])
    if shape is None:
        raise im.fail(node, "computes its target shape at run time; dlnc imports a Reshape to a constant shape "
                            "(N, features) only (export with x.flatten(1))")
    rest = int(np.prod([int(d) for d in x.shape[1:]]))
    target = [int(d) for d in shape]
    flattening = len(target) == 2 and (target[1] in (-1, rest)) and (target[0] in (0, -1) or target[1] == rest)
    if not flattening:
        raise im.fail(node, f"reshapes {describe(x.shape)} to {target}; dlnc imports the reshape to "
                            f"(N, features) only")
    return x if x.rank == 2 else im.ctx.b.op("flatten", x)


@imports("BatchNormalization")
def import_batchnorm(im, node, attrs):
    # inference form: y = γ·(x − μ)/√(σ² + ε) + β with the stored μ, σ² (constants); γ, β learn
    b = im.ctx.b
    if len([o for o in node.output if o]) > 1:
        raise im.fail(node, "is in training mode; dlnc imports inference-mode batch normalisation only")
    x = im.value(node.input[0], node=node)
    scale = im.value(node.input[1], weight=True, node=node)
    bias = im.value(node.input[2], weight=True, node=node)
    mean, var = im.array(node.input[3]), im.array(node.input[4])
    if mean is None or var is None:
        raise im.fail(node, "has computed running statistics; dlnc imports stored ones only")

    def per_channel(v: Value) -> Value:
        return v if x.rank == 2 else b.op("unsqueeze", v, axes=tuple(range(1, x.rank - 1)))
    mu = b.const(mean, name=f"{im.layer.name}.{node.input[3]}")
    std = b.const(np.sqrt(var.astype(np.float64) + float(attrs.get("epsilon", 1e-5))),
                  name=f"{im.layer.name}.{node.input[4]}.std")
    normalized = b.div(b.sub(x, per_channel(mu)), per_channel(std))
    return b.add(b.mul(per_channel(scale), normalized), per_channel(bias))


def lower_trainable(ctx: LowerContext, layer: ast.Pretrained, a: Value, model: onnx.ModelProto,
                    cut_: Cut, path: Path) -> Value:
    im = Importer(ctx, layer, path, dlnc_file=model.producer_name == "dlnc")
    im.values[cut_.input.name] = a
    im.arrays.update({t.name: numpy_helper.to_array(t) for t in cut_.initializers})
    first_param = len(ctx.params)
    for node in cut_.nodes:
        if node.op_type == "Constant":
            attrs = _attrs(node)
            if "value" not in attrs:
                raise im.fail(node, "is a Constant without a tensor value, which dlnc does not import")
            im.arrays[node.output[0]] = numpy_helper.to_array(attrs["value"])
            continue
        rule = IMPORT_RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            known = ", ".join(sorted(IMPORT_RULES))
            raise im.fail(node, f"cannot be differentiated by dlnc, so the trunk cannot be trainable; drop "
                                f"`trainable` (a frozen trunk takes any op), or cut before it with until= "
                                f"(trainable trunks may use {known})")
        try:
            out = rule(im, node, _attrs(node))
        except ShapeError as exc:
            raise im.fail(node, f"does not fit its inputs: {exc}") from None
        im.values[node.output[0]] = out
    out = im.values.get(cut_.output) or im.value(cut_.output)
    result = ctx.b.op("identity", out, name=layer.name)
    params = tuple((p.name, tuple(p.init.shape)) for p in ctx.params[first_param:])
    ctx.infos.append(LayerInfo(layer.name, "pretrained, trainable", params, result.shape, im.flops))
    return result


def lower_pretrained(ctx: LowerContext, layer: ast.Pretrained, a: Value) -> Value:
    """The file's errors point at its path, the cut's at `until`, the rest at the layer."""
    program = ctx.program
    path = resolve_path(program, layer)
    at = layer.spans.get("path", layer.span)
    try:
        model, digest = _load_cached(path)
        if layer.until is not None:
            at = layer.spans.get("until", layer.span)
        cut_ = cut(model, layer.until, path)
        at = layer.span
        check_input(cut_, a, path)
        if layer.trainable:
            return lower_trainable(ctx, layer, a, model, cut_, path)
        return lower_frozen(ctx, layer, a, model, digest, cut_, path)
    except DlnError as exc:
        if exc.span is not None:
            raise
        raise error(f"{layer.name} (pretrained): {exc.message}", at, program) from None


LOWER_RULES[ast.Pretrained] = lower_pretrained
