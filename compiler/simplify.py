"""The simplifier: constant folding, algebraic identities, common subexpressions, dead nodes.

Each pass is a pure function from Graph to Graph; `simplify` runs them to a fixed point.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np

from .ir import Graph, Node, Value

# constant folding: op -> numpy evaluation on constant inputs
FOLD_RULES: dict[str, Callable[..., np.ndarray]] = {
    "identity": lambda x, **_: x,
    "add": lambda a, b, **_: a + b,
    "sub": lambda a, b, **_: a - b,
    "mul": lambda a, b, **_: a * b,
    "div": lambda a, b, **_: a / b,
    "pow": lambda a, b, **_: np.power(a, b),
    "maximum": lambda a, b, **_: np.maximum(a, b),
    "minimum": lambda a, b, **_: np.minimum(a, b),
    "neg": lambda x, **_: -x,
    "exp": lambda x, **_: np.exp(x),
    "log": lambda x, **_: np.log(x),
    "sqrt": lambda x, **_: np.sqrt(x),
    "abs": lambda x, **_: np.abs(x),
    "sign": lambda x, **_: np.sign(x),
    "floor": lambda x, **_: np.floor(x),
    "greater": lambda a, b, **_: a > b,
}


def _const_value(producers: dict[str, Node], value: Value) -> np.ndarray | None:
    node = producers.get(value.name)
    return node.attr("value") if node is not None and node.op == "const" else None


def _rename(graph: Graph, alias: dict[str, Value]) -> Graph:
    """Replace uses of each aliased value by its target, following chains."""
    def resolve(v: Value) -> Value:
        while v.name in alias:
            v = alias[v.name]
        return v
    nodes = tuple(replace(n, inputs=tuple(resolve(v) for v in n.inputs)) for n in graph.nodes)
    return replace(graph, nodes=nodes, outputs=tuple(resolve(v) for v in graph.outputs))


def fold_constants(graph: Graph) -> Graph:
    """Evaluate nodes whose inputs are all constants (where a fold rule exists)."""
    producers: dict[str, Node] = {}
    nodes = []
    for node in graph.nodes:
        values = [_const_value(producers, v) for v in node.inputs]
        if node.op in FOLD_RULES and node.inputs and all(v is not None for v in values):
            with np.errstate(all="ignore"):
                folded = np.asarray(FOLD_RULES[node.op](*values, **node.attrs))
            node = Node("const", (), node.output, {"value": folded.astype(node.output.dtype)})
        producers[node.output.name] = node
        nodes.append(node)
    return replace(graph, nodes=tuple(nodes))


def _is_scalar_const(producers, value: Value, target: float) -> bool:
    c = _const_value(producers, value)
    return c is not None and c.size == 1 and float(c.reshape(())) == target


def apply_identities(graph: Graph) -> Graph:
    """x·1 → x, x + 0 → x, x − 0 → x, x / 1 → x, −(−x) → x, where the shape is unchanged."""
    producers = graph.producers()
    protected = {v.name for v in graph.outputs}
    alias: dict[str, Value] = {}
    for node in graph.nodes:
        out = node.output
        keep = None
        if out.name in protected:
            continue
        if node.op in ("mul", "add", "sub", "div") and len(node.inputs) == 2:
            a, b = node.inputs
            unit = 1.0 if node.op in ("mul", "div") else 0.0
            if _is_scalar_const(producers, b, unit) and a.shape == out.shape:
                keep = a
            elif node.op in ("mul", "add") and _is_scalar_const(producers, a, unit) and b.shape == out.shape:
                keep = b
        elif node.op == "neg":
            inner = producers.get(node.inputs[0].name)
            if inner is not None and inner.op == "neg":
                keep = inner.inputs[0]
        elif node.op in ("reshape_as", "expand_as") and node.inputs[0].shape == out.shape \
                and all(isinstance(d, int) for d in out.shape):
            keep = node.inputs[0]
        if keep is not None and keep.dtype == out.dtype:
            alias[out.name] = keep
    return _rename(graph, alias) if alias else graph


def _key(node: Node) -> Any:
    attrs = tuple(sorted((k, v.tobytes() + str(v.dtype).encode() + str(v.shape).encode()
                          if isinstance(v, np.ndarray) else repr(v)) for k, v in node.attrs.items()))
    return node.op, tuple(v.name for v in node.inputs), attrs


def eliminate_common_subexpressions(graph: Graph) -> Graph:
    """Nodes with the same op, inputs and attributes compute the same value: keep the first."""
    protected = {v.name for v in graph.outputs}
    seen: dict[Any, Value] = {}
    alias: dict[str, Value] = {}
    for node in graph.nodes:
        node = replace(node, inputs=tuple(alias.get(v.name, v) for v in node.inputs))
        key = _key(node)
        if key in seen and seen[key].dtype == node.output.dtype and node.output.name not in protected:
            alias[node.output.name] = seen[key]
        else:
            seen.setdefault(key, node.output)
    return _rename(graph, alias) if alias else graph


def eliminate_dead_nodes(graph: Graph) -> Graph:
    """Drop nodes that no output depends on."""
    needed = {v.name for v in graph.outputs}
    kept = []
    for node in reversed(graph.nodes):
        if node.output.name in needed:
            kept.append(node)
            needed.update(v.name for v in node.inputs)
    return replace(graph, nodes=tuple(reversed(kept)))


def _made_by(producers: dict[str, Node], value: Value, op: str) -> Node | None:
    """The node that makes value, if it is an `op` node; else None."""
    node = producers.get(value.name)
    return node if node is not None and node.op == op else None


def _positive_mask_test(producers: dict[str, Node], value: Value) -> Node | None:
    """The node greater(x, 0) where value is cast(greater(x, 0)), the mask of ReLU's gradient; else None."""
    cast = _made_by(producers, value, "cast")
    greater = _made_by(producers, cast.inputs[0], "greater") if cast is not None else None
    if greater is None or not _is_scalar_const(producers, greater.inputs[1], 0.0):
        return None
    return greater


