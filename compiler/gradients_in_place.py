"""The training step with its gradients written in place: no copy to join them.

The training step joins every trainable parameter's gradient into one row (`spec.gradient`, a
Concat of Flatten views, in `spec.flat` order) for the optimiser, which updates all parameters at
once. The Concat copies every gradient once per step (the MLP's 940 KB, about 5 % of a batch-32
step). `gradients_in_place` rewrites the step so that no copy is made:
- each gradient becomes a graph output, which the caller binds to its slice of one buffer;
- that buffer is also a graph input, `GRADS`, which the optimiser reads in place of the Concat;
- the read goes through a Reshape whose target shape, (1, n), depends on one element of every
  gradient output, so ONNX Runtime runs every reader of `GRADS` after every gradient is written.

The shape arrives through a comparison that is false for every float, NaN included
(x > +inf), so it is always (1, n); Reshape aliases its input, so the read costs no copy.

The rewritten graph is only correct under that binding (gradient outputs over `GRADS`), so it
is the runtime's own: the exported `train_step.onnx` keeps the Concat and runs anywhere.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import producers, reads
from .program import FLAT, FlatView, TrainStepSpec

GRADS = "grads.bound"     # the graph input that the gradient outputs are bound over: (1, n)
NO_DATA_EDGE = frozenset({"Shape", "Size"})   # their output depends on a shape, not on values


@dataclass(frozen=True)
class GradientsInPlace:
    """The rewritten step, and where its gradient outputs go."""
    model: onnx.ModelProto
    outputs: tuple[FlatView, ...]     # each gradient output: its name, and the slice of GRADS it is bound to


def _depends_on(producer: dict[str, onnx.NodeProto], value: str, source: str) -> bool:
    """Whether `value`'s elements are computed from `source`'s (so ONNX Runtime cannot fold it
    into a constant): a walk up the producers, into subgraphs, not through Shape or Size."""
    stack, seen = [value], set()
    while stack:
        name = stack.pop()
        if name == source:
            return True
        node = producer.get(name)
        if node is None or id(node) in seen or node.op_type in NO_DATA_EDGE:
            continue
        seen.add(id(node))
        stack.extend(reads(node))
    return False


def _pieces(graph: onnx.GraphProto, spec: TrainStepSpec) -> tuple[onnx.NodeProto, list[str], list[onnx.NodeProto]] | None:
    """The Concat joining the gradients, each gradient it joins (behind its Flatten view), and
    those Flatten nodes; None where the step has no such Concat."""
    producer = producers(graph)
    concat = producer.get(spec.gradient or "")
    if concat is None or concat.op_type != "Concat" or len(concat.input) != len(spec.flat):
        return None
    consumers = Counter(name for node in graph.node for name in reads(node))
    pieces, views = [], []
    for name in concat.input:
        node = producer.get(name)
        if node is not None and node.op_type == "Flatten" and consumers.get(name) == 1:
            views.append(node)
            name = node.input[0]
        pieces.append(name)
    outputs = {o.name for o in graph.output}
    if len(set(pieces)) != len(pieces) or any(p in outputs for p in pieces):
        return None
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer} | set(producer)
    if any(name.startswith(GRADS) for name in names):    # the names the rewrite adds are taken
        return None
    if not all(_depends_on(producer, p, spec.x) for p in pieces):     # computed, never constant
        return None
    return concat, pieces, views


def gradients_in_place(model: onnx.ModelProto, spec: TrainStepSpec) -> GradientsInPlace | None:
    """`model` (the training step of `spec`) with its gradients as outputs bound over the input
    GRADS; None where it has no joined gradient to replace."""
    found = _pieces(model.graph, spec)
    if found is None:
        return None
    concat, pieces, views = found
    dtype = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == FLAT)
    n = sum(v.size for v in spec.flat)
    # each gradient's shape as the graph has it: the parameter's, or (1, size) where it is joined as it is
    shapes = [view.shape if piece != joined else (1, view.size)
              for piece, joined, view in zip(pieces, concat.input, spec.flat)]
    token, firsts, constants = [], [], {}
    for i, (piece, shape) in enumerate(zip(pieces, shapes)):
        rank = len(shape)
        if rank == 0:
            firsts.append(piece)
            continue
        zeros, ones = f"{GRADS}.zeros_{rank}", f"{GRADS}.ones_{rank}"
        constants[zeros], constants[ones] = np.zeros(rank, np.int64), np.ones(rank, np.int64)
        firsts.append(f"{GRADS}.first_{i}")
        token.append(helper.make_node("Slice", [piece, zeros, ones], [firsts[-1]]))     # piece[0, …, 0]
    constants[f"{GRADS}.inf"] = np.array(np.inf, helper.tensor_dtype_to_np_dtype(dtype))
    constants[f"{GRADS}.shape"] = np.array([1, n], np.int64)
    token += [helper.make_node("Sum", firsts, [f"{GRADS}.firsts"]),
              helper.make_node("Squeeze", [f"{GRADS}.firsts"], [f"{GRADS}.first"]),
              helper.make_node("Greater", [f"{GRADS}.first", f"{GRADS}.inf"], [f"{GRADS}.never"]),  # NaN too
              helper.make_node("Where", [f"{GRADS}.never", f"{GRADS}.shape", f"{GRADS}.shape"],
                               [f"{GRADS}.shape_after"]),
              helper.make_node("Reshape", [GRADS, f"{GRADS}.shape_after"], [concat.output[0]])]

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = []                               # the step's nodes with the token in the Concat's place
    for original, node in zip(model.graph.node, graph.node):
        if original is concat:
            nodes += token
        elif not any(original is view for view in views):
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in constants.items())
    graph.input.append(helper.make_tensor_value_info(GRADS, dtype, [1, n]))
    graph.output.extend(helper.make_tensor_value_info(p, dtype, list(shape)) for p, shape in zip(pieces, shapes))
    return GradientsInPlace(out, tuple(FlatView(p, view.offset, shape) for p, view, shape in zip(pieces, spec.flat, shapes)))
