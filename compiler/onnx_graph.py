"""Queries over ONNX graphs, shared by the passes and analyses that read them."""
from __future__ import annotations

import onnx


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The names a node's subgraphs (If, Loop, Scan bodies) read from the enclosing graph."""
    names: set[str] = set()
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                      list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
            inner = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            for sub in graph.node:
                inner.update(sub.output)
                names.update(n for n in list(sub.input) + sorted(subgraph_reads(sub)) if n and n not in inner)
    return names


def reads(node: onnx.NodeProto) -> set[str]:
    """The values a node reads: its inputs and what its subgraphs read from outside them."""
    return {name for name in node.input if name} | subgraph_reads(node)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Each value a node of `graph` makes, and that node."""
    return {out: node for node in graph.node for out in node.output if out}