def _use_counts(graph: Graph) -> dict[str, int]:
    """How many node inputs and graph outputs each value name feeds."""
    uses: dict[str, int] = {}
    for v in [v for node in graph.nodes for v in node.inputs] + list(graph.outputs):
        uses[v.name] = uses.get(v.name, 0) + 1
    return uses


def mask_before_unpooling(graph: Graph) -> Graph:
    """maxpool_grad(g, x, y) · [x > 0]  →  maxpool_grad(g · [y > 0], x, y).

    maxpool_grad is non-zero only where x is its window's maximum, and there [x > 0] = [y > 0]: the
    mask of a ReLU in front of the pool can be applied to the pooled gradient, kh·kw times smaller.
    Taken only where the maxpool_grad has no other use (it would otherwise stay computed as well).
    """
    producers, uses = graph.producers(), _use_counts(graph)
    taken = {v.name for v in graph.inputs} | set(producers)
    nodes, changed = [], False
    for node in graph.nodes:
        if node.op == "mul":
            for unpooled, mask in (node.inputs, node.inputs[::-1]):
                pool = _made_by(producers, unpooled, "maxpool_grad")
                if pool is None or uses.get(unpooled.name) != 1:
                    continue
                g, x, y = pool.inputs
                test = _positive_mask_test(producers, mask)
                if test is None or test.inputs[0] != x or mask.shape != x.shape:
                    continue
                stem = node.output.name
                names = [f"{stem}.{part}" for part in ("pooled_positive", "pooled_mask", "pooled_grad")]
                if taken & set(names):
                    continue
                positive = Value(names[0], "bool", y.shape)
                pooled_mask = Value(names[1], g.dtype, y.shape)
                masked = Value(names[2], g.dtype, g.shape)
                nodes += [Node("greater", (y, test.inputs[1]), positive),
                          Node("cast", (positive,), pooled_mask, {"dtype": g.dtype}),
                          Node("mul", (g, pooled_mask), masked)]
                node, changed = Node("maxpool_grad", (masked, x, y), node.output, dict(pool.attrs)), True
                break
        nodes.append(node)
    return eliminate_dead_nodes(replace(graph, nodes=tuple(nodes))) if changed else graph


def sum_before_unpooling(graph: Graph) -> Graph:
    """Σ_{…, h, w} maxpool_grad(g, x, y)  →  Σ_{…, p, q} g, summed over the same axes, H and W among them.

    Each window sends its g to one place, its first maximum, so unpooling moves the terms of the sum
    and adds only zeros. The bias gradient of a conv in front of a pool then sums the pooled
    gradient, kh·kw times smaller.
    """
    producers = graph.producers()
    nodes, changed = [], False
    for node in graph.nodes:
        if node.op == "reduce_sum":
            (unpooled,) = node.inputs
            pool, axes, rank = _made_by(producers, unpooled, "maxpool_grad"), node.attr("axes"), unpooled.rank
            spatial = axes is None or {rank - 2, rank - 1} <= {a % rank for a in axes}
            if pool is not None and spatial:
                node, changed = replace(node, inputs=(pool.inputs[0],)), True
        nodes.append(node)
    return eliminate_dead_nodes(replace(graph, nodes=tuple(nodes))) if changed else graph


