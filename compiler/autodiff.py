"""Reverse-mode differentiation of IR: builds the backward graph as more IR.

The driver walks the forward nodes in reverse topological order, asks each op's VJP rule
for its inputs' gradients, sums gradients that meet at one value, and stops at values that
do not depend on the parameters being differentiated (data, frozen parameters, constants).
"""
from __future__ import annotations

from typing import Iterable

from .ir import NON_DIFFERENTIABLE, Builder, Node, Value
from .vjp import VJP_RULES


def depends_on(nodes: Iterable[Node], sources: Iterable[Value]) -> set[str]:
    """Names of the values that depend on any of `sources` (the sources included)."""
    reached = {v.name for v in sources}
    for node in nodes:
        if node.op not in NON_DIFFERENTIABLE and any(v.name in reached for v in node.inputs):
            reached.add(node.output.name)
    return reached


def grad(b: Builder, loss: Value, wrt: Iterable[Value], seed: Value | None = None) -> dict[str, Value]:
    """d loss / d w for each w in `wrt`, as values built into `b`. A scalar loss is seeded with 1,
    or with the scalar `seed`, which gives seed·d loss / d w (the seed meets the loss's scalar
    factors first, so the scaling costs no pass over a tensor)."""
    wrt = tuple(wrt)
    forward = tuple(b.nodes)
    live = depends_on(forward, wrt)
    grads: dict[str, Value] = {loss.name: seed if seed is not None else b.const(1.0, dtype=loss.dtype)}
    for node in reversed(forward):
        g = grads.get(node.output.name)
        if g is None or node.output.name not in live:
            continue
        rule = VJP_RULES[node.op]
        for inp, g_inp in zip(node.inputs, rule(b, g, node)):
            if g_inp is None or inp.name not in live:
                continue
            previous = grads.get(inp.name)
            grads[inp.name] = g_inp if previous is None else b.add(previous, g_inp)
    missing = [w.name for w in wrt if w.name not in grads]
    if missing:
        raise ValueError(f"the loss does not depend on {', '.join(missing)}")
    return {w.name: grads[w.name] for w in wrt}