def filter_grad_before_unpooling(graph: Graph) -> Graph:
    """conv_filter_grad(x, maxpool_grad(g, r, y))  →  conv_filter_grad_pooled(x, g, r, y).

    Taken where the unpooled gradient has no other use: a first layer, whose input needs no gradient,
    with its bias gradient summed from the pooled one (`sum_before_unpooling`). The pooled form skips
    the unpooling and runs its Conv over kernels kh·kw times smaller (`emit_conv_filter_grad_pooled`).
    """
    producers, uses = graph.producers(), _use_counts(graph)
    nodes, changed = [], False
    for node in graph.nodes:
        if node.op == "conv_filter_grad":
            x, unpooled = node.inputs
            pool = _made_by(producers, unpooled, "maxpool_grad")
            if pool is not None and uses[unpooled.name] == 1:
                node = Node("conv_filter_grad_pooled", (x, *pool.inputs), node.output,
                            {**node.attrs, "pool": tuple(pool.attr("kernel"))})
                changed = True
        nodes.append(node)
    return eliminate_dead_nodes(replace(graph, nodes=tuple(nodes))) if changed else graph


PASSES = (fold_constants, apply_identities, eliminate_common_subexpressions, eliminate_dead_nodes,
          mask_before_unpooling, sum_before_unpooling, filter_grad_before_unpooling)


def simplify(graph: Graph, max_rounds: int = 10) -> Graph:
    for _ in range(max_rounds):
        before = len(graph.nodes)
        for simplify_pass in PASSES:
            graph = simplify_pass(graph)
        if len(graph.nodes) == before:
            return graph
    return graph


# ---------------------------------------------------------------- sequences
Pieces = tuple[tuple[int, int, Value], ...]          # (offset, length, value) along one axis, by offset


def _tiles(pieces: Pieces, size: int) -> bool:
    end = 0
    for offset, length, _ in pieces:
        if offset != end:
            return False
        end = offset + length
    return end == size


def _joined(producers: dict[str, Node], node: Node, axis: int, pieces: Pieces) -> Node:
    """The concat of the pieces in place of their sum; stack_steps where each piece is one unsqueezed step."""
    values = [v for _, _, v in pieces]
    steps = [producers.get(v.name) for v in values]
    if axis == 1 and all(s is not None and s.op == "unsqueeze" and tuple(s.attr("axes")) == (1,) for s in steps):
        return Node("stack_steps", tuple(s.inputs[0] for s in steps), node.output, {})
    return Node("concat", tuple(values), node.output, {"axis": axis})


def join_padded_pieces(graph: Graph) -> Graph:
    """A sum of pad_axis pieces that tile their axis exactly once is the concat of the pieces.

    The gradient of a tensor cut into steps (time_step) or gates (slice_axis) comes back as one
    zero-padded piece per use, added up: T pads and T − 1 additions of the whole tensor. When the
    pieces cover the axis once, that sum is one concat (one stack_steps for unsqueezed steps), and
    the pads and additions are left dead.
    """
    producers = graph.producers()
    pieces: dict[str, tuple[int, Pieces]] = {}
    nodes, joined = [], False
    for node in graph.nodes:
        out = node.output
        if node.op == "pad_axis":
            x = node.inputs[0]
            axis = node.attr("axis") % x.rank
            pieces[out.name] = (axis, ((node.attr("before"), int(x.shape[axis]), x),))
        elif node.op == "add" and all(v.name in pieces and tuple(v.shape) == tuple(out.shape) for v in node.inputs):
            (axis, first), (other_axis, second) = (pieces[v.name] for v in node.inputs)
            merged = tuple(sorted(first + second, key=lambda p: p[0]))
            disjoint = all(p[0] + p[1] <= q[0] for p, q in zip(merged, merged[1:]))
            if axis == other_axis and disjoint:
                pieces[out.name] = (axis, merged)
                if _tiles(merged, int(out.shape[axis])):
                    node, joined = _joined(producers, node, axis, merged), True
        nodes.append(node)
    # the pads and partial sums left behind go now: `simplify` stops when a round keeps the node count
    return eliminate_dead_nodes(replace(graph, nodes=tuple(nodes))) if joined else graph


PASSES = PASSES + (join_padded_pieces,)
